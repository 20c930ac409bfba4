"""The in-memory anchor: fp32 numpy weights in mlx-lm names, its config, family
and shape; and the mlx-lm model object built from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..errors import CBDError
from .families import Family
from .shapes import Shape


@dataclass
class Anchor:
    """A loaded model: fp32 numpy weights in mlx-lm names, its config, family
    and shape, and where it came from."""

    source: str
    path: Path  # the model directory (a converted cache for GGUF)
    config: dict
    weights: dict[str, np.ndarray]
    family: Family
    shape: Shape
    provenance: dict = field(default_factory=dict)
    sha256: str = ""  # of its weights files when loaded (the lineage's key); "" for weights made in memory

    @property
    def n_params(self) -> int:
        return int(sum(v.size for v in self.weights.values()))

    @property
    def template(self) -> dict[str, tuple]:
        return {k: v.shape for k, v in self.weights.items()}

    @property
    def lineage(self) -> dict | None:
        return self.provenance.get("lineage")


def build_model(config: dict) -> nn.Module:
    """An mlx-lm model object for ``config`` (weights uninitialised/lazy)."""
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
        return model_class(args_class.from_dict(config))
    except (ValueError, TypeError, KeyError) as e:
        raise CBDError(f"cannot build a model from config.json: {e}") from None


def param_template(config: dict) -> dict[str, tuple]:
    """Parameter names and shapes of ``config``'s model (nothing is computed)."""
    return {k: tuple(v.shape) for k, v in tree_flatten(build_model(config).parameters())}


def model_from_weights(config: dict, weights: dict[str, np.ndarray], dtype=mx.float32) -> nn.Module:
    """An mlx-lm model holding ``weights`` (numpy) in ``dtype``."""
    model = build_model(config)
    try:
        model.load_weights([(k, mx.array(v, dtype=dtype)) for k, v in weights.items()], strict=True)
    except ValueError as e:
        raise CBDError(f"weights do not match config.json: {e}") from None
    mx.eval(model.parameters())
    model.eval()
    return model


def check_weights_finite(a: Anchor) -> None:
    """Refuse an anchor holding NaN or Inf (a damaged checkpoint)."""
    for k, v in a.weights.items():
        if not all_finite(v):
            raise CBDError(f"{a.path}: parameter {k} holds NaN or Inf; the checkpoint is damaged")


def all_finite(v: np.ndarray) -> bool:
    """No NaN/Inf in ``v`` (a sum is finite iff every entry is, barring overflow)."""
    return bool(np.isfinite(v.sum(dtype=np.float64)) or np.isfinite(v).all())
