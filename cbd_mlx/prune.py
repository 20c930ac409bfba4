"""The birth of a child anchor: an importance-ranked Subset of its parent,
with the lineage (index maps per axis and per layer) recorded."""

from __future__ import annotations

from ._version import __version__
from .arch.shapes import config_for, count_params, format_size, size_of
from .calibration import DEFAULT_CALIB, calibration_from
from .loader import Built, load_anchor
from .method.pruning import child_shape, prune_weights
from .save import refuse_existing


def build_prune(parent: str, size: str | int, *, calib=None, calib_tokens: int = 4096, shape: dict | None = None,
                log=None):
    """The child of ``size`` parameters in memory (``loader.Built``); see ``prune``."""

    log = log or (lambda *_: None)
    n = size_of(size)
    p = load_anchor(parent)
    target = child_shape(p, n, {k: v for k, v in (shape or {}).items() if v is not None})
    n_child = count_params(p.family, p.template, target)
    log(f"parent {p.source}: {format_size(p.n_params)} ({p.shape})")
    log(f"child shape: {target} -> {n_child:,} parameters ({format_size(n_child)})")
    if calib is None:
        calib = DEFAULT_CALIB
        log(f"calibration text: the built-in {DEFAULT_CALIB.name} (Python tutorial excerpt); pass --calib FILE "
            "for your domain")
    weights, lineage = prune_weights(p, target, calibration_from(p.path, calib, calib_tokens))
    prov = {"kind": "pruned", "shape": target.as_dict(), "params": n_child, "lineage": lineage,
            "calibration": str(calib), "cbd_mlx": __version__}
    return Built(config_for(p.family, p.config, target), weights, p.path, prov)


def prune(parent: str, size: str | int, *, calib=None, calib_tokens: int = 4096, shape: dict | None = None,
          out=None, force: bool = False, dtype: str = "float32", log=None):
    """A child anchor of ``size`` parameters: the importance-ranked Subset of
    ``parent`` (activation statistics on ``calib``, a text file [default: a
    built-in English excerpt]), its lineage recorded in cbd.json. ``shape``
    pins any of layers/hidden/ffn/heads/kv_heads. Writes an mlx-lm directory
    when ``out`` is given; returns (model, tokenizer)."""

    refuse_existing(out, force)
    built = build_prune(parent, size, calib=calib, calib_tokens=calib_tokens, shape=shape, log=log)
    if out is not None:
        built.save(out, force, dtype)
    return built.load()
