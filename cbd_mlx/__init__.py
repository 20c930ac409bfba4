"""cbd-mlx: Chain-based Distillation on MLX.

Importing the package on Linux loads a multithreaded OpenBLAS (when present)
into the global symbol scope *before* MLX, so MLX's CPU matmuls use it instead
of the reference BLAS bundled with the ``mlx[cpu]`` wheel (~25x faster).
"""

import ctypes
import os
import sys

__version__ = "0.1.0"

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)


def _preload_openblas() -> str | None:
    """Load OpenBLAS globally so MLX's CPU backend binds to it (Linux only)."""
    if sys.platform != "linux" or os.environ.get("CBD_NO_OPENBLAS"):
        return None
    if "mlx.core" in sys.modules:
        return None  # too late: MLX already bound its BLAS symbols
    for path in OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
                return path
            except OSError:
                continue
    return None


BLAS = _preload_openblas()
# transformers (used for tokenizers only) would warn that PyTorch is absent
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
