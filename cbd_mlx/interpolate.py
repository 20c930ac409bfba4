"""Parameter interpolation: a model of any size between two adjacent anchors.

theta_T = alpha * Expand(theta_S) + (1 - alpha) * Subset(theta_B), with the
channels of S and of Subset(B) aligned by S's lineage (or by activation
matching when S has none).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ._version import __version__
from .chain import DEFAULT_ONLINE, default_chain, find_chain, load_chain_anchor
from .errors import CBDError
from .save import refuse_existing
from .families import layer_local_name
from .loader import (Anchor, Built, all_finite, anchor_sha256, check_weights_finite, load_anchor, model_from_weights,
                     same_tokenizer)
from .operators import Selection, blend, blend_tensor, expand, iter_compensate, iter_expand, iter_subset
from .prune import child_shape, prune_weights
from .selection import (DEFAULT_CALIB, INIT_CALIB, align, calibration_from, collect_stats, importance, placement,
                        rankings, select, uniform_rankings)
from .shapes import Shape, config_for, count_params, format_size, param_shapes, size_of, solve_shape

ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
SCORE_BATCHES = 2  # calibration windows the alpha grid is scored on
# init's defaults, chosen on the out-of-domain suite (results/smollm2-mini/shape_rules.json): keeping the bigger
# anchor's depth and compensating its pruned FFN beat the proportional shape at 55M (4.46 vs 5.87), 70M (3.59 vs
# 3.93), 90M (2.78 vs 3.00), 115M (1.88 vs 1.90) and 120M (1.57 vs 1.82)
SHAPE_RULE = "deep"
COMPENSATE = True


@dataclass
class InitResult:
    weights: dict[str, np.ndarray]  # or, when streamed, a sorted (name, array) generator
    config: dict
    shape: Shape
    alpha: float
    n_params: int
    info: dict = field(default_factory=dict)
    shapes: dict | None = None  # parameter shapes (set when streamed)


def check_compatible(big: Anchor, small: Anchor) -> None:
    """Refuse anchors that cannot be blended: family, vocab, head_dim, order."""
    if big.family.name != small.family.name:
        raise CBDError(
            f"anchors belong to different families ({big.family.name} vs {small.family.name}); "
            "use two anchors of one chain"
        )
    if big.shape.vocab != small.shape.vocab:
        raise CBDError(
            f"anchors have different vocabularies ({big.shape.vocab} vs {small.shape.vocab} tokens); "
            "a chain shares one tokenizer"
        )
    if big.shape.head_dim != small.shape.head_dim:
        raise CBDError(
            f"anchors have different head_dim ({big.shape.head_dim} vs {small.shape.head_dim}); "
            "interpolation keeps head_dim fixed"
        )
    kinds = lambda a: {layer_local_name(a.family, k)[1] for k in a.weights}  # noqa: E731
    if kinds(big) != kinds(small):
        raise CBDError(
            "anchors have different parameter sets (e.g. one ties its embeddings); they are not one chain"
        )
    if small.n_params >= big.n_params:
        raise CBDError(f"'{small.source}' is not smaller than '{big.source}'; give the bigger anchor first")


def default_alpha(n_big: int, n_small: int, n_target: int) -> float:
    """alpha = (N_B - N_T) / (N_B - N_S): the relative distance in parameters."""
    return float(np.clip((n_big - n_target) / (n_big - n_small), 0.0, 1.0))


def has_lineage(small: Anchor, big: Anchor) -> bool:
    """Whether ``small`` was pruned from exactly ``big`` (by weights sha256)."""
    lin = small.lineage
    return bool(lin and lin.get("parent_sha256") and lin["parent_sha256"] == anchor_sha256(big))


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


def finite(name: str, t: np.ndarray, big: Anchor, small: Anchor) -> tuple[str, np.ndarray]:
    """(name, t), refusing NaN/Inf (which can only come from a damaged anchor)."""
    if not all_finite(t):
        raise CBDError(
            f"{name} of the result holds NaN or Inf: '{big.source}' or '{small.source}' is damaged; "
            "check them with `cbd-mlx eval`"
        )
    return name, t


def prefetch(gen, depth: int = 2):
    """Run a generator in a background thread, ``depth`` items ahead (numpy
    gathers drop the GIL, so Subset and Expand use both cores)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def run():
        try:
            for item in gen:
                q.put(item)
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    threading.Thread(target=run, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def target_config(big: Anchor, small: Anchor, target: Shape, alpha: float) -> dict:
    """The bigger anchor's config at ``target``. The norms' epsilon is blended
    like a parameter: Expand scales S's epsilon by d_S / d_T, which keeps
    RMSNorm exact over the zero channels (mean(x^2) shrinks by that ratio)."""
    cfg = config_for(big.family, big.config, target)
    key = big.family.eps_key
    eps_b = float(big.config.get(key, 1e-5))
    eps_s = float(small.config.get(key, eps_b))
    cfg[key] = alpha * eps_s * small.shape.hidden / target.hidden + (1 - alpha) * eps_b
    return cfg


def calib_loss(config: dict, weights: dict, batches: np.ndarray) -> float:
    """Mean next-token cross-entropy of ``weights`` on calibration batches."""
    model = model_from_weights(config, weights)
    total, n = 0.0, 0
    for b in batches:
        x = mx.array(b[None])
        logits = model(x[:, :-1])
        loss = nn.losses.cross_entropy(logits.astype(mx.float32), x[:, 1:], reduction="sum")
        total += float(loss)
        n += x.shape[1] - 1
    return total / n


def interpolate(
    big: Anchor,
    small: Anchor,
    target: Shape,
    alpha: float | str | None = None,
    batches: np.ndarray | None = None,
    log=print,
    stream: bool = False,
    compensate: bool = False,
) -> InitResult:
    """Build theta_T for ``target`` from a bigger and a smaller anchor.

    With ``compensate`` (and calibration ``batches``) Subset(big) corrects the
    projections that read pruned FFN channels (``operators.iter_compensate``).
    With ``stream`` (and a numeric alpha) the weights come as a generator of
    (name, tensor) so a writer can consume them one at a time."""
    t0 = time.time()
    check_compatible(big, small)
    sel_s, ranks, how = lineage_of(small, big, batches)
    sel_t = select(big.shape, target, ranks, required=sel_s)
    place = placement(sel_t, sel_s)
    n_t = count_params(big.family, big.template, target)
    a0 = default_alpha(big.n_params, small.n_params, n_t)
    scores = {}
    grams = None
    if compensate and batches is not None:
        # fitted on other windows than the alpha grid is scored on (SCORE_BATCHES): scored on its own fit, an
        # over-fitted Subset looked best (85M: alpha 0 by calibration, 3.45x the source on the suite, against
        # 3.10x at 80M)
        fit = batches[SCORE_BATCHES:] if len(batches) > 2 * SCORE_BATCHES else batches
        grams = collect_stats(big, fit, grams=True).grams

    def big_subset():
        parts = iter_subset(big.family, big.weights, big.shape, sel_t)
        return iter_compensate(big.family, parts, big.weights, big.shape, sel_t, grams) if grams else parts

    if alpha == "auto":
        if batches is None:
            raise CBDError("--alpha auto needs calibration text: pass --calib FILE")
        sub = dict(big_subset())
        exp = expand(small.family, small.weights, small.shape, target, place)
        for a in sorted(set(ALPHA_GRID) | {round(a0, 4)}):
            scores[a] = calib_loss(target_config(big, small, target, a), blend(exp, sub, a),
                                  batches[:SCORE_BATCHES])
            log(f"  alpha={a:.3f}  calibration loss={scores[a]:.4f}")
        a = min(scores, key=scores.get)
        weights = blend(exp, sub, a)
    else:
        a = a0 if alpha is None else float(alpha)
        if not 0.0 <= a <= 1.0:
            raise CBDError(f"--alpha {a} is outside [0, 1]")
        pairs = zip(  # both in sorted name order, a few tensors of each alive at a time
            prefetch(big_subset()),
            iter_expand(small.family, small.weights, small.shape, target, place),
        )
        weights = (finite(name, blend_tensor(e_t, s_t, a), big, small) for (name, s_t), (_, e_t) in pairs)
        if not stream:
            weights = dict(weights)
    info = {
        "alignment": how,
        "compensated": grams is not None,
        "default_alpha": a0,
        "alpha_scores": {str(k): v for k, v in scores.items()},
        "selection_in_big": sel_t.to_json(),
        "seconds": round(time.time() - t0, 2),
    }
    shapes = param_shapes(big.family, big.template, target)
    return InitResult(weights, target_config(big, small, target, a), target, a, n_t, info, shapes)


def grow(anchor: Anchor, target: Shape) -> tuple[dict[str, np.ndarray], dict]:
    """Function-preserving growth of an anchor (Expand with no blend):
    (weights, config)."""
    s = anchor.shape
    if target.heads % target.kv_heads:
        raise CBDError("target heads must be a multiple of kv_heads")
    spread = lambda n, m: [int(i) for i in np.linspace(0, m - 1, n).round()]  # noqa: E731
    g_t = target.heads // target.kv_heads
    g_s = s.heads // s.kv_heads
    if g_t > g_s or g_s % g_t:
        raise CBDError(f"cannot grow query groups of {g_s} into groups of {g_t}")
    kv_pos = list(range(s.kv_heads * (g_s // g_t)))
    heads_pos = [k * g_t + r for k in kv_pos for r in range(g_t)][: s.heads]
    place = Selection(
        spread(s.layers, target.layers),
        list(range(s.hidden)),
        [list(range(s.ffn))] * s.layers,
        [heads_pos] * s.layers,
        [kv_pos] * s.layers,
    )
    return expand(anchor.family, anchor.weights, s, target, place), target_config(anchor, anchor, target, 1.0)


GROW_LIMIT = 0.10  # sizes up to 10% above a chain's largest anchor are grown with no --extrapolate
CALIB_TOKENS_INIT = 2048


def _online_hint(chain, n: int) -> str:
    """Where the online chain would interpolate ``n`` instead ('' when it cannot)."""

    if chain.name == DEFAULT_ONLINE:
        return ""
    try:
        online = find_chain(DEFAULT_ONLINE)
        big, small = online.bracket(n)
    except CBDError:
        return ""
    return (f"; the online chain '{online.name}' interpolates it between {small.name} and {big.name} "
            f"(pass --chain {online.name} with both in the Hugging Face cache or the hub reachable; "
            f"{format_size(big.params)} to download)")


def _edge_init(source: str, n: int, calib, calib_tokens: int, fixed: dict, chain_info, log, why: str):
    """Sizes beyond the anchors: Subset of the smallest one below it, Expand
    (function-preserving growth) of the largest one above it; no blend."""
    from dataclasses import replace


    a = load_anchor(source)
    if n < a.n_params:
        shape = child_shape(a, n, fixed)
        log(f"warning: {format_size(n)} is below the smallest anchor ({format_size(a.n_params)}): Subset of it "
            "only, no blend (Weight Selection-style); expect a weaker start than an interpolated size")
        if calib is None:

            calib = DEFAULT_CALIB
        weights, lineage = prune_weights(a, shape, calibration_from(a.path, calib, calib_tokens))
        cfg, mode, extra = config_for(a.family, a.config, shape), "subset-below", {"lineage": lineage}
    else:
        s = a.shape
        ceiling = replace(s, layers=4 * s.layers, hidden=4 * s.hidden, ffn=4 * s.ffn, heads=4 * s.heads,
                          kv_heads=4 * s.kv_heads)
        shape = solve_shape(a.family, a.template, s, ceiling, n, fixed)
        log(why or (f"warning: {format_size(n)} is above the largest anchor ({format_size(a.n_params)}): "
                    "function-preserving growth of it, no blend; the new capacity starts empty and needs training"))
        weights, cfg = grow(a, shape)
        mode, extra = "grow-above", {}
    n_out = count_params(a.family, a.template, shape)
    prov = {"kind": "init", "mode": mode, "chain": chain_info,
            "anchors": {"edge": {"source": source, "params": a.n_params}}, "shape": shape.as_dict(),
            "params": n_out, "requested": n, "history": [], "cbd_mlx": __version__, **extra}
    return Built(cfg, weights, a.path, prov)


def _parse_alpha(alpha) -> float | str | None:
    """'auto' (the default), None (the distance rule) or a number in [0, 1]."""
    # default: the best of a grid on calibration text. On the embedded chain the parameter-distance rule
    # ("distance") gave inits worse than either anchor alone (70M: 471 vs Subset 72, Expand 98 held-out ppl)
    alpha = "auto" if alpha is None else None if alpha == "distance" else alpha
    if alpha in (None, "auto"):
        return alpha
    try:
        if isinstance(alpha, bool):
            raise TypeError  # True is not a blend weight
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise CBDError(f"--alpha must be a number in [0, 1], 'auto' or 'distance', not '{alpha}'") from None
    if not 0.0 <= alpha <= 1.0:
        raise CBDError(f"--alpha {alpha} is outside [0, 1]")
    return alpha


def _chain_pair(chain: str | None, n: int, extrapolate: bool, log):
    """(chain, bigger entry, smaller entry) around ``n``, or (chain, edge entry,
    note) for a size beyond the chain that may be grown or Subset."""
    if chain:
        c = find_chain(chain)
    else:
        c, why = default_chain(n)
        log(f"using chain '{c.name}' ({why}); pass --chain to choose another")
    try:
        return (c, *c.bracket(n))
    except CBDError:
        top, bottom = c.anchors[0], c.anchors[-1]
        near_top = top.params < n <= top.params * (1 + GROW_LIMIT)
        if not (extrapolate or near_top):
            raise
        note = ""
        if near_top and not extrapolate:
            note = (f"note: {format_size(n)} is {n / top.params - 1:.1%} above chain '{c.name}' (largest anchor "
                    f"{top.name}): its largest anchor is grown function-preservingly, no blend" + _online_hint(c, n))
        return c, top if n > top.params else bottom, note


def _init_record(big: Anchor, small: Anchor, chain_info, target: Shape, res: InitResult, n: int) -> dict:
    def anchor(a: Anchor) -> dict:
        return {"source": a.source, "params": a.n_params, "sha256": a.provenance.get("weights_sha256")}

    return {"kind": "init", "chain": chain_info, "anchors": {"big": anchor(big), "small": anchor(small)},
            "shape": target.as_dict(), "params": res.n_params, "requested": n, "alpha": res.alpha, "info": res.info,
            "history": [], "cbd_mlx": __version__}


def build_init(size: str | int, *, chain: str | None = None, anchors: tuple[str, str] | None = None,
               alpha: float | str | None = None, calib=None, calib_tokens: int = CALIB_TOKENS_INIT,
               shape: dict | None = None, shape_rule: str = SHAPE_RULE, compensate: bool = COMPENSATE,
               extrapolate: bool = False, stream: bool = False, log=None):
    """The init of ``size`` parameters, in memory (``loader.Built``: ``.save(out)``
    writes it, ``.load()`` gives (model, tokenizer)); its cbd.json record holds
    the chain, anchors, shape, alpha and alignment. See ``init``."""
    log = log or (lambda *_: None)
    n = size_of(size)
    if n <= 0:
        raise CBDError(f"size must be positive, got {size}")
    fixed = {k: v for k, v in (shape or {}).items() if v is not None}
    alpha = _parse_alpha(alpha)
    check = alpha == "auto" or calib is not None  # else NaN/Inf are caught in the streamed output
    chain_info = None
    if anchors:
        big, small = sorted((load_anchor(a, check_finite=check) for a in anchors), key=lambda a: -a.n_params)
    else:
        c, a_big, a_small = _chain_pair(chain, n, extrapolate, log)
        if isinstance(a_small, str):  # beyond the chain: a_big is the edge anchor, a_small the note
            return _edge_init(c.source_of(a_big), n, calib, calib_tokens, fixed,
                              {"name": c.name, "manifest": str(c.path), "anchors": [a_big.name]}, log, a_small)
        chain_info = {"name": c.name, "manifest": str(c.path), "anchors": [a_big.name, a_small.name]}
        log(f"chain {c.name}: {a_small.name} ({format_size(a_small.params)}) < {format_size(n)} "
            f"< {a_big.name} ({format_size(a_big.params)})")
        big, small = (load_chain_anchor(c, a, check) for a in (a_big, a_small))
    if not small.n_params <= n <= big.n_params:
        if extrapolate or (anchors and big.n_params < n <= big.n_params * (1 + GROW_LIMIT)):
            return _edge_init(big.source if n > big.n_params else small.source, n, calib, calib_tokens, fixed,
                              None, log, "")
        raise CBDError(f"{format_size(n)} is outside the anchors' range {format_size(small.n_params)} .. "
                       f"{format_size(big.n_params)}; pick a size in that range or pass --extrapolate")
    check_compatible(big, small)
    if not same_tokenizer(big.path, small.path):
        raise CBDError("the anchors use different tokenizers; a chain shares one tokenizer")
    target = solve_shape(big.family, big.template, small.shape, big.shape, n, fixed, rule=shape_rule)
    if calib is None and (alpha == "auto" or compensate or not has_lineage(small, big)):
        calib = INIT_CALIB
        log(f"calibration text: the built-in {INIT_CALIB.name} (English of several kinds); pass --calib FILE "
            "for your domain")
    if calib is not None and not check:  # calibration runs the anchors: NaN/Inf are refused before it
        for a in (big, small):
            check_weights_finite(a)
    res = interpolate(big, small, target, alpha, calibration_from(big.path, calib, calib_tokens), log=log,
                      stream=stream, compensate=compensate)
    log(f"shape: {target} -> {res.n_params:,} parameters ({format_size(res.n_params)}, "
        f"{(res.n_params - n) / n:+.2%} of {format_size(n)})")
    log(f"alpha: {res.alpha:.4f} (distance rule {res.info['default_alpha']:.4f}), alignment: {res.info['alignment']}")
    return Built(res.config, res.weights, big.path, _init_record(big, small, chain_info, target, res, n),
                 res.shapes if stream else None)


def init(size: str | int, *, chain: str | None = None, anchors: tuple[str, str] | None = None,
         alpha: float | str | None = None, calib=None, calib_tokens: int = CALIB_TOKENS_INIT,
         shape: dict | None = None, shape_rule: str = SHAPE_RULE, compensate: bool = COMPENSATE,
         extrapolate: bool = False, out=None, force: bool = False, dtype: str = "float32", log=None):
    """A model of ``size`` parameters (e.g. "138M") initialized from two anchors
    by parameter interpolation: alpha * Expand(small) + (1 - alpha) * Subset(big).

    ``chain``: a chain name or manifest path [default: the public ``smollm2``
    chain when its anchors are available, else the embedded offline chain];
    ``anchors``: (big, small) instead of a chain; ``alpha``: a number in
    [0, 1], "auto" (the default: best of a grid on calibration text) or
    "distance" (relative distance in parameters); ``calib``: a text file for
    ``alpha="auto"`` and for aligning anchors without lineage;
    ``shape``: pins any of layers/hidden/ffn/heads/kv_heads; ``shape_rule``:
    how the other dimensions are chosen (``shapes.SHAPE_RULES``);
    ``compensate``: Subset(big) corrects what reads its pruned FFN channels
    by least squares on the calibration text. Sizes up to 10%
    above a chain's largest anchor grow it function-preservingly; further out
    needs ``extrapolate``. Writes an mlx-lm directory (with cbd.json) when
    ``out`` is given. Returns (model, tokenizer) like ``mlx_lm.load``."""

    refuse_existing(out, force)
    built = build_init(size, chain=chain, anchors=anchors, alpha=alpha, calib=calib, calib_tokens=calib_tokens,
                       shape=shape, shape_rule=shape_rule, compensate=compensate, extrapolate=extrapolate,
                       log=log)
    if out is not None:
        built.save(out, force, dtype)
    return built.load()
