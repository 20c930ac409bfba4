"""The birth of a child anchor: an importance-ranked Subset of its parent,
with the lineage (index maps per axis and per layer) recorded."""

from __future__ import annotations

import numpy as np

from ._version import __version__
from .errors import CBDError
from .save import refuse_existing
from .loader import Anchor, Built, anchor_sha256, load_anchor
from .operators import subset
from .selection import DEFAULT_CALIB, calibration_from, collect_stats, importance, rankings, select, uniform_rankings
from .shapes import WIDTH_MULTIPLE, Shape, config_for, count_params, format_size, size_of, solve_shape


def floor_shape(parent: Shape, tied_width: bool) -> Shape:
    """The smallest shape the prune solver considers (a quarter of each axis)."""
    group = parent.heads // parent.kv_heads
    kv = max(1, parent.kv_heads // 4)
    hidden = kv * group * parent.head_dim if tied_width else max(64, parent.hidden // 4 // 64 * 64)
    return Shape(
        max(1, parent.layers // 4),
        hidden,
        max(32, parent.ffn // 4 // 32 * 32),
        kv * group,
        kv,
        parent.head_dim,
        parent.vocab,
    )


def child_shape(parent: Anchor, n_target: int, fixed: dict | None = None, multiple: int = WIDTH_MULTIPLE) -> Shape:
    """A child shape of ``n_target`` parameters (within 1%) below the parent."""
    if n_target >= parent.n_params:
        raise CBDError(
            f"a pruned child must be smaller than its parent ({parent.n_params / 1e6:.1f}M parameters)"
        )
    floor = floor_shape(parent.shape, parent.family.tied_attention_width)
    n_floor = count_params(parent.family, parent.template, floor)
    if n_target < n_floor:
        raise CBDError(
            f"{n_target / 1e6:.1f}M is below what pruning can reach from this parent "
            f"({n_floor / 1e6:.1f}M, a quarter of every axis)"
        )
    return solve_shape(parent.family, parent.template, floor, parent.shape, n_target, fixed, multiple=multiple)


def prune_weights(parent: Anchor, target: Shape, batches: np.ndarray | None) -> tuple[dict, dict]:
    """(child weights, lineage record) for ``target``; importance-ranked on
    calibration batches, or uniform selection when there are none."""
    if batches is not None:
        ranks = rankings(importance(parent.family, parent.shape, collect_stats(parent, batches)))
        method = "activation-importance"
    else:
        ranks = uniform_rankings(parent.shape)
        method = "uniform"
    sel = select(parent.shape, target, ranks)
    weights = subset(parent.family, parent.weights, parent.shape, sel)
    lineage = sel.to_json()
    lineage.update(
        method=method,
        parent=parent.source,
        parent_sha256=anchor_sha256(parent),
        parent_shape=parent.shape.as_dict(),
        parent_ranking=ranks,
    )
    return weights, lineage


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
