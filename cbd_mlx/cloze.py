"""Last-word cloze accuracy (LAMBADA-style) on held-out text: given the
context before the last word of a sentence, does greedy decoding produce
exactly that word? (Every token of the word must be the argmax.)"""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .errors import CBDError

CONTEXT_TOKENS = 128
MAX_WORD_TOKENS = 4
_SENTENCE_END = re.compile(r"([A-Za-z][a-z]{2,})([.!?])(?=[\s\"'])")


def build_items(text: str, tokenizer, n_items: int, context_tokens: int = CONTEXT_TOKENS, seed: int = 0):
    """(context ids, word ids) pairs: sentence-final words with at least
    ``context_tokens`` of preceding text, spread evenly over the text."""
    spots = [m for m in _SENTENCE_END.finditer(text) if m.start() > context_tokens * 8]
    if not spots:
        raise CBDError("the cloze text is too short or has no sentence-final words")
    picks = np.linspace(0, len(spots) - 1, min(n_items, len(spots))).round().astype(int)
    items = []
    for i in picks:
        m = spots[int(i)]
        before = text[max(0, m.start() - context_tokens * 8) : m.start()]
        if not before.endswith(" "):  # the word must follow a plain space
            continue
        ctx = tokenizer.encode(before[:-1])
        word = tokenizer.encode(" " + m.group(1))
        if len(ctx) < context_tokens or not 0 < len(word) <= MAX_WORD_TOKENS:
            continue
        items.append((ctx[-context_tokens:], word))
    return items


def cloze_accuracy(model, items, batch_size: int = 16, progress: bool = True) -> float:
    """Share of items whose word is produced exactly by greedy decoding."""
    if not items:
        raise CBDError("no cloze items")
    hits = 0
    for s in tqdm(range(0, len(items), batch_size), desc="cloze", unit="batch", disable=not progress, leave=False):
        chunk = items[s : s + batch_size]
        width = max(len(c) + len(w) for c, w in chunk)
        seqs = np.zeros((len(chunk), width), dtype=np.int32)
        for r, (c, w) in enumerate(chunk):
            seqs[r, : len(c) + len(w)] = c + w
        pred = np.array(mx.argmax(model(mx.array(seqs)), axis=-1))
        for r, (c, w) in enumerate(chunk):
            start = len(c) - 1  # logits at position p predict token p + 1
            hits += int(all(pred[r, start + j] == w[j] for j in range(len(w))))
    return hits / len(items)
