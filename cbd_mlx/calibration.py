"""Calibration text: the one way a text file or a token cache becomes
calibration batches (init, prune, pack, export, bridge, chain build)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import open_cache
from .errors import CBDError
from .evaluate import tokenize_file
from .loader import load_tokenizer

CALIB_TOKENS = 4096

DEFAULT_CALIB = Path(__file__).parent / "assets" / "calib.txt"  # built-in English calibration text (Python tutorial)

# init's alpha grid and alignment: English of several kinds (Bierce, GNOME help, the Python tutorial, the Jargon
# File; held-out documents of `data fetch`'s corpus, none in the out-of-domain suite). Chosen on that suite: at
# 90M and 115M it picked blends 2-4% closer to the source than the Python excerpt did, ties elsewhere.
INIT_CALIB = Path(__file__).parent / "assets" / "calib-init.txt"

CALIB_SEQ_LEN = 256


def calibration_batches(tokens: list[int], seq_len: int = CALIB_SEQ_LEN, max_tokens: int = CALIB_TOKENS):
    tokens = tokens[:max_tokens]
    n = len(tokens) // seq_len
    if n == 0:
        raise CBDError(
            f"calibration text is too short: {len(tokens)} tokens, need at least {seq_len}; give a longer --calib file"
        )
    return np.array(tokens[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


def calibration_from(model_dir, calib, max_tokens: int = CALIB_TOKENS,
                     seq_len: int = CALIB_SEQ_LEN) -> np.ndarray | None:
    """Calibration batches (windows of ``seq_len``, ``max_tokens`` in all) of
    the text file ``calib`` in ``model_dir``'s tokenizer; None without one.
    The one way calibration text becomes batches: init, prune, pack, export
    and bridge all come here."""
    if calib is None:
        return None
    ids = tokenize_file(load_tokenizer(model_dir), calib, max_tokens)
    return calibration_batches(ids, seq_len=seq_len, max_tokens=max_tokens)


CHAIN_CALIB_TOKENS = 32768  # calibration tokens for each pruning, spread over the cache


def cache_calibration(cache: Path, tokens: int = CHAIN_CALIB_TOKENS, seq_len: int = CALIB_SEQ_LEN) -> np.ndarray:
    """Calibration windows spread evenly over a cache's training split (all
    its sources and documents, not just the first)."""
    _, splits = open_cache(cache)
    train = splits["train"]
    if len(train) < seq_len + 1:
        raise CBDError("the token cache is too small for calibration")
    n = max(1, min(tokens // seq_len, (len(train) - 1) // seq_len))
    starts = np.linspace(0, len(train) - seq_len - 1, n).astype(np.int64)
    return np.stack([np.asarray(train[s:s + seq_len], dtype=np.int32) for s in starts])
