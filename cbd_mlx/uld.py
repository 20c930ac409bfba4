"""Cross-tokenizer logit loss (ULD, Universal Logit Distillation) for bridges.

Two tokenizations of one text are aligned at shared token *boundaries*: a
student position i (the prefix up to the end of its token i) is aligned with
the source position j whose token ends at the same character, so both predict
what follows the same text. At aligned positions the student's top-k
probabilities, sorted, are compared with the source's sorted top-k (L1):
sorting makes the loss independent of the two vocabularies. Positions without
a shared boundary (inside a multi-token word of either side) are masked out.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import CBDError
from .loader import encode_text

ULD_K = 32
TARGETS = "uld_targets.npy"
MASK = "uld_mask.npy"


def token_ends(tok, text: str) -> tuple[list[int], list[int]] | None:
    """(ids, end character of each token) without special tokens, from the
    fast tokenizer's offsets; None when the tokenizer gives no offsets."""
    hf = getattr(tok, "_tokenizer", tok)
    try:
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    except (TypeError, ValueError, NotImplementedError):
        return None
    return list(enc["input_ids"]), [int(e) for _, e in enc["offset_mapping"]]


def align(student_ends: list[int], source_ends: list[int]) -> dict[int, int]:
    """student position -> source position with the same token end."""
    where = {e: j for j, e in enumerate(source_ends)}
    return {i: where[e] for i, e in enumerate(student_ends) if e in where}


def source_topk(model, ids: list[int], bos: int | None, k: int) -> np.ndarray:
    """Sorted (descending) top-k next-token probabilities at every position."""
    x = mx.array(([bos] if bos is not None else []) + ids)[None]
    logits = model(x)[0, (1 if bos is not None else 0):].astype(mx.float32)
    p = mx.softmax(logits, axis=-1)
    top = mx.sort(mx.topk(p, k, axis=-1), axis=-1)[:, ::-1]
    return np.array(top, dtype=np.float16)


def build_targets(source, source_tok, student_tok, docs: list[str], eos: int | None, n_tokens: int, out: Path,
                  k: int = ULD_K) -> float:
    """Targets for a token stream made of ``docs`` in order (each encoded by
    the student without specials, plus ``eos``): ``out``/uld_targets.npy
    (n_tokens, k) and uld_mask.npy; returns the aligned fraction."""
    targets = np.zeros((n_tokens, k), dtype=np.float16)
    mask = np.zeros(n_tokens, dtype=bool)
    pos = 0
    bos = getattr(source_tok, "bos_token_id", None)
    for text in docs:
        ids = encode_text(student_tok, text)
        st = token_ends(student_tok, text)
        so = token_ends(source_tok, text)
        if st is not None and so is not None and st[0] == ids and so[0]:
            top = source_topk(source, so[0], bos, k)
            for i, j in align(st[1], so[1]).items():
                if j < len(so[0]) - 1 or i == len(ids) - 1:  # the source's last position predicts past the text
                    targets[pos + i], mask[pos + i] = top[j], True
        pos += len(ids) + (1 if eos is not None else 0)
    if pos != n_tokens:

        raise CBDError(f"ULD targets cover {pos} tokens but the cache holds {n_tokens}; rebuild the bridge work dir")
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / TARGETS, targets)
    np.save(out / MASK, mask)
    return float(mask.mean()) if n_tokens else 0.0


class XVocabTargets:
    """ULD targets of a cache's train split, read per training window."""

    def __init__(self, folder: Path):
        self.targets = np.load(Path(folder) / TARGETS, mmap_mode="r")
        self.mask = np.load(Path(folder) / MASK, mmap_mode="r")

    def window(self, starts: list[int], seq_len: int) -> tuple[mx.array, mx.array]:
        t = np.stack([self.targets[s:s + seq_len] for s in starts]).astype(np.float32)
        m = np.stack([self.mask[s:s + seq_len] for s in starts]).astype(np.float32)
        return mx.array(t), mx.array(m)


