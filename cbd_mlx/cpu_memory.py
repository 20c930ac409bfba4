"""Keep the training step's large temporaries in the heap (glibc).

A CPU training step allocates and frees hundreds of arrays of 1-200 MB
(activations, logits, gradients, MLX's outputs). Above glibc's mmap
threshold (128 KB, raised dynamically to at most 32 MB) each one is a fresh
mapping whose pages fault and are zeroed on first touch, every step.
``keep_large_blocks()`` raises the threshold to 1 GiB, and the heap's trim
threshold with it, so freed blocks are reused from the heap instead.
Measured on the 60M child, batch 4 x 256, 4 alternating pairs of
processes: the CE step's tokens/s +16% (median). Memory freed inside the
heap stays with the process until it exits.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
THRESHOLD = 1 << 30

_set = False


def keep_large_blocks() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB for this process;
    whether they were set (False off Linux, or on a libc without ``mallopt``)."""
    global _set
    if _set or sys.platform != "linux":
        return _set
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    _set = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    return _set
