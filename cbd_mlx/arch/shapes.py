"""Model shapes, exact parameter counts and the shape solver."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, replace

from ..errors import CBDError
from .families import Family, layer_local_name

SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbBgG])\s*$")
SIZE_UNITS = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}
SIZE_TOLERANCE = 0.01  # the solver's exact count is within 1% of the request
# widths the solver tries are multiples of this (mlx quantizes groups of 32/64/128
# along a layer's input, so every shape it picks can be exported); hidden is also
# a multiple of the head count (Hugging Face configs require it)
WIDTH_MULTIPLE = 32
SHAPE_RULES = ("proportional", "deep")  # how init's solver picks among the shapes of a size
MIN_MULTIPLE = 8


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def __str__(self) -> str:
        return (
            f"layers={self.layers} hidden={self.hidden} ffn={self.ffn} "
            f"heads={self.heads} kv_heads={self.kv_heads} head_dim={self.head_dim}"
        )

    def as_dict(self) -> dict:
        return asdict(self)


MAX_SIZE = 1e13  # parameters: far above any model a chain could hold


def parse_size(text: str) -> int:
    """'138M' -> 138_000_000. A unit (K, M, B) is required."""
    m = SIZE_RE.match(str(text))
    if not m:
        raise CBDError(
            f"cannot read size '{text}': give a positive number with a unit, e.g. 138M, 1.2B, 600K"
        )
    value = float(m.group(1)) * SIZE_UNITS[m.group(2).lower()]
    if not 0 < value <= MAX_SIZE:
        raise CBDError(f"size '{text}' must be positive and at most {MAX_SIZE / 1e12:g}T parameters")
    return int(round(value))


def size_of(size: str | int | float) -> int:
    """A size given as text ('138M') or as a number of parameters."""
    if isinstance(size, str):
        return parse_size(size)
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 < size <= MAX_SIZE:
        raise CBDError(f"size {size!r} is invalid: give a positive parameter count (at most {MAX_SIZE:.0e}) "
                       "or text such as '138M'")
    return int(round(size))


def format_size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K"


# dimensions beyond these are refused before anything is allocated (damaged or hostile configs)
MAX_CANDIDATES = 200_000  # shapes the solver may score between two anchors (a damaged manifest: far more)
MAX_DIMS = {"layers": 1024, "hidden": 1 << 17, "ffn": 1 << 19, "heads": 4096, "kv_heads": 4096, "head_dim": 4096,
            "vocab": 1 << 22}


def check_shape(shape: Shape, where: str) -> Shape:
    """Refuse dimensions that are not positive, beyond MAX_DIMS, or inconsistent."""
    for k, hi in MAX_DIMS.items():
        v = getattr(shape, k)
        if not 1 <= v <= hi:
            raise CBDError(f"{where}: {k} {v} is outside 1..{hi}; the config is damaged")
    if shape.heads % shape.kv_heads:
        raise CBDError(f"{where}: {shape.heads} heads are not a multiple of {shape.kv_heads} kv heads")
    return shape


def shape_of(family: Family, config: dict) -> Shape:
    """Read a Shape from a config.json dict (whole, positive, bounded numbers)."""
    k = family.config_keys

    def whole(key: str, default=None) -> int:
        if default is None and key not in config:
            raise CBDError(f"config.json lacks '{key}' for a {family.name} model; the config is damaged")
        v = config.get(key, default) if default is not None else config[key]
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise CBDError(f"config.json: {key} is {v!r}, not a whole number; the config is damaged")
        return v

    layers, hidden, heads, vocab = (whole(k[f]) for f in ("layers", "hidden", "heads", "vocab"))
    if heads <= 0 or hidden <= 0:
        raise CBDError(f"config.json: {k['hidden']} {hidden} / {k['heads']} {heads} must be positive")
    kv = whole(k["kv_heads"], heads) if config.get(k.get("kv_heads", "")) is not None else heads
    head_dim = whole(k["head_dim"], 0) if config.get(k.get("head_dim", "")) is not None else hidden // heads
    ffn = family.ffn_multiple * hidden if family.ffn_multiple else whole(k["ffn"])
    shape = check_shape(Shape(layers, hidden, ffn, heads, kv, head_dim, vocab), "config.json")
    eps = config.get(family.eps_key)
    if family.eps_key in config and not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1):
        raise CBDError(f"config.json: {family.eps_key} {eps!r} must be a small positive number")
    check_fields(config)
    return shape


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")  # HF config keys of the context length


def context_length(config: dict) -> int | None:
    """The model's context in tokens from its config.json (any family's key), or None when it names none."""
    return next((int(config[k]) for k in CONTEXT_KEYS if config.get(k)), None)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# config fields any family's model reads, beyond the shape: key -> (valid?, what it must be)
FIELD_CHECKS = {
    "rope_theta": (lambda v: _number(v) and v > 0, "a finite positive number"),
    "rotary_emb_base": (lambda v: _number(v) and v > 0, "a finite positive number"),
    "rotary_pct": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "partial_rotary_factor": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "rope_scaling": (lambda v: v is None or (isinstance(v, dict) and (v.get("factor") is None or (
        _number(v["factor"]) and v["factor"] > 0))), "an object (its factor a finite positive number) or null"),
    "max_position_embeddings": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 24,
                                "a positive whole number up to 16M"),
    "n_positions": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 24,
                    "a positive whole number up to 16M"),
    "tie_word_embeddings": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "attention_bias": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "mlp_bias": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
}


def check_fields(config: dict) -> None:
    """Refuse config fields a model reads that are out of range (rope_theta
    NaN or Infinity, rope_scaling a string, rotary_pct 5, ...)."""
    for key, (ok, want) in FIELD_CHECKS.items():
        if key in config and not ok(config[key]):
            raise CBDError(f"config.json: {key} is {config[key]!r}, not {want}; the config is damaged")


def config_for(family: Family, base_config: dict, shape: Shape) -> dict:
    """A copy of ``base_config`` with the shape's dimensions written in."""
    cfg = dict(base_config)
    k = family.config_keys
    cfg[k["layers"]] = shape.layers
    cfg[k["hidden"]] = shape.hidden
    cfg[k["heads"]] = shape.heads
    if "kv_heads" in k:
        cfg[k["kv_heads"]] = shape.kv_heads
    if "head_dim" in k:
        cfg[k["head_dim"]] = shape.head_dim
    if "ffn" in k:
        cfg[k["ffn"]] = shape.ffn
    if family.name == "gpt2":
        cfg["n_inner"] = None
    return cfg


def axis_size(label, shape: Shape, ref_dim: int) -> int:
    """Size of one labelled axis at ``shape``; unlabelled axes keep ``ref_dim``."""
    return {
        "hidden": shape.hidden,
        "ffn": shape.ffn,
        "q": shape.heads * shape.head_dim,
        "kv": shape.kv_heads * shape.head_dim,
        "qkv": 3 * shape.heads * shape.head_dim,
        "hqkv": 3 * shape.heads * shape.head_dim,
        "vocab": shape.vocab,
    }.get(label, ref_dim)


def param_shapes(family: Family, template: dict[str, tuple], shape: Shape) -> dict[str, tuple]:
    """Every parameter's tensor shape at ``shape``, from one model's names and shapes.

    ``template`` maps parameter names to tensor shapes of any model of the
    family (layer 0 stands for all layers).
    """
    out = {}
    for name, dims in template.items():
        layer, local = layer_local_name(family, name)
        if layer not in (None, 0):
            continue
        new = tuple(axis_size(a, shape, d) for a, d in zip(family.axes_of(name), dims))
        if layer is None:
            out[name] = new
        else:
            for i in range(shape.layers):
                out[f"{family.layers_prefix}.{i}.{local}"] = new
    return out


def count_params(family: Family, template: dict[str, tuple], shape: Shape) -> int:
    """Exact parameter count (embeddings included, tied weights counted once)."""
    return sum(math.prod(d) for d in param_shapes(family, template, shape).values())


def _rel(x: float, lo: float, hi: float) -> float:
    if hi == lo:
        return 0.0
    return (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))


def _range(lo: int, hi: int, step: int) -> list[int]:
    vals = {lo, hi}
    vals.update(range(math.ceil(lo / step) * step, hi + 1, step))
    return sorted(v for v in vals if lo <= v <= hi)


def solve_shape(
    family: Family,
    template: dict[str, tuple],
    small: Shape,
    big: Shape,
    target: int,
    fixed: dict | None = None,
    tolerance: float = SIZE_TOLERANCE,
    multiple: int = WIDTH_MULTIPLE,
    rule: str = "proportional",
) -> Shape:
    """A shape between ``small`` and ``big`` whose exact count is within
    ``tolerance`` of ``target``: with ``rule`` "proportional", its dimensions
    as proportional to both anchors as possible; with "deep", the depth
    nearest the bigger anchor's (cutting widths before layers), then as
    proportional as possible.

    ``fixed`` pins any of layers/hidden/ffn/heads/kv_heads. Hidden and ffn
    widths are multiples of ``multiple`` (or the anchors' own widths) when any
    such shape is close enough, else multiples of 8 (tiny models).
    """
    if rule not in SHAPE_RULES:
        raise CBDError(f"unknown shape rule '{rule}'; choose one of {', '.join(SHAPE_RULES)}")
    error = None
    for m in dict.fromkeys((multiple, MIN_MULTIPLE)):
        try:
            return _solve(family, template, small, big, target, fixed, tolerance, m, rule)
        except CBDError as e:
            error = error or e
    raise error


def _candidates(family, template, small, big, target, fixed, multiple):
    """The shapes between ``small`` and ``big`` worth scoring for ``target``:
    every layers/kv-heads/heads/hidden combination, each with the FFN width
    that brings it closest to the target count."""
    group = big.heads // big.kv_heads
    lo = lambda f: min(getattr(small, f), getattr(big, f))  # noqa: E731
    hi = lambda f: max(getattr(small, f), getattr(big, f))  # noqa: E731

    def options(f, step=None):
        if f in fixed:
            return [fixed[f]]
        return list(range(lo(f), hi(f) + 1)) if step is None else _range(lo(f), hi(f), step)

    for layers, kv in itertools.product(options("layers"), options("kv_heads")):
        heads = fixed.get("heads", kv * group)
        if heads % kv or not (lo("heads") <= heads <= hi("heads") or "heads" in fixed):
            continue
        if family.tied_attention_width:
            hidden_opts = [heads * big.head_dim]
        else:  # Hugging Face configs require hidden % heads == 0
            hidden_opts = [h for h in options("hidden", math.lcm(heads, multiple)) if h % heads == 0]
        for hidden in hidden_opts:
            if "hidden" in fixed and hidden != fixed["hidden"]:
                continue
            base = Shape(layers, hidden, 0, heads, kv, big.head_dim, big.vocab)
            if family.ffn_multiple:
                yield replace(base, ffn=family.ffn_multiple * hidden)
            elif "ffn" in fixed:
                yield replace(base, ffn=fixed["ffn"])
            else:
                c0 = count_params(family, template, base)
                c1 = count_params(family, template, replace(base, ffn=1)) - c0
                f = int(round(((target - c0) / c1 if c1 else lo("ffn")) / multiple) * multiple)
                yield replace(base, ffn=min(max(f, lo("ffn")), hi("ffn")))


def _solve(family, template, small, big, target, fixed, tolerance, multiple, rule) -> Shape:
    """The candidate within ``tolerance`` of ``target`` whose dimensions sit at
    the most similar relative position between the anchors (with rule "deep":
    among those of the depth nearest the bigger anchor's)."""
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    for k, v in fixed.items():
        if k not in MAX_DIMS or isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIMS[k]:
            raise CBDError(f"pinned {k} {v!r} is not a whole number in 1..{MAX_DIMS.get(k, '?')}")
    template = {k: v for k, v in template.items() if layer_local_name(family, k)[0] in (None, 0)}
    span = lambda f: 1 if f in fixed else abs(getattr(big, f) - getattr(small, f)) + 1  # noqa: E731
    work = span("layers") * span("kv_heads") * (1 if family.tied_attention_width else -(-span("hidden") // multiple))
    if work > MAX_CANDIDATES:
        raise CBDError(f"the anchors' shapes are too far apart to search ({work:,} candidate shapes; "
                       f"{small} .. {big}); pin --layers, --hidden or --kv-heads, or use closer anchors")
    best, nearest = None, None
    for cand in _candidates(family, template, small, big, target, fixed, multiple):
        n = count_params(family, template, cand)
        err = abs(n - target) / target
        if nearest is None or err < nearest[0]:
            nearest = (err, n, cand)
        if err > tolerance:
            continue
        ts = [_rel(getattr(cand, f), getattr(small, f), getattr(big, f)) for f in ("layers", "hidden", "ffn", "heads")]
        depth_gap = abs(big.layers - cand.layers) if rule == "deep" else 0
        score = (depth_gap, round(max(ts) - min(ts), 6), err)
        if best is None or score < best[0]:
            best = (score, cand)
    if best is None:
        hint = f"; the nearest is {format_size(nearest[1])} ({nearest[2]})" if nearest else ""
        raise CBDError(f"no shape between the anchors reaches {format_size(target)} within {tolerance:.0%}{hint}; "
                       "pick another size or drop pinned dimensions")
    return best[1]
