"""cbd-mlx: Chain-based Distillation on MLX.

Small language models of any size, initialized from a chain of distilled
anchors. The Python API mirrors the command line::

    import cbd_mlx
    model, tokenizer = cbd_mlx.init("80M", out="my-80m")    # like mlx_lm.load
    cbd_mlx.recover("my-80m", ["notes/"], "my-80m-r", cbd_mlx.TrainConfig(tokens=200_000))
    cbd_mlx.export("my-80m-r", "my-80m-4bit", cbd_mlx.ExportConfig(bits=4, method="gptq"))

Importing the package on Linux loads OpenBLAS before MLX (``_blas``).
"""

import os
import sys

from ._blas import BLAS  # first: OpenBLAS before MLX
from ._version import __version__

# transformers (used for tokenizers only) would warn that PyTorch is absent
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _cli_process() -> bool:
    """Whether this process is the cbd-mlx command (not a library user)."""
    a0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return a0.startswith("cbd-mlx") or a0 == "-m"


try:  # the API (light imports: mlx-lm and transformers load on first use)
    from .argcheck import (
        checked,  # the API refuses bad arguments as the command line's typed options do
    )
    from .chain import find_chain, list_chains
    from .chain_pack import pack_chain
    from .chainbuild import build_chain
    from .convert import convert
    from .corpus import fetch as fetch_corpus
    from .data import prepare as prepare_data
    from .distill import distill
    from .errors import CBDError
    from .evaluate import evaluate
    from .export import ExportConfig, export
    from .finetune import FinetuneConfig, finetune
    from .interpolate import build_init, init
    from .loader import load
    from .prune import prune
    from .recover import recover, recover_lr
    from .train import TrainConfig

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
    "BLAS", "__version__", "CBDError", "ExportConfig", "FinetuneConfig", "TrainConfig", "build_chain", "build_init", "convert",
    "distill", "evaluate", "export", "fetch_corpus", "find_chain", "finetune", "init", "list_chains", "load",
    "pack_chain", "prepare_data", "prune", "recover", "recover_lr",
]
