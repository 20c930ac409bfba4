"""Subset and Expand through the axis map, and the blend of the two.

Both operators are one gather/scatter: ``out[dest] = in[src]`` on every
labelled axis of every tensor, with a per-layer map for layers, FFN channels
and heads, and one map for the residual stream shared by all tensors.

A ``Selection`` says which parts of a bigger model a smaller shape keeps, in
the bigger model's coordinates (the *lineage* of a pruned child is one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..arch.families import Family, layer_local_name
from ..arch.shapes import Shape, param_shapes
from ..errors import CBDError

# ridge of Subset's FFN compensation, relative to the mean activation energy: 0.01 over-fits init's ~2K calibration
# tokens (115M: 2.51x the source on the suite, against 1.94x uncompensated); 0.3 and 1.0 tie (1.88 / 1.87)
COMPENSATE_RIDGE = 0.3


@dataclass
class Selection:
    """Indices into a parent model: the layers kept and, per kept layer, the
    FFN channels, query heads and kv heads kept; one list for hidden."""

    layers: list[int]
    hidden: list[int]
    ffn: list[list[int]]
    heads: list[list[int]]
    kv_heads: list[list[int]]

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("layers", "hidden", "ffn", "heads", "kv_heads")}

    @classmethod
    def from_json(cls, d: dict, parent: Shape | None = None, child: Shape | None = None) -> "Selection":
        """A lineage record read back, checked: whole indices, none repeated,
        one list per kept layer; with ``parent`` every index inside the
        parent's dimensions, with ``child`` as many as the child has."""
        def fail(why: str):
            raise CBDError(f"the lineage record in the anchor's cbd.json is damaged ({why}); restore cbd.json")

        if not isinstance(d, dict) or any(k not in d for k in ("layers", "hidden", "ffn", "heads", "kv_heads")):
            fail("it lacks layers, hidden, ffn, heads or kv_heads")
        sel = cls(**{k: d[k] for k in ("layers", "hidden", "ffn", "heads", "kv_heads")})

        def indices(name: str, v, n_parent: int | None, n_child: int | None) -> None:
            if not (isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
                fail(f"{name} is not a list of whole numbers")
            if len(set(v)) != len(v):
                fail(f"{name} repeats an index")
            if v and (min(v) < 0 or (n_parent is not None and max(v) >= n_parent)):
                fail(f"{name} holds an index outside 0..{n_parent - 1 if n_parent else ''}")
            if n_child is not None and len(v) != n_child:
                fail(f"{name} keeps {len(v)} where the model has {n_child}")

        p, c = (lambda k: getattr(parent, k) if parent else None), (lambda k: getattr(child, k) if child else None)
        indices("layers", sel.layers, p("layers"), c("layers"))
        indices("hidden", sel.hidden, p("hidden"), c("hidden"))
        for k in ("ffn", "heads", "kv_heads"):
            per_layer = getattr(sel, k)
            if not isinstance(per_layer, list) or len(per_layer) != len(sel.layers):
                fail(f"{k} does not hold one list per kept layer")
            for j, v in enumerate(per_layer):
                indices(f"{k} of layer {j}", v, p(k), c(k))
        return sel

    @classmethod
    def full(cls, shape: Shape) -> "Selection":
        r = lambda n: list(range(n))  # noqa: E731
        return cls(
            r(shape.layers),
            r(shape.hidden),
            [r(shape.ffn)] * shape.layers,
            [r(shape.heads)] * shape.layers,
            [r(shape.kv_heads)] * shape.layers,
        )

    def then(self, child: "Selection") -> "Selection":
        """``child`` (indices into this selection's model) expressed in this
        selection's parent: the lineage of a grandchild."""
        return Selection(
            [self.layers[i] for i in child.layers],
            [self.hidden[i] for i in child.hidden],
            [[self.ffn[lay][i] for i in child.ffn[j]] for j, lay in enumerate(child.layers)],
            [[self.heads[lay][i] for i in child.heads[j]] for j, lay in enumerate(child.layers)],
            [[self.kv_heads[lay][i] for i in child.kv_heads[j]] for j, lay in enumerate(child.layers)],
        )

    def shape(self, parent: Shape) -> Shape:
        return Shape(
            len(self.layers),
            len(self.hidden),
            len(self.ffn[0]) if self.ffn else parent.ffn,
            len(self.heads[0]) if self.heads else parent.heads,
            len(self.kv_heads[0]) if self.kv_heads else parent.kv_heads,
            parent.head_dim,
            parent.vocab,
        )


@dataclass
class AxisMaps:
    """``out[dest] = in[src]`` per axis. ``layers[j]`` is the input layer of
    output layer j (None: a new, zero layer); per-layer maps are indexed by
    output layer. Head maps are in heads, expanded to channels per tensor."""

    layers: list[int | None]
    hidden: tuple[np.ndarray, np.ndarray]
    ffn: list[tuple[np.ndarray, np.ndarray] | None]
    heads: list[tuple[np.ndarray, np.ndarray] | None]
    kv_heads: list[tuple[np.ndarray, np.ndarray] | None]


def _heads_to_channels(heads: np.ndarray, size: int) -> np.ndarray:
    return (np.asarray(heads, dtype=np.int64)[:, None] * size + np.arange(size)).reshape(-1)


def _axis_index(label, side: int, maps: AxisMaps, j: int | None, shape: Shape, dim: int):
    """Index array on one side (0 dest, 1 src) of one axis; None = whole axis."""
    hd = shape.head_dim
    if label == "hidden":
        return maps.hidden[side]
    if label is None or label == "vocab":
        return None
    per_layer = {"ffn": maps.ffn, "q": maps.heads, "qkv": maps.heads, "hqkv": maps.heads,
                 "kv": maps.kv_heads}[label]
    m = per_layer[j]
    if m is None:
        return None
    heads = m[side]
    if label == "ffn":
        return np.asarray(heads, dtype=np.int64)
    if label in ("q", "kv"):
        return _heads_to_channels(heads, hd)
    if label == "hqkv":
        return _heads_to_channels(heads, 3 * hd)
    q = _heads_to_channels(heads, hd)  # qkv: [q | k | v] blocks of heads * hd
    n = shape.heads * hd
    return np.concatenate([q, q + n, q + 2 * n])


def iter_remap(
    family: Family,
    weights: dict[str, np.ndarray],
    in_shape: Shape,
    out_shape: Shape,
    maps: AxisMaps,
    norm_scale: float = 1.0,
):
    """The one gather/scatter behind Subset and Expand: yields (name, tensor)
    one tensor at a time, in a fixed order, so callers can stream."""
    template = {k: v.shape for k, v in weights.items()}
    out_shapes = param_shapes(family, template, out_shape)
    for name, new_shape in sorted(out_shapes.items()):
        j, local = layer_local_name(family, name)
        if j is None:
            src_name = name
        else:
            src_layer = maps.layers[j]
            if src_layer is None:
                yield name, np.zeros(new_shape, dtype=np.float32)
                continue
            src_name = f"{family.layers_prefix}.{src_layer}.{local}"
        src = weights[src_name]
        labels = family.axes_of(name)
        dest_idx = [_axis_index(a, 0, maps, j, out_shape, d) for a, d in zip(labels, new_shape)]
        src_idx = [_axis_index(a, 1, maps, j, in_shape, d) for a, d in zip(labels, src.shape)]
        dest_idx = [np.arange(d) if i is None else i for i, d in zip(dest_idx, new_shape)]
        src_idx = [np.arange(d) if i is None else i for i, d in zip(src_idx, src.shape)]
        if any(len(a) != len(b) for a, b in zip(dest_idx, src_idx)):
            raise CBDError(f"internal shape mismatch while remapping {name}")
        if all(len(d) == n and np.array_equal(d, np.arange(n)) for d, n in zip(dest_idx, new_shape)):
            t = src
            for axis, idx in enumerate(src_idx):  # a gather per axis beats np.ix_
                if not (len(idx) == t.shape[axis] and np.array_equal(idx, np.arange(len(idx)))):
                    t = np.take(t, idx, axis=axis)
            t = t.astype(np.float32, copy=t is src)
        else:
            t = np.zeros(new_shape, dtype=np.float32)
            full_src = all(len(i) == n and np.array_equal(i, np.arange(n)) for i, n in zip(src_idx, src.shape))
            t[np.ix_(*dest_idx)] = src if full_src else src[np.ix_(*src_idx)]
        if norm_scale != 1.0 and family.is_norm(name):
            t *= norm_scale
        yield name, t


def subset(family: Family, weights: dict, parent: Shape, sel: Selection) -> dict[str, np.ndarray]:
    """Subset(B -> T): keep the selected layers and channels of the parent."""
    return dict(iter_subset(family, weights, parent, sel))


def iter_subset(family: Family, weights: dict, parent: Shape, sel: Selection):
    """Subset, one (name, tensor) at a time."""
    child = sel.shape(parent)
    ar = lambda n: np.arange(n)  # noqa: E731
    maps = AxisMaps(
        layers=list(sel.layers),
        hidden=(ar(child.hidden), np.asarray(sel.hidden)),
        ffn=[(ar(len(f)), np.asarray(f)) for f in sel.ffn],
        heads=[(ar(len(h)), np.asarray(h)) for h in sel.heads],
        kv_heads=[(ar(len(k)), np.asarray(k)) for k in sel.kv_heads],
    )
    yield from iter_remap(family, weights, parent, child, maps)


def iter_compensate(family: Family, subsetted, weights: dict, parent: Shape, sel: Selection, grams: dict,
                    ridge: float | None = None):
    """Subset's (name, tensor) stream with every projection that reads the FFN
    corrected for the channels it lost: the removed inputs are predicted from
    the kept ones by least squares on calibration activations (``grams``:
    X^T X per parent weight), ``x_R ~ A x_K`` with ``A = G_RK (G_KK + l I)^-1``,
    so ``W_K`` becomes ``W_K + W_R A`` (the output a pruned layer would have
    lost, in the span of what it keeps). Nothing removed: unchanged."""
    prefix = family.layers_prefix
    ridge = COMPENSATE_RIDGE if ridge is None else ridge
    for name, t in subsetted:
        j, local = layer_local_name(family, name)
        labels = family.axes_of(name)
        if j is None or len(labels) != 2 or labels[-1] != "ffn" or labels[0] != "hidden":
            yield name, t
            continue
        src = f"{prefix}.{sel.layers[j]}.{local}"
        keep = np.asarray(sel.ffn[j])
        gone = np.setdiff1d(np.arange(parent.ffn), keep)
        g = grams.get(src)
        if len(gone) == 0 or g is None:
            yield name, t
            continue
        g = g.astype(np.float64)
        g_kk = g[np.ix_(keep, keep)]
        g_kk[np.diag_indices_from(g_kk)] += ridge * float(np.mean(np.diag(g_kk))) + 1e-12
        a = np.linalg.solve(g_kk, g[np.ix_(keep, gone)]).T  # (gone, keep)
        w = np.asarray(weights[src], dtype=np.float64)[np.asarray(sel.hidden)]
        yield name, (t + (w[:, gone] @ a).astype(t.dtype)).astype(t.dtype)


def expand(family: Family, weights: dict, small: Shape, big: Shape, place: Selection) -> dict:
    """Expand(S -> T), see ``iter_expand``."""
    return dict(iter_expand(family, weights, small, big, place))


def iter_expand(family: Family, weights: dict, small: Shape, big: Shape, place: Selection):
    """Expand(S -> T), one (name, tensor) at a time: put S's weights at ``place`` (S's positions in T's
    coordinates); other positions are zero, missing layers are residual
    identities, norm gains are rescaled so zero channels keep the statistics.

    kv heads follow the query heads: T's kv head for a placed query head holds
    that head's S kv head (replicated when T has smaller query groups).
    """
    if len(place.hidden) != small.hidden or len(place.layers) != small.layers:
        raise CBDError("placement does not match the smaller model's shape")
    layers: list[int | None] = [None] * big.layers
    ffn: list = [None] * big.layers
    heads: list = [None] * big.layers
    kv: list = [None] * big.layers
    g_small = small.heads // small.kv_heads
    g_big = big.heads // big.kv_heads
    for i, j in enumerate(place.layers):
        layers[j] = i
        ffn[j] = (np.asarray(place.ffn[i]), np.arange(small.ffn))
        q_dest = np.asarray(place.heads[i])
        heads[j] = (q_dest, np.arange(small.heads))
        kv_of = {}
        for h, p in enumerate(q_dest):
            t_kv, s_kv = int(p) // g_big, h // g_small
            if kv_of.setdefault(t_kv, s_kv) != s_kv:
                raise CBDError(
                    "cannot expand: query heads of different kv groups land in one kv group of the target"
                )
        kv_dest = np.array(sorted(kv_of), dtype=np.int64)
        kv[j] = (kv_dest, np.array([kv_of[k] for k in kv_dest], dtype=np.int64))
    maps = AxisMaps(layers, (np.asarray(place.hidden), np.arange(small.hidden)), ffn, heads, kv)
    scale = float(np.sqrt(small.hidden / big.hidden))
    new = np.setdiff1d(np.arange(big.hidden), np.asarray(place.hidden))
    for name, t in iter_remap(family, weights, small, big, maps, norm_scale=scale):
        if len(new) and family.writes_residual(name):
            _fill_residual_mean(family, name, t, place.hidden, new)
        yield name, t


def _fill_residual_mean(family: Family, name: str, t: np.ndarray, placed, new: np.ndarray) -> None:
    """LayerNorm families: new residual channels get the mean of the placed
    ones in every tensor that writes the residual stream, so each new channel
    carries the per-token mean. LayerNorm's mean is then unchanged and its
    variance scales by d_S / d_T, which the gain and epsilon scaling undo:
    Expand stays exact (the new channels' gains are zero, nothing reads them)."""
    axis = family.axes_of(name).index("hidden")
    mean = np.take(t, np.asarray(placed), axis=axis).mean(axis=axis, keepdims=True)
    index = [slice(None)] * t.ndim
    index[axis] = new
    t[tuple(index)] = np.broadcast_to(mean, t[tuple(index)].shape)


def blend(expanded: dict, subsetted: dict, alpha: float) -> dict[str, np.ndarray]:
    """theta_T = alpha * Expand(S) + (1 - alpha) * Subset(B)."""
    if expanded.keys() != subsetted.keys():
        raise CBDError("Expand and Subset produced different parameter sets")
    return {k: blend_tensor(expanded[k], subsetted[k].copy(), alpha) for k in expanded}


def blend_tensor(e: np.ndarray, s: np.ndarray, alpha: float) -> np.ndarray:
    """alpha * e + (1 - alpha) * s, computed in place in ``s``."""
    if alpha == 1.0:
        return e
    if alpha != 0.0:
        s *= np.float32(1.0 - alpha)
        s += np.float32(alpha) * e
    return s
