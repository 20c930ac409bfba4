"""The birth of a child anchor: an importance-ranked Subset of its parent, with
the lineage (index maps per axis and per layer) recorded."""

from __future__ import annotations

import numpy as np

from ..arch.anchor import Anchor
from ..arch.shapes import WIDTH_MULTIPLE, Shape, count_params, solve_shape
from ..errors import CBDError
from .operators import subset
from .ranking import collect_stats, importance, rankings, select, uniform_rankings


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
        parent_sha256=parent.sha256,
        parent_shape=parent.shape.as_dict(),
        parent_ranking=ranks,
    )
    return weights, lineage
