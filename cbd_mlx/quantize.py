"""Quantization through mlx-lm: round-to-nearest (optionally a mixed-precision
recipe), AWQ and GPTQ on local calibration tokens; checked inputs and an
atomic mlx-lm model directory as output."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .arch.anchor import Anchor, model_from_weights
from .errors import CBDError
from .save import read_json

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "awq", "gptq")
RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")  # mlx-lm's mixed-precision recipes (rtn)

CALIB_SEQS = 32  # calibration sequences for awq / gptq
CALIB_SEQ_LEN = 256


def default_precision(bits: int, method: str, recipe: str | None = "auto",
                      embed_bits: int | None = None) -> tuple[str | None, int | None]:
    """(recipe, embedding bits) that ``export`` uses. 4-bit rtn defaults to
    mlx-lm's mixed_4_6 recipe with 8-bit embeddings, chosen on the embedded
    chain's inits (`scripts/quant_defaults.py`, with groups of 32: suite
    perplexity +7.8% / +4.3% / +13.8% on the 80M / 45M / 125M inits, against
    +16.6% / +12.6% / +32.6% for uniform 4-bit); other settings default to
    uniform precision and the method's own embedding bits. ``recipe``
    "uniform" means none."""
    auto = bits == 4 and method == "rtn"
    if recipe == "auto":
        recipe = "mixed_4_6" if auto else None
    elif recipe == "uniform":
        recipe = None
    return recipe, embed_bits if embed_bits is not None else (8 if auto else None)


def is_quantized(path: Path) -> dict | None:
    """The ``quantization`` block of a model directory's config, if any."""
    cfg = read_json(Path(path) / "config.json", "model's config.json")
    return cfg.get("quantization") or cfg.get("quantization_config")


def check_group_size(model: nn.Module, group_size: int) -> None:
    """Every quantizable layer's input dimension must be a multiple of ``group_size``."""
    bad = [(k, m.weight.shape[-1]) for k, m in model.named_modules()
           if hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size]
    if bad:
        name, dim = bad[0]
        dims = {d for _, m in model.named_modules() if hasattr(m, "to_quantized") for d in [m.weight.shape[-1]]}
        fits = [g for g in GROUP_SIZES if g != group_size and all(d % g == 0 for d in dims)]
        fix = (f"use --group-size {fits[-1]}" if fits else
               "no group size of 32/64/128 divides its widths: make the model with sizes whose widths are "
               "multiples of 32 (cbd-mlx init picks such shapes)")
        raise CBDError(f"group size {group_size} does not divide {len(bad)} layer(s) (e.g. {name}, input dim "
                       f"{dim}); {fix}")


def auto_group_size(a: Anchor, bits: int = 8) -> int:
    """32 at 2-4 bits (measured on the embedded chain's inits by
    `scripts/quant_defaults.py`: 45M +26.5% -> +12.6% suite perplexity at 4
    bits, for 0.5 more bits per weight); else the largest of 64 (mlx-lm's
    default) and 32 that divides every quantizable input dimension."""
    dims = {v.shape[-1] for k, v in a.weights.items() if v.ndim == 2}
    for g in (32,) if bits <= 4 else (64, 32):
        if all(d % g == 0 for d in dims):
            return g
    return 64  # check_group_size then names the layers and the fix


def quantize_anchor(
    a: Anchor, bits: int, group_size: int, method: str = "rtn", recipe: str | None = None,
    calib: np.ndarray | None = None, fallback_bits: int | None = None, fallback_group_size: int | None = None,
) -> tuple[nn.Module, dict]:
    """(quantized mlx-lm model, its config) for a full-precision anchor.
    Quantization runs in fp32; scales, biases and unquantized tensors are then
    stored in float16 (0.5 instead of 1 extra bit per weight at group 64).
    ``fallback_bits``/``fallback_group_size``: the embeddings (awq/gptq do not
    calibrate them; with rtn they override the recipe for embeddings only)
    [default: mlx-lm's, max(bits, 4) for awq and max(bits, 6) for gptq]."""
    if bits not in BITS:
        raise CBDError(f"--bits must be one of {BITS}")
    if method not in METHODS:
        raise CBDError(f"--method must be one of {METHODS}")
    model = model_from_weights(a.config, a.weights)
    check_group_size(model, group_size)
    config = dict(a.config)
    if method == "rtn":
        from mlx_lm.convert import mixed_quant_predicate_builder
        from mlx_lm.utils import quantize_model

        pred = mixed_quant_predicate_builder(recipe, model, group_size) if recipe else None
        if fallback_bits or fallback_group_size:
            inner = pred
            embed = {"bits": fallback_bits or bits, "group_size": fallback_group_size or group_size}

            def pred(path, module):  # noqa: F811 - embeddings get their own precision
                if isinstance(module, nn.Embedding):
                    return embed
                return inner(path, module) if inner else True
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints its own bits/weight line
            model, config = quantize_model(model, config, group_size, bits, quant_predicate=pred)
        return _half(model, config)
    if recipe:
        raise CBDError("--recipe goes with --method rtn (awq/gptq choose their own precision)")
    if calib is None:
        raise CBDError(f"--method {method} needs calibration text: pass --calib FILE")
    inputs = mx.array(calib)
    if method == "awq":
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

        awq_cfg = AWQ_MODEL_CONFIGS.get(config["model_type"])
        if awq_cfg is None:
            raise CBDError(f"AWQ does not support model_type '{config['model_type']}'; use --method gptq or rtn")
        awq_quantize(model, inputs, awq_cfg, group_size=group_size, bits=bits,
                     embed_group_size=fallback_group_size or group_size, embed_bits=fallback_bits or max(bits, 4))
        config = update_config(model, config)
        config["quantization"].update(group_size=group_size, bits=bits)
    else:
        from mlx_lm.quant.gptq import gptq_quantize

        try:
            model, config["quantization"] = gptq_quantize(model, inputs, bits, group_size,
                                                          fallback_bits or max(bits, 6),
                                                          fallback_group_size or group_size)
        except RuntimeError as e:  # its Cholesky of a layer's Hessian can fail (mlx-lm's fixed 1% damping)
            raise CBDError(f"GPTQ failed on this model inside mlx-lm ({e}); use --method awq or --method rtn "
                           "instead") from None
    config["quantization_config"] = config["quantization"]
    return _half(model, config)


def _half(model: nn.Module, config: dict) -> tuple[nn.Module, dict]:
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    return model, config | {"torch_dtype": "float16"}


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits per parameter (weights, scales and biases together)."""
    from mlx_lm.utils import compute_bits_per_weight

    return float(compute_bits_per_weight(model))
