"""`bridge`: a bridge anchor of the chain's family trained from a source LLM of
another architecture or vocabulary by sequence-level KD: the source writes
continuations of prompts (batched, temperature / top-p sampling through
mlx-lm), the text is tokenized with the *chain's* tokenizer, and the bridge
anchor learns it with CE in the distillation engine's training loop."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .arch.anchor import build_model
from .arch.shapes import config_for, context_length, format_size
from .calibration import DEFAULT_CALIB, calibration_from
from .data import iter_documents, open_cache, prepare, split_documents
from .distill import distill
from .errors import CBDError, check_count, check_fits
from .evaluate import read_text
from .loader import load_anchor, load_tokenizer, read_provenance, resolve
from .method.pruning import child_shape, prune_weights
from .save import dump_json, read_json, refuse_existing, write_model
from .uld import XVocabTargets, build_targets

PROMPT_WORDS = 24  # words per prompt drawn from text files
GEN_DIR = "generated"
HELDOUT_FRACTION = 0.1  # of the generated documents


MAX_PROMPT_CHARS = 64 << 20  # a prompts file is read up to this many characters
PROMPT_BYTES = 1024  # memory per prompt (its text and the continuation generated for it), for --num-prompts' bound


def prompts_from(prompts_file: Path | None, texts: list[Path], n: int, seed: int = 0,
                 words: int = PROMPT_WORDS) -> list[str]:
    """``n`` prompts: lines of a prompts file, or openings of ``words``-word
    windows drawn (seeded) from text files / folders."""
    check_count("--num-prompts", n, 1)
    check_fits(f"{n:,} prompts", n * PROMPT_BYTES, "lower --num-prompts")
    if prompts_file is not None:
        lines = [line.strip() for line in read_text(prompts_file, MAX_PROMPT_CHARS).splitlines() if line.strip()]
        if not lines:
            raise CBDError(f"{prompts_file} holds no prompts (one per line)")
        return [lines[i % len(lines)] for i in range(n)]

    pool = []
    for _, text in iter_documents([Path(t) for t in texts]):
        w = text.split()
        pool += [" ".join(w[i:i + words]) for i in range(0, max(len(w) - words, 0), words * 8)]
    if not pool:
        raise CBDError("no prompts: give --prompts FILE or --prompt-data with text files")
    rng = random.Random(seed)
    return [pool[rng.randrange(len(pool))] for _ in range(n)]


def load_source(source: str):
    """(model, tokenizer) of the source through mlx-lm (any architecture it knows)."""
    from mlx_lm.utils import _get_classes, load

    path = resolve(source)
    try:
        config = read_json(path / "config.json", "source's config.json")
    except (OSError, json.JSONDecodeError):
        raise CBDError(f"source {source} has no readable config.json") from None
    try:
        _get_classes(config)
    except (ValueError, KeyError):
        raise CBDError(f"source architecture '{config.get('model_type')}' is not supported by mlx-lm") from None
    try:
        model, tok = load(str(path))
    except (ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else "unknown error"
        raise CBDError(f"cannot load source {source}: {msg}; its files are damaged or do not match") from None
    except OSError:
        raise CBDError(f"source {source} has no usable tokenizer files; it cannot generate") from None
    if not getattr(tok, "eos_token_ids", None):
        raise CBDError(f"source {source} has no end-of-sequence token; it cannot generate")
    return model, tok, path


def generate(model, tok, prompts: list[str], out_dir: Path, max_new_tokens: int, batch_size: int,
             temperature: float, top_p: float, seed: int, context: int, log=print) -> dict:
    """Batched generation into ``out_dir`` (one document per prompt; batches
    already written are kept, so a rerun resumes)."""
    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    out_dir.mkdir(parents=True, exist_ok=True)
    encoded = [tok.encode(p) for p in prompts]
    longest = max(len(e) for e in encoded)
    if longest + max_new_tokens > context:
        raise CBDError(f"prompts of up to {longest} tokens + {max_new_tokens} new tokens exceed the source's "
                       f"context of {context}; shorten the prompts or lower --max-new-tokens")
    sampler = make_sampler(temp=temperature, top_p=top_p)
    n_tok, seconds = 0, 0.0
    batches = range(0, len(prompts), batch_size)
    for b in tqdm(batches, desc="generate", unit="batch"):
        done = out_dir / f"{b // batch_size:06d}.json"
        if done.exists():
            continue
        mx.random.seed(seed + b)
        t0 = time.time()
        r = batch_generate(model, tok, encoded[b:b + batch_size], max_tokens=max_new_tokens, sampler=sampler,
                           return_token_ids=True)
        seconds += time.time() - t0
        n_tok += sum(len(t) for t in r.token_ids)
        docs = [{"prompt": p, "text": p + t} for p, t in zip(prompts[b:b + batch_size], r.texts)]
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(docs))
        tmp.rename(done)
    stats = {"new_tokens": n_tok, "seconds": round(seconds, 1),
             "tokens_per_s": round(n_tok / seconds, 1) if seconds else None}
    if seconds:
        log(f"generated {n_tok:,} tokens in {seconds:.0f}s ({n_tok / seconds:.1f} tokens/s, batch {batch_size})")
    return stats


def write_documents(gen_dir: Path, docs_dir: Path) -> int:
    """The generated texts as one text file per document (for `data prepare`)."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in sorted(gen_dir.glob("*.json")):
        for i, d in enumerate(json.loads(f.read_text())):
            # a NUL that a sampler emitted is not text: `data prepare` would refuse the file as binary
            (docs_dir / f"{f.stem}-{i:03d}.txt").write_text(d["text"].replace("\0", ""), encoding="utf-8")
            n += 1
    return n


def student_init(student: str, size: int | None, init: str, out: Path, seed: int = 0) -> Path:
    """The bridge anchor before training, written to ``out``: ``student`` as it
    is, pruned to ``size`` (activation importance on the built-in text), or a
    random init of that shape (mlx-lm's initializers)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    a = load_anchor(student)
    if size and size > a.n_params * 1.01:
        raise CBDError(f"--size {format_size(size)} is above --student's {format_size(a.n_params)}: the bridge anchor "
                       "is pruned from (or shaped like) the student; give a smaller --size or a bigger --student")
    shape = child_shape(a, size) if size and size < a.n_params else a.shape
    cfg = config_for(a.family, a.config, shape)
    if init == "random":
        mx.random.seed(seed)
        m = build_model(cfg)
        weights = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(m.parameters())}
        prov = {"kind": "bridge-init", "init": "random", "like": student}
    elif shape != a.shape:

        weights, lineage = prune_weights(a, shape, calibration_from(a.path, DEFAULT_CALIB))
        prov = {"kind": "bridge-init", "init": "prune", "from": student, "lineage": lineage}
    else:
        weights, prov = a.weights, {"kind": "bridge-init", "init": "as-is", "from": student}
    write_model(out, cfg, weights, a.path, prov, force=True)
    return out


def train_documents(docs_dir: Path) -> list[str]:
    """The generated documents of the cache's train split, in cache order."""

    return [text for split, _, text in split_documents([docs_dir], HELDOUT_FRACTION) if split == "train"]


def bridge(source: str, student: str, out: Path, cfg, prompts: list[str], max_new_tokens: int = 128,
           gen_batch: int = 8, temperature: float = 0.8, top_p: float = 0.95, size: int | None = None,
           init: str = "prune", force: bool = False, log=print) -> dict:
    """Sequence-level KD from ``source`` into a bridge anchor shaped after
    ``student`` (its family and tokenizer); returns the training record.
    Work (generated text, token cache, init) lives in OUT.bridge and resumes."""
    import gc
    import shutil

    out = Path(out)
    refuse_existing(out, force)
    load_anchor(student)  # the chain family's model must load (family, tokenizer) before hours of generation
    work = out.with_name(out.name + ".bridge")
    model, tok, src_path = load_source(source)
    src_cfg = read_json(src_path / "config.json", "source's config.json")
    context = context_length(src_cfg) or 2048
    stats = generate(model, tok, prompts, work / GEN_DIR, max_new_tokens, gen_batch, temperature, top_p,
                     cfg.seed, context, log)
    if not (work / "cache" / "meta.json").exists():
        n = write_documents(work / GEN_DIR, work / "docs")
        log(f"tokenizing {n} generated documents with {student}'s tokenizer")
        prepare([work / "docs"], student, work / "cache", heldout_fraction=HELDOUT_FRACTION, force=True)
    xvocab = None
    if cfg.xvocab_weight > 0:

        if not (work / "uld" / "uld_mask.npy").exists():
            stok = load_tokenizer(resolve(student))
            _, splits = open_cache(work / "cache")
            frac = build_targets(model, tok, stok, train_documents(work / "docs"), stok.eos_token_id,
                                 len(splits["train"]), work / "uld")
            log(f"ULD targets: {frac:.0%} of the student's positions share a token boundary with the source")
        xvocab = XVocabTargets(work / "uld")
    del model
    gc.collect()
    init_dir = work / "init"
    if not (init_dir / "cbd.json").exists():
        student_init(student, size, init, init_dir, cfg.seed)
        prov = read_provenance(init_dir)
        prov["bridge"] = {"source": source, "source_model_type": src_cfg.get("model_type"),
                          "source_vocab": src_cfg.get("vocab_size"), "prompts": len(prompts),
                          "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                          "generation": stats}
        (init_dir / "cbd.json").write_text(dump_json(prov))
    rec = distill(None, str(init_dir), work / "cache", out, cfg, force, log=log, xvocab=xvocab)
    if "rank" not in rec and "stopped_at" not in rec:
        shutil.rmtree(work, ignore_errors=True)
    return rec
