"""Interpolation: theta_T = alpha * Expand(theta_S) + (1 - alpha) *
Subset(theta_B), with the channels of S and of Subset(B) aligned by S's
lineage (or by activation matching when S has none)."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..arch.anchor import Anchor, all_finite, model_from_weights
from ..arch.families import layer_local_name
from ..arch.shapes import Shape, config_for, count_params, param_shapes
from ..errors import CBDError
from ..losses import windows_nll
from .lineage import lineage_of
from .operators import Selection, blend, blend_tensor, expand, iter_compensate, iter_expand, iter_subset
from .ranking import collect_stats, placement, select

ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)

SCORE_BATCHES = 2  # calibration windows the alpha grid is scored on

# The bigger anchor's Subset (alpha 0) is kept unless a blend scores this many nats lower on the calibration text.
# The built-in text is held-out text of the distillation corpus's domains, and each polish moves the smaller anchors
# further towards that corpus: on it, S grown looked better than Subset(B) by 0.03 nats at 70M and by 0.05 at 95M,
# while on the out-of-domain suite Subset(B) was the better init (3.46x the source against 3.61x, 2.48x against
# 2.55x). Where S won by 0.14 nats or more (45M-65M, 80M, 90M), S was the better init on the suite too (65M: 3.61x
# against 4.17x for Subset(B), 80M: 2.91x against 3.16x).
SUBSET_MARGIN = 0.1


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
    total, n = windows_nll(model_from_weights(config, weights), (b[None] for b in batches))
    return total / n


def compensation_grams(big: Anchor, batches: np.ndarray) -> dict[str, np.ndarray]:
    """X^T X of Subset(big)'s FFN inputs on calibration windows, for
    ``operators.iter_compensate``. Fitted on other windows than the alpha grid
    is scored on (SCORE_BATCHES): scored on its own fit, an over-fitted Subset
    looked best (85M: alpha 0 by calibration, 3.45x the source on the suite,
    against 3.10x at 80M)."""
    fit = batches[SCORE_BATCHES:] if len(batches) > 2 * SCORE_BATCHES else batches
    return collect_stats(big, fit, grams=True).grams


def auto_alpha(big: Anchor, small: Anchor, target: Shape, exp: dict, sub: dict, batches: np.ndarray, a0: float,
               log=print) -> tuple[float, dict[float, float]]:
    """The alpha of ``ALPHA_GRID`` (and the default ``a0``) whose blend of
    Expand(S) ``exp`` and Subset(B) ``sub`` has the lowest calibration loss,
    Subset(B) kept within ``SUBSET_MARGIN`` of it (``pick_alpha``):
    (alpha, loss by alpha)."""
    scores = {}
    for a in sorted(set(ALPHA_GRID) | {round(a0, 4)}):
        scores[a] = calib_loss(target_config(big, small, target, a), blend(exp, sub, a), batches)
        log(f"  alpha={a:.3f}  calibration loss={scores[a]:.4f}")
    a = pick_alpha(scores)
    if a != min(scores, key=scores.get):
        log(f"  alpha=0 kept: the best blend is within {SUBSET_MARGIN} nats of the bigger anchor's Subset")
    return a, scores


def pick_alpha(scores: dict[float, float], margin: float = SUBSET_MARGIN) -> float:
    """The alpha of lowest calibration loss, unless the Subset of the bigger
    anchor (alpha 0) is within ``margin`` nats of it: then 0."""
    best = min(scores, key=scores.get)
    return 0.0 if 0.0 in scores and scores[0.0] - scores[best] <= margin else best


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
    grams = compensation_grams(big, batches) if compensate and batches is not None else None

    def big_subset():
        parts = iter_subset(big.family, big.weights, big.shape, sel_t)
        return iter_compensate(big.family, parts, big.weights, big.shape, sel_t, grams) if grams else parts

    if alpha == "auto":
        if batches is None:
            raise CBDError("--alpha auto needs calibration text: pass --calib FILE")
        sub = dict(big_subset())
        exp = expand(small.family, small.weights, small.shape, target, place)
        a, scores = auto_alpha(big, small, target, exp, sub, batches[:SCORE_BATCHES], a0, log)
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
    info = {"alignment": how, "compensated": grams is not None, "default_alpha": a0,
            "alpha_scores": {str(k): v for k, v in scores.items()}, "selection_in_big": sel_t.to_json(),
            "seconds": round(time.time() - t0, 2)}
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
