"""Row-parallel numpy for the CPU fast path.

numpy's elementwise kernels run on one core, while the step's matmuls use
them all; between two matmuls the other cores idle. ``rows(fn, *arrays)``
splits the arrays along their first axis and runs ``fn`` on the parts in a
thread pool (numpy releases the GIL inside its loops), so a pass over the
logits or the attention scores uses every core.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

MIN_ELEMS = 1 << 16  # below this a part is not worth a thread's hand-off
WORKERS = min(os.cpu_count() or 1, 8)  # threads of the pool (one per core)


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(WORKERS, thread_name_prefix="cbd-cpu")


def rows(fn, *arrays: np.ndarray) -> list:
    """[fn(*parts) for each split of ``arrays`` along axis 0], the parts run
    in parallel; ``fn`` must touch only its own rows."""
    n = arrays[0].shape[0]
    parts = min(WORKERS, n, max(1, arrays[0].size // MIN_ELEMS))
    if parts <= 1:
        return [fn(*arrays)]
    cuts = np.linspace(0, n, parts + 1).astype(int)
    return list(_pool().map(lambda i: fn(*(a[cuts[i]:cuts[i + 1]] for a in arrays)), range(parts)))
