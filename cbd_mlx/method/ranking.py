"""Activation statistics on calibration text: importance rankings (Minitron
style) for pruning and Subset, and activation matching to align the channels
of two models that have no lineage.

Statistics are read generically through the axis map: the mean |input| of
every linear layer whose input axis is ``hidden`` ranks residual channels,
inputs on ``ffn`` rank MLP channels, inputs on ``q`` rank heads; each block's
input/output cosine ranks layers (block influence, as in ShortGPT).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..arch.anchor import Anchor, all_finite, model_from_weights
from ..arch.families import Family, layer_local_name
from ..arch.shapes import Shape
from ..errors import CBDError
from .operators import Selection

SAMPLE_ROWS = 512  # token rows kept per linear input for activation matching


@dataclass
class Stats:
    mean_abs: dict[str, np.ndarray]  # linear weight name -> mean |x| per input channel
    samples: dict[str, np.ndarray]  # linear weight name -> (rows, in) activations
    layer_influence: np.ndarray  # 1 - cos(block input, block output), per layer
    grams: dict[str, np.ndarray] | None = None  # linear weight name -> X^T X of its inputs (ffn inputs, on request)


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@contextmanager
def _recording(model: nn.Module, family: Family, grams: bool = False):
    names = _module_names(model)
    gram: dict[str, np.ndarray] = {}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    samples: dict[str, list] = {}
    influence: dict[int, list] = {}
    blocks = model
    for part in family.layers_prefix.split("."):
        blocks = blocks[part] if isinstance(blocks, dict) else getattr(blocks, part)
    block_index = {id(b): i for i, b in enumerate(blocks)}
    block_cls = type(blocks[0])
    orig_linear, orig_block = nn.Linear.__call__, block_cls.__call__

    def linear_call(self, x):
        name = names.get(id(self))
        if name is not None:
            flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
            s = np.array(mx.abs(flat).sum(axis=0))
            key = name + ".weight"
            sums[key] = sums.get(key, 0) + s
            counts[key] = counts.get(key, 0) + flat.shape[0]
            if grams and family.axes_of(key)[-1] == "ffn":
                g = mx.matmul(flat.T, flat)
                gram[key] = gram[key] + np.array(g) if key in gram else np.array(g)
            have = sum(len(r) for r in samples.get(key, []))
            if have < SAMPLE_ROWS:
                samples.setdefault(key, []).append(np.array(flat[: SAMPLE_ROWS - have]))
        return orig_linear(self, x)

    def block_call(self, x, *args, **kwargs):
        out = orig_block(self, x, *args, **kwargs)
        i = block_index.get(id(self))
        if i is not None:
            a, b = x.astype(mx.float32), out.astype(mx.float32)
            cos = (a * b).sum(-1) / (mx.linalg.norm(a, axis=-1) * mx.linalg.norm(b, axis=-1) + 1e-6)
            influence.setdefault(i, []).append(float((1 - cos).mean()))
        return out

    nn.Linear.__call__ = linear_call
    block_cls.__call__ = block_call
    result = {}
    try:
        yield result
    finally:
        nn.Linear.__call__ = orig_linear
        block_cls.__call__ = orig_block
    result["stats"] = Stats(
        {k: sums[k] / counts[k] for k in sums},
        {k: np.concatenate(v) for k, v in samples.items()},
        np.array([np.mean(influence.get(i, [0.0])) for i in range(len(blocks))]),
        gram if grams else None,
    )


def collect_stats(anchor: Anchor, batches: np.ndarray, batch_size: int = 4, grams: bool = False) -> Stats:
    """Run the anchor on calibration batches and record activation statistics
    (with ``grams``, also X^T X of every input on the ffn axis)."""
    model = model_from_weights(anchor.config, anchor.weights)
    with _recording(model, anchor.family, grams) as rec:
        for i in range(0, len(batches), batch_size):
            mx.eval(model(mx.array(batches[i : i + batch_size])))
    st = rec["stats"]
    parts = [*st.mean_abs.values(), *st.samples.values(), st.layer_influence, *(st.grams or {}).values()]
    if not all(all_finite(np.asarray(p)) for p in parts):  # finite weights whose activations overflow
        raise CBDError(f"{anchor.source}: its activations on the calibration text overflow to NaN or Inf, so its "
                       "weights are damaged or out of range; check it with `cbd-mlx eval`")
    return st


def importance(family: Family, shape: Shape, stats: Stats) -> dict:
    """Per-axis importance scores (higher = keep) from activation statistics."""
    hidden = np.zeros(shape.hidden)
    ffn = np.zeros((shape.layers, shape.ffn))
    heads = np.zeros((shape.layers, shape.heads))
    for name, m in stats.mean_abs.items():
        labels = family.axes_of(name)
        layer, _ = layer_local_name(family, name)
        in_axis = labels[-1]
        if in_axis == "hidden":
            hidden += m
        elif in_axis == "ffn" and layer is not None:
            ffn[layer] += m
        elif in_axis == "q" and layer is not None:
            heads[layer] += np.linalg.norm(m.reshape(shape.heads, shape.head_dim), axis=1)
    group = shape.heads // shape.kv_heads
    kv = heads.reshape(shape.layers, shape.kv_heads, group).sum(-1)
    return {"layers": stats.layer_influence, "hidden": hidden, "ffn": ffn, "heads": heads, "kv_heads": kv}


def rankings(scores: dict) -> dict:
    """Descending orders (JSON-able lists) of every importance score."""
    rank = lambda s: [int(i) for i in np.argsort(-np.asarray(s), kind="stable")]  # noqa: E731
    return {
        "layers": rank(scores["layers"]),
        "hidden": rank(scores["hidden"]),
        "ffn": [rank(s) for s in scores["ffn"]],
        "kv_heads": [rank(s) for s in scores["kv_heads"]],
    }


def uniform_rankings(shape: Shape) -> dict:
    """Orders that spread any top-k evenly over the axis (Weight Selection)."""

    def spread(n: int) -> list[int]:
        order, seen = [], set()
        k = 1
        while len(order) < n:
            for i in np.linspace(0, n - 1, k).round().astype(int):
                if int(i) not in seen:
                    seen.add(int(i))
                    order.append(int(i))
            k = min(2 * k, n) if k < n else k + 1
        return order

    return {
        "layers": spread(shape.layers),
        "hidden": spread(shape.hidden),
        "ffn": [spread(shape.ffn)] * shape.layers,
        "kv_heads": [spread(shape.kv_heads)] * shape.layers,
    }


def _extend(required, ranking, k: int, what: str) -> list[int]:
    chosen = list(dict.fromkeys(int(i) for i in required))
    if len(chosen) > k:
        raise CBDError(f"the target keeps {k} {what} but the smaller anchor already maps to {len(chosen)}")
    taken = set(chosen)
    for i in ranking:
        if len(chosen) == k:
            break
        if i not in taken:
            chosen.append(int(i))
            taken.add(int(i))
    if len(chosen) < k:
        raise CBDError(f"the parent has too few {what} for the target ({k})")
    return sorted(chosen)


def select(parent: Shape, target: Shape, ranks: dict, required: Selection | None = None) -> Selection:
    """The parent's parts a target shape keeps: the ``required`` ones (a
    smaller anchor's lineage) plus the best-ranked others.

    Query heads are kept as whole kv groups, so the target's query group size
    is the parent's.
    """
    group = parent.heads // parent.kv_heads
    if target.heads != target.kv_heads * group:
        raise CBDError(
            f"target heads/kv_heads ({target.heads}/{target.kv_heads}) must keep the parent's group size {group}"
        )
    req_layers = required.layers if required else []
    layers = _extend(req_layers, ranks["layers"], target.layers, "layers")
    hidden = _extend(required.hidden if required else [], ranks["hidden"], target.hidden, "hidden channels")
    ffn, heads, kv = [], [], []
    for b in layers:
        i = req_layers.index(b) if b in req_layers else None
        req_ffn = required.ffn[i] if i is not None else []
        ffn.append(_extend(req_ffn, ranks["ffn"][b], target.ffn, "ffn channels"))
        req_kv = required.kv_heads[i] if i is not None else []
        if i is not None:  # kv groups holding the required query heads
            req_kv = list(req_kv) + [h // group for h in required.heads[i]]
        kvs = _extend(req_kv, ranks["kv_heads"][b], target.kv_heads, "kv heads")
        kv.append(kvs)
        heads.append([k * group + r for k in kvs for r in range(group)])
    return Selection(layers, hidden, ffn, heads, kv)


def placement(parent_sel: Selection, child_lineage: Selection) -> Selection:
    """Where a child's parts sit inside a target selected from the same parent."""
    def pos(full, part):
        where = {int(v): i for i, v in enumerate(full)}
        return [where[int(p)] for p in part]

    layer_pos = pos(parent_sel.layers, child_lineage.layers)
    return Selection(
        layer_pos,
        pos(parent_sel.hidden, child_lineage.hidden),
        [pos(parent_sel.ffn[j], f) for j, f in zip(layer_pos, child_lineage.ffn)],
        [pos(parent_sel.heads[j], h) for j, h in zip(layer_pos, child_lineage.heads)],
        [pos(parent_sel.kv_heads[j], k) for j, k in zip(layer_pos, child_lineage.kv_heads)],
    )


def _match(small: np.ndarray, big: np.ndarray, center: bool = True, *more) -> np.ndarray:
    """For each column of ``small`` the column of ``big`` it matches best
    (one-to-one, maximum total |correlation|, or |cosine| without centering).
    ``more`` adds further (small, big) views; their similarities are summed."""
    from scipy.optimize import linear_sum_assignment

    def z(a):
        a = a - a.mean(0) if center else a
        return a / (np.linalg.norm(a, axis=0) + 1e-8)

    corr = np.abs(z(small).T @ z(big))
    for s_view, b_view in zip(more[::2], more[1::2]):
        corr += np.abs(z(s_view).T @ z(b_view))
    rows, cols = linear_sum_assignment(-corr)
    out = np.empty(small.shape[1], dtype=np.int64)
    out[rows] = cols
    return out


HEAD_LABELS = ("q", "qkv", "hqkv")


def _units(anchor: Anchor, layer: int, kind: str, hidden_map: np.ndarray | None) -> np.ndarray:
    """(features, units) matrix of ``layer``: every tensor with an axis of
    ``kind`` ("ffn", "heads" or "kv"), cut into units (channels, query heads,
    kv heads) along it; the hidden axis is put in the smaller model's order
    by ``hidden_map`` (bigger model only)."""
    fam, shape = anchor.family, anchor.shape
    wanted = HEAD_LABELS if kind == "heads" else (kind,)
    n_units = {"ffn": shape.ffn, "heads": shape.heads, "kv": shape.kv_heads}[kind]
    cols = []
    for name, t in sorted(anchor.weights.items()):
        li, _ = layer_local_name(fam, name)
        labels = fam.axes_of(name)
        label = next((a for a in labels if a in wanted), None)
        if li != layer or label is None:
            continue
        if hidden_map is not None and "hidden" in labels:
            t = np.take(t, hidden_map, axis=labels.index("hidden"))
        t = np.moveaxis(t, labels.index(label), 0)
        if label == "qkv":  # [q | k | v] blocks -> per head (q_h, k_h, v_h)
            t = t.reshape(3, n_units, -1).transpose(1, 0, 2)
        cols.append(t.reshape(n_units, -1))
    return np.concatenate(cols, axis=1).T


def align(small: Anchor, big: Anchor, batches: np.ndarray) -> Selection:
    """A lineage for ``small`` in ``big``'s coordinates, for public
    checkpoints with no lineage.

    Layers map by relative depth. Residual channels are matched by the
    correlation of activations on the same calibration tokens (the inputs of
    every linear reading the residual stream, over mapped layers). With the
    residual stream aligned, FFN channels, kv groups and query heads of each
    mapped layer are matched by the cosine of their weights.
    """
    fam = small.family
    s, b = small.shape, big.shape
    st_s, st_b = collect_stats(small, batches), collect_stats(big, batches)
    layers = [int(round(i * (b.layers - 1) / max(s.layers - 1, 1))) for i in range(s.layers)]
    if len(set(layers)) != len(layers):
        raise CBDError("the smaller anchor has more layers than the bigger one")

    names = [
        n for n in sorted(st_s.samples)
        if layer_local_name(fam, n)[0] is not None and fam.axes_of(n)[-1] == "hidden"
    ]
    # the input embedding is the residual stream at layer 0 over every token
    emb_name = _first_embedding(fam, small)
    hidden = _match(
        np.concatenate([st_s.samples[n] for n in names]),
        np.concatenate([st_b.samples[_rename(fam, n, layers)] for n in names]),
        True,
        small.weights[emb_name],
        big.weights[emb_name],
    )
    g_s, g_b = s.heads // s.kv_heads, b.heads // b.kv_heads
    has_kv = any("kv" in labels for _, labels in fam.axes)
    ffn, heads, kv = [], [], []
    for i, lb in enumerate(layers):
        ffn.append(_match(_units(small, i, "ffn", None), _units(big, lb, "ffn", hidden), center=False).tolist())
        qs, qb = _units(small, i, "heads", None), _units(big, lb, "heads", hidden)
        if has_kv and g_s <= g_b:  # match kv groups, then query heads inside them
            gs = np.concatenate([_units(small, i, "kv", None), _group(qs, s.kv_heads)])
            gb = np.concatenate([_units(big, lb, "kv", hidden), _group(qb, b.kv_heads)])
            kvmap = _match(gs, gb, center=False)
            qmap = []
            for k in range(s.kv_heads):
                own = list(range(k * g_s, (k + 1) * g_s))
                cand = list(range(kvmap[k] * g_b, (kvmap[k] + 1) * g_b))
                m = _match(qs[:, own], qb[:, cand], center=False)
                qmap += [cand[j] for j in m]
        else:
            qmap = _match(qs, qb, center=False).tolist()
            kvmap = [qmap[k * g_s] // g_b for k in range(s.kv_heads)]
        heads.append([int(h) for h in qmap])
        kv.append([int(k) for k in kvmap])
    return Selection(layers, [int(h) for h in hidden], ffn, heads, kv)


def _group(units: np.ndarray, groups: int) -> np.ndarray:
    """(features, heads) -> (features * heads_per_group, groups)."""
    f, n = units.shape
    return units.reshape(f, groups, n // groups).transpose(0, 2, 1).reshape(-1, groups)


def _first_embedding(family: Family, anchor: Anchor) -> str:
    """The name of the input embedding (the first (vocab, hidden) tensor)."""
    return next(n for n in sorted(anchor.weights) if family.axes_of(n) == ("vocab", "hidden"))


def _rename(family: Family, name: str, layers: list[int]) -> str:
    i, local = layer_local_name(family, name)
    return f"{family.layers_prefix}.{layers[i]}.{local}"
