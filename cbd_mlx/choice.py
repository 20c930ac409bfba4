"""Next-sentence choice (HellaSwag-like, built offline from any text): given
the sentences before, which of 4 candidates comes next? The candidates are
the true next sentence and 3 sentences of similar length drawn (seeded) from
elsewhere in the same text; each is scored by the model's mean log-likelihood
per token (length-normalized) and the best one is the model's choice. Random
guessing scores 25%."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .errors import CBDError

N_CANDIDATES = 4
CONTEXT_SENTENCES = 3
MAX_CONTEXT_TOKENS = 64
MIN_SENTENCE_TOKENS, MAX_SENTENCE_TOKENS = 6, 48
MIN_DISTANCE = 50  # distractors come from sentences at least this far from the item
_SENTENCE = re.compile(r"[^.!?]+(?:[.!?]+[\"')\]]*)")


def sentences(text: str) -> list[str]:
    """The text's sentences, whitespace normalized (one paragraph flow)."""
    flat = " ".join(text.split())
    return [s.strip() for s in _SENTENCE.findall(flat) if len(s.strip()) > 1]


def build_items(text: str, tokenizer, n_items: int, seed: int = 0) -> list[tuple[list[int], list[list[int]], int]]:
    """``n_items`` (context ids, 4 candidate ids, index of the true one), spread
    evenly over the text; the draw of distractors and their order is seeded."""
    sents = sentences(text)
    ids = [tokenizer.encode(" " + s) for s in sents]
    ok = [MIN_SENTENCE_TOKENS <= len(t) <= MAX_SENTENCE_TOKENS for t in ids]
    spots = [i for i in range(CONTEXT_SENTENCES, len(sents)) if ok[i]]
    if len(spots) < 2 * MIN_DISTANCE:
        raise CBDError(f"the text is too short for the choice task: {len(sents)} sentences, need at least "
                       f"{2 * MIN_DISTANCE + CONTEXT_SENTENCES}; give a longer text (a novel, a manual)")
    rng = np.random.default_rng(seed)
    items = []
    for i in np.linspace(0, len(spots) - 1, min(n_items, len(spots))).round().astype(int):
        k = spots[int(i)]
        n = len(ids[k])
        pool = [j for j in spots if abs(j - k) >= MIN_DISTANCE and 0.5 * n <= len(ids[j]) <= 2 * n
                and sents[j] != sents[k]]
        if len(pool) < N_CANDIDATES - 1:
            continue
        first = tokenizer.encode(" ".join(sents[k - CONTEXT_SENTENCES:k]))
        if first and getattr(tokenizer, "bos_token_id", None) is not None and first[0] == tokenizer.bos_token_id:
            first = first[1:]
        first = first[-MAX_CONTEXT_TOKENS:]
        cands = [ids[k]] + [ids[j] for j in rng.choice(pool, N_CANDIDATES - 1, replace=False)]
        order = rng.permutation(N_CANDIDATES)
        items.append((first, [cands[o] for o in order], int(np.argmin(order))))
    return items


def candidate_scores(model, context: list[int], candidates: list[list[int]]) -> np.ndarray:
    """Mean log-probability per token of each candidate after ``context``: the
    context runs once into a KV cache, which the candidates (one batch,
    right-padded) then share."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    first = model(mx.array([context]), cache=cache)[:, -1:].astype(mx.float32)  # predicts each first token
    for c in cache:
        c.keys, c.values = (mx.repeat(t, len(candidates), axis=0) for t in (c.keys, c.values))
    width = max(len(c) for c in candidates)
    seqs = np.zeros((len(candidates), width), dtype=np.int32)
    for r, c in enumerate(candidates):
        seqs[r, : len(c)] = c
    rest = model(mx.array(seqs), cache=cache).astype(mx.float32)
    logits = mx.concatenate([mx.repeat(first, len(candidates), axis=0), rest[:, :-1]], axis=1)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    out = np.empty(len(candidates))
    for r, c in enumerate(candidates):
        out[r] = logp[r, np.arange(len(c)), c].mean()
    return out


def full_sequence_scores(model, context: list[int], candidates: list[list[int]]) -> np.ndarray:
    """The same scores from whole context + candidate sequences (no cache): the reference."""
    width = max(len(context) + len(c) for c in candidates)
    seqs = np.zeros((len(candidates), width), dtype=np.int32)
    for r, c in enumerate(candidates):
        seqs[r, : len(context) + len(c)] = context + c
    logits = model(mx.array(seqs)).astype(mx.float32)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    return np.array([logp[r, np.arange(len(context) - 1, len(context) - 1 + len(c)), c].mean()
                     for r, c in enumerate(candidates)])


def choice_accuracy(model, items, progress: bool = True) -> float:
    """Share of items where the true continuation scores best."""
    if not items:
        raise CBDError("no choice items")
    hits = sum(int(np.argmax(candidate_scores(model, ctx, cands)) == truth)
               for ctx, cands, truth in tqdm(items, desc="choice", unit="item", disable=not progress, leave=False))
    return hits / len(items)
