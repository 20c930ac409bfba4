"""cbd-mlx: Chain-based Distillation on MLX.

Small language models of any size, initialized from a chain of distilled
anchors. The Python API mirrors the command line::

    import cbd_mlx
    model, tokenizer = cbd_mlx.init("80M", out="my-80m")    # like mlx_lm.load
    cbd_mlx.recover("my-80m", ["notes/"], "my-80m-r", cbd_mlx.TrainConfig(tokens=200_000))
    cbd_mlx.export("my-80m-r", "my-80m-4bit", cbd_mlx.ExportConfig(bits=4, method="gptq"))

Importing the package on Linux loads a multithreaded OpenBLAS (when present)
into the global symbol scope *before* MLX, so MLX's CPU matmuls use it instead
of the reference BLAS bundled with the ``mlx[cpu]`` wheel (~25x faster).
"""

import ctypes
import os
import sys

from ._version import __version__  # noqa: E402,F401

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)


def _preload_openblas() -> str | None:
    """Load OpenBLAS globally so MLX's CPU backend binds to it (Linux only).

    MLX's OpenBLAS and numpy's own each keep a thread pool that spins for a
    while after every call; training on the CPU alternates MLX matmuls with
    numpy kernels (``cpu_head``, ``cpu_kernels``), so both are told to stop
    spinning soon (OPENBLAS_THREAD_TIMEOUT, read when each library loads):
    measured, a layer's forward + backward 3.25 s -> 2.13 s."""
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")
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



def _cli_process() -> bool:
    """Whether this process is the cbd-mlx command (not a library user)."""
    a0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return a0.startswith("cbd-mlx") or a0 == "-m"


try:  # the API (light imports: mlx-lm and transformers load on first use)
    from .chain import find_chain, list_chains
    from .chain_pack import pack_chain
    from .chainbuild import build_chain
    from .corpus import fetch as fetch_corpus
    from .data import prepare as prepare_data
    from .distill import distill
    from .errors import CBDError
    from .evaluate import evaluate
    from .export import ExportConfig, export
    from .finetune import FinetuneConfig, finetune
    from .interpolate import build_init, init
    from .convert import convert
    from .loader import load
    from .prune import prune
    from .recover import recover, recover_lr
    from .train import TrainConfig

    from .argcheck import checked  # the API refuses bad arguments as the command line's typed options do

    (build_chain, build_init, convert, distill, evaluate, export, fetch_corpus, find_chain, finetune, init,
     list_chains, load, pack_chain, prepare_data, prune, recover, recover_lr) = map(checked, (
        build_chain, build_init, convert, distill, evaluate, export, fetch_corpus, find_chain, finetune, init,
        list_chains, load, pack_chain, prepare_data, prune, recover, recover_lr))
except KeyboardInterrupt:  # Ctrl-C while the command starts: no traceback
    if not _cli_process():
        raise
    sys.stderr.write("interrupted\n")
    sys.exit(130)

__all__ = [
    "BLAS", "CBDError", "ExportConfig", "FinetuneConfig", "TrainConfig", "build_chain", "build_init", "convert",
    "distill", "evaluate", "export", "fetch_corpus", "find_chain", "finetune", "init", "list_chains", "load",
    "pack_chain", "prepare_data", "prune", "recover", "recover_lr",
]
