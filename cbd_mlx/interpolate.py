"""Parameter interpolation: a model of any size between two adjacent anchors.

theta_T = alpha * Expand(theta_S) + (1 - alpha) * Subset(theta_B), with the
channels of S and of Subset(B) aligned by S's lineage (or by activation
matching when S has none).
"""

from __future__ import annotations

from ._version import __version__
from .arch.anchor import Anchor, check_weights_finite
from .arch.shapes import Shape, config_for, count_params, format_size, size_of, solve_shape
from .calibration import DEFAULT_CALIB, INIT_CALIB, calibration_from
from .chain import DEFAULT_ONLINE, default_chain, find_chain, load_chain_anchor
from .errors import CBDError
from .loader import Built, load_anchor, same_tokenizer
from .method.interpolation import InitResult, check_compatible, grow, interpolate
from .method.lineage import has_lineage
from .method.pruning import child_shape, prune_weights
from .save import refuse_existing

# init's defaults, chosen on the out-of-domain suite (results/smollm2-mini/shape_rules.json): keeping the bigger
# anchor's depth and compensating its pruned FFN beat the proportional shape at 55M (4.46 vs 5.87), 70M (3.59 vs
# 3.93), 90M (2.78 vs 3.00), 115M (1.88 vs 1.90) and 120M (1.57 vs 1.82)
SHAPE_RULE = "deep"
COMPENSATE = True


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
