"""The chain's structure: how far one step may go, and what a child anchor
inherits from its parent (lineage, rankings)."""

from __future__ import annotations

import numpy as np

from ..arch.anchor import Anchor
from ..arch.shapes import format_size
from ..errors import CBDError
from .operators import Selection
from .ranking import align, collect_stats, importance, rankings, uniform_rankings


def has_lineage(small: Anchor, big: Anchor) -> bool:
    """Whether ``small`` was pruned from exactly ``big`` (by weights sha256)."""
    lin = small.lineage
    return bool(lin and lin.get("parent_sha256") and lin["parent_sha256"] == big.sha256)


def lineage_of(small: Anchor, big: Anchor, batches: np.ndarray | None) -> tuple[Selection, dict, str]:
    """(lineage of S in B, B's rankings, how it was obtained)."""
    lin = small.lineage
    if lin is not None:
        if has_lineage(small, big):
            sel = Selection.from_json(lin, big.shape, small.shape)
            ranks = lin.get("parent_ranking") or uniform_rankings(big.shape)
            return sel, ranks, "lineage"
        if batches is None:
            raise CBDError(
                f"'{small.source}' was not pruned from '{big.source}' (its lineage names another parent); "
                "use adjacent anchors of one chain, or pass --calib FILE to align them by activation matching"
            )
    if batches is None:
        raise CBDError(
            f"'{small.source}' has no lineage relative to '{big.source}'; calibration text is needed "
            "to align their channels by activation matching"
        )
    sel = align(small, big, batches)
    ranks = rankings(importance(big.family, big.shape, collect_stats(big, batches)))
    return sel, ranks, "activation-matching"


MAX_STEP = 0.25  # the most of its parent's parameters one chain step may remove


def dense_sizes(top: int, bottom: int, max_step: float = MAX_STEP) -> list[int]:
    """Evenly spaced (geometrically) sizes from below ``top`` down to
    ``bottom``, no step removing more than ``max_step`` of its parent."""
    k = max(1, int(np.ceil(np.log(bottom / top) / np.log(1 - max_step) - 1e-9)))
    r = (bottom / top) ** (1 / k)
    return [int(float(f"{top * r ** i:.3g}")) for i in range(1, k)] + [bottom]


def check_steps(n_source: int, sizes: list[int], max_step: float = MAX_STEP) -> None:
    """Refuse a chain whose steps remove more than ``max_step`` (each anchor is
    distilled from the previous one only: big gaps make weak anchors)."""
    if sorted(sizes, reverse=True) != sizes or sizes[0] >= n_source:
        raise CBDError("--sizes must be decreasing and below the source's size")
    for parent, child in zip([n_source] + sizes, sizes):
        if child < parent * (1 - max_step) * (1 - 0.02):
            hint = ",".join(format_size(n).replace(".0M", "M") for n in dense_sizes(n_source, sizes[-1], max_step))
            raise CBDError(
                f"the step {format_size(parent)} -> {format_size(child)} removes {1 - child / parent:.0%} of the "
                f"parameters (at most {max_step:.0%} per step); use denser sizes, e.g. --sizes {hint}, "
                "or raise --max-step"
            )


def ranks_within(ranks: dict, sel) -> dict:
    """A parent's rankings restricted to the parts ``sel`` keeps, in ``sel``'s
    own indices: the ranking a child of the selected model inherits."""
    def within(order, kept):
        pos = {int(v): i for i, v in enumerate(kept)}
        return [pos[int(i)] for i in order if int(i) in pos]

    return {
        "layers": within(ranks["layers"], sel.layers),
        "hidden": within(ranks["hidden"], sel.hidden),
        "ffn": [within(ranks["ffn"][b], sel.ffn[j]) for j, b in enumerate(sel.layers)],
        "kv_heads": [within(ranks["kv_heads"][b], sel.kv_heads[j]) for j, b in enumerate(sel.layers)],
    }
