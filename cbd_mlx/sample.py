"""Text sampled from a model, to distill on: documents drawn from the source
itself carry its own distribution (web text, news, code, dialogue), which no
corpus at hand covers. ``sample_text`` writes them as jsonl that `data
prepare` reads; the sampling itself (`sample_ids`, `cut_documents`) is pure.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from tqdm import tqdm

from .arch.anchor import model_from_weights
from .arch.shapes import Shape, context_length
from .errors import CBDError
from .loader import load_anchor, load_tokenizer
from .save import atomic_dir, check_out_path, dump_json, refuse_existing

SEPARATORS = ("<|endoftext|>", "</s>", "<|end_of_text|>")  # pretraining document separators, by family
MIN_DOC_TOKENS = 16
META = "meta.json"
MAX_BATCH_BYTES = 8 * 2**30


def sample_ids(model: nn.Module, start: int, batch_size: int, seq_len: int, temperature: float,
               key: mx.array) -> np.ndarray:
    """(batch_size, seq_len) token ids sampled from ``model`` after the token
    ``start``, at ``temperature``, with a KV cache."""
    cache = make_prompt_cache(model)
    x = mx.full((batch_size, 1), start, dtype=mx.int32)
    rows = []
    for k in mx.random.split(key, seq_len):
        logits = model(x, cache=cache)[:, -1, :].astype(mx.float32)
        x = mx.random.categorical(logits * (1.0 / temperature), key=k)[:, None].astype(mx.int32)
        mx.eval(x)
        rows.append(np.array(x[:, 0]))
    return np.stack(rows, axis=1)


def cut_documents(ids: np.ndarray, stop: set[int], min_tokens: int = MIN_DOC_TOKENS) -> list[list[int]]:
    """Each row of ``ids`` up to its first stop token, rows shorter than
    ``min_tokens`` dropped."""
    docs = []
    for row in ids.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        if cut >= min_tokens:
            docs.append(row[:cut])
    return docs


def check_batch_memory(shape: Shape, batch_size: int, seq_len: int, limit: int = MAX_BATCH_BYTES) -> None:
    """Refuse a batch whose logits and KV cache (fp32) would not fit in ``limit`` bytes."""
    kv = shape.kv_heads * shape.head_dim
    need = 4 * batch_size * (3 * shape.vocab + 2 * shape.layers * kv * seq_len)
    if need > limit:
        raise CBDError(f"--batch-size {batch_size} x --seq-len {seq_len} needs ~{need / 2**30:.0f} GiB for the "
                       f"logits and KV cache (at most {limit / 2**30:.0f}); lower --batch-size or --seq-len")


def start_token(tokenizer) -> int:
    """The token a document starts after: the vocabulary's pretraining
    separator when it has one (an instruct model's bos opens a chat turn),
    else bos, else eos."""
    vocab = tokenizer.get_vocab()
    for s in SEPARATORS:
        if s in vocab:
            return vocab[s]
    for t in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    raise CBDError("the tokenizer has no document separator, bos or eos token to start a sample from")


def sample_text(model_src: str, out: Path, tokens: int, *, batch_size: int = 256, seq_len: int = 256,
                temperature: float = 0.9, seed: int = 0, force: bool = False, progress: bool = True) -> dict:
    """Sample about ``tokens`` tokens of documents from ``model_src`` into
    ``out`` (batch files ``sample-NNNNN.jsonl`` with a ``text`` field, and
    meta.json). Batch b is drawn with key (seed, b), so a run is reproducible
    and an interrupted one resumes from its finished batches (kept in
    OUT.partial-sample). Returns the meta record."""
    out = check_out_path(out)
    refuse_existing(out, force)
    if tokens < 1 or batch_size < 1 or seq_len < 1 or not temperature > 0:
        raise CBDError("--tokens, --batch-size and --seq-len must be positive and --temperature above 0")
    a = load_anchor(model_src)
    check_batch_memory(a.shape, batch_size, seq_len)
    context = context_length(a.config)
    if context and seq_len >= context:
        raise CBDError(f"--seq-len {seq_len} is beyond the model's context of {context} tokens; lower --seq-len")
    tok = load_tokenizer(a.path)
    model = model_from_weights(a.config, a.weights)
    start = start_token(tok)
    stop = set(getattr(tok, "all_special_ids", []) or []) | {start} | set(getattr(tok, "eos_token_ids", []) or [])
    run = {"model": str(model_src), "model_sha256": a.sha256, "temperature": temperature, "seed": seed,
           "batch_size": batch_size, "seq_len": seq_len, "start_token": start}
    work = out.with_name(f"{out.name}.partial-sample")
    if work.is_dir() and _read_run(work) != run:
        shutil.rmtree(work)  # another model or setting: its batches do not belong to this sample
    work.mkdir(parents=True, exist_ok=True)
    (work / META).write_text(dump_json(run))
    n_batches = -(-tokens // (batch_size * seq_len))
    kept = docs = 0
    with tqdm(total=n_batches * batch_size * seq_len, unit="tok", desc="sample", disable=not progress) as bar:
        for b in range(n_batches):
            f = work / f"sample-{b:05d}.jsonl"
            if not f.is_file():
                ids = sample_ids(model, start, batch_size, seq_len, temperature, mx.random.key(seed * 1_000_003 + b))
                lines = [json.dumps({"text": tok.decode(d)}) for d in cut_documents(ids, stop)]
                tmp = f.with_suffix(".tmp")
                tmp.write_text("".join(line + "\n" for line in lines))
                tmp.replace(f)
            n = [len(json.loads(line)["text"]) for line in f.read_text().splitlines()]
            docs += len(n)
            kept += sum(n)
            bar.update(batch_size * seq_len)
    meta = run | {"batches": n_batches, "documents": docs, "characters": kept, "tokens_sampled": n_batches *
                  batch_size * seq_len}
    with atomic_dir(out, force) as tmp:
        for f in sorted(work.glob("sample-*.jsonl")):
            shutil.copy2(f, tmp / f.name)
        (tmp / META).write_text(dump_json(meta))
    shutil.rmtree(work, ignore_errors=True)
    return meta


def _read_run(work: Path) -> dict | None:
    try:
        return json.loads((work / META).read_text())
    except (OSError, ValueError):
        return None
