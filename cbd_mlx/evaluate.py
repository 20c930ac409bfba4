"""Held-out perplexity (and throughput) of a model on a text file."""

from __future__ import annotations

import math
import time
from pathlib import Path

import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from .arch.anchor import model_from_weights
from .choice import build_items as choice_items
from .choice import choice_accuracy
from .cloze import build_items, cloze_accuracy
from .errors import CBDError, check_count
from .loader import encode_text, load_anchor, load_tokenizer
from .losses import windows_nll

EVAL_SEQ_LEN = 512
EVAL_BATCH = 4
MAX_NLL = 700.0  # nats per token: above it exp() overflows (ppl beyond 1e304); a real model is far below 20


BINARY_PROBE = 8192  # bytes checked for binary content


TOKENIZE_MARGIN = 64  # tokens past max_tokens that a prefix must give: its cut end never reaches them


def check_text_file(path: Path, what: str = "text file") -> Path:
    """``path`` if it is a readable regular file of text; one clear error otherwise."""
    p = Path(path)
    if not p.exists():
        raise CBDError(f"{what} {p} does not exist")
    if p.is_dir():
        raise CBDError(f"{p} is a directory; give a {what}")
    if not p.is_file():
        raise CBDError(f"{p} is not a regular file (a device or a pipe?); give a {what}")
    try:
        with open(p, "rb") as f:
            head = f.read(BINARY_PROBE)
    except OSError as e:
        raise CBDError(f"cannot read {p}: {e.strerror}") from None
    # bytes that are not UTF-8 (a U+FFFD written as text is valid UTF-8 and counts as text)
    invalid = len(head) - len(head.decode("utf-8", errors="ignore").encode("utf-8"))
    if b"\0" in head or invalid > len(head) // 10:
        raise CBDError(f"{p} looks like a binary file, not text; give a UTF-8 {what}")
    return p


def read_text(path: Path, max_chars: int | None = None) -> str:
    """A text file (its first ``max_chars`` characters when given)."""
    p = check_text_file(path)
    try:
        with open(p, encoding="utf-8", errors="replace") as f:
            return f.read(max_chars if max_chars else -1)
    except OSError as e:
        raise CBDError(f"cannot read {p}: {e.strerror}") from None


def check_token_ids(tokens, vocab: int, model: str) -> None:
    """Refuse ids beyond the model's embedding rows (a tokenizer of another model)."""
    top = max(tokens, default=-1)
    if top >= vocab:
        raise CBDError(f"the tokenizer of {model} emits token id {top} but the model has {vocab} embedding rows: "
                       "the tokenizer files do not belong to this model; restore them")


def tokenize_file(tokenizer, path: Path, max_tokens: int | None = None) -> list[int]:
    """Token ids of a text file; with ``max_tokens``, only as much of the file
    is read and tokenized as those need (a prefix, grown until it has them)."""
    if not max_tokens:
        return encode_text(tokenizer, read_text(path))
    size = check_text_file(path).stat().st_size
    chars = 8 * max_tokens + 1024
    while True:
        if chars > size:  # a prefix as long as the file is the file (and no read asks for more than it holds)
            return encode_text(tokenizer, read_text(path))[:max_tokens]
        text = read_text(path, chars)
        ids = encode_text(tokenizer, text)
        if len(text) < chars or len(ids) >= max_tokens + TOKENIZE_MARGIN:  # the whole file, or enough of it
            return ids[:max_tokens]
        chars *= 4


def read_suite(model_dir, paths, max_tokens: int = 4096) -> dict[str, np.ndarray]:
    """Token ids (``max_tokens`` of each) of held-out texts by name: files, or
    folders of .txt files such as `data suite`'s (its README.txt skipped)."""
    tok = load_tokenizer(model_dir)
    files = [f for p in map(Path, paths) for f in (sorted(p.glob("*.txt")) if p.is_dir() else [p])
             if f.name != "README.txt"]
    if not files:
        raise CBDError(f"no text files in {', '.join(map(str, paths))}")
    return {f.stem: np.array(tokenize_file(tok, f, max_tokens), dtype=np.int32) for f in files}


def perplexity(
    model: nn.Module,
    tokens: list[int],
    seq_len: int = EVAL_SEQ_LEN,
    batch_size: int = EVAL_BATCH,
    progress: bool = True,
) -> dict:
    """Mean next-token NLL over non-overlapping windows; ppl = exp(NLL)."""
    n = len(tokens) // seq_len
    if n == 0:
        raise CBDError(f"need at least {seq_len} tokens of text to evaluate, got {len(tokens)}")
    data = np.array(tokens[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    t0 = time.time()
    with tqdm(total=n * (seq_len - 1), unit="tok", desc="eval", disable=not progress, leave=False) as bar:
        total, count = windows_nll(model, (data[i: i + batch_size] for i in range(0, n, batch_size)), bar.update)
    secs = time.time() - t0
    nll = total / count
    if not (math.isfinite(nll) and nll <= MAX_NLL):
        raise CBDError(f"the model's loss on this text is {nll} (not a number, or a perplexity beyond what a float "
                       "holds): its weights or its precision overflow on it; evaluate a float32 copy (`cbd-mlx "
                       "convert MODEL --out DIR`) or check the model")
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "tokens_per_s": count / secs}


def evaluate(model: str, data: Path, *, max_tokens: int = 16384, seq_len: int = EVAL_SEQ_LEN,
             batch_size: int = EVAL_BATCH, cloze: int = 0, choice: int = 0, seed: int = 0,
             progress: bool = False) -> dict:
    """Held-out perplexity and tokens/s of ``model`` (any anchor source) on the
    text file ``data``; with ``cloze`` N, last-word cloze accuracy on N items
    built from the same text; with ``choice`` N, next-sentence choice accuracy
    (4 candidates, random = 25%) on N items (``seed`` draws the distractors)."""

    check_count("max_tokens", max_tokens, 2)
    check_count("seq_len", seq_len, 2, 1 << 16)
    check_count("batch_size", batch_size, 1, 4096)
    for name, v in (("cloze", cloze), ("choice", choice), ("seed", seed)):
        check_count(name, v, 0)
    a = load_anchor(model)
    tok = load_tokenizer(a.path)
    tokens = tokenize_file(tok, data, max_tokens)
    check_token_ids(tokens, a.shape.vocab, model)
    m = model_from_weights(a.config, a.weights)
    r = perplexity(m, tokens, seq_len, batch_size, progress=progress)
    r.update(model=str(model), params=a.n_params, data=str(data))
    if cloze:

        items = build_items(read_text(data), tok, cloze)
        r.update(cloze_acc=cloze_accuracy(m, items, progress=progress), cloze_items=len(items))
    if choice:

        items = choice_items(read_text(data), tok, choice, seed)
        r.update(choice_accuracy=choice_accuracy(m, items, progress=progress), choice_items=len(items))
    return r
