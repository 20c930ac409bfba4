"""Causal self-attention in numpy, for training on the CPU.

MLX's CPU attention spends its time in the (heads x seq x seq) softmax, in
elementwise kernels several times slower than numpy's: on a 9-head, 256-token
batch of 8 it costs more than the layer's projections. ``patched(model)``
swaps mlx-lm's ``scaled_dot_product_attention`` in the model's module for
``attention`` below (a custom MLX function whose forward and backward are
numpy's batched matmuls and softmax) while the block runs; any call it does
not cover (a KV cache, an explicit mask, attention sinks) goes to mlx-lm's.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from functools import lru_cache

import mlx.core as mx
import numpy as np


@lru_cache(maxsize=8)
def _causal(rep: int, t: int) -> np.ndarray:
    """0 / -inf additive mask for ``rep`` query heads stacked over ``t`` positions."""
    m = np.triu(np.full((t, t), -np.inf, np.float32), 1)
    return np.tile(m, (rep, 1))


def forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float):
    """q (b, h, t, d), k/v (b, kv, t, d) -> (out (b, h, t, d), probs).
    Query heads h*rep..h*rep+rep-1 share key/value head h (grouped queries)."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    rep = h // kv
    qs = q.reshape(b, kv, rep * t, d)
    s = qs @ k.transpose(0, 1, 3, 2)
    s *= scale
    s += _causal(rep, t)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return (s @ v).reshape(b, h, t, d), s


def backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, p: np.ndarray, out: np.ndarray, dout: np.ndarray,
             scale: float):
    """Gradients (dq, dk, dv) of ``forward`` given its probs, output and the
    output's cotangent."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    rep = h // kv
    qs = q.reshape(b, kv, rep * t, d)
    do = dout.reshape(b, kv, rep * t, d)
    dv = p.transpose(0, 1, 3, 2) @ do
    ds = do @ v.transpose(0, 1, 3, 2)
    ds -= np.einsum("bkid,bkid->bki", do, out.reshape(b, kv, rep * t, d))[..., None]
    ds *= p
    ds *= scale
    dq = (ds @ k).reshape(b, h, t, d)
    dk = ds.transpose(0, 1, 3, 2) @ qs
    return dq, dk, dv


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal attention through numpy, differentiable (an MLX custom function)."""
    saved = {}

    @mx.custom_function
    def f(q, k, v):
        out, p = forward(np.asarray(q), np.asarray(k), np.asarray(v), scale)
        saved["p"], saved["out"] = p, out
        return mx.array(out)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        q, k, v = primals
        dq, dk, dv = backward(np.asarray(q), np.asarray(k), np.asarray(v), saved["p"], saved["out"],
                              np.asarray(cotangent), scale)
        return mx.array(dq), mx.array(dk), mx.array(dv)

    return f(q, k, v)


def _covered(queries, keys, cache, mask, sinks) -> bool:
    return (cache is None and sinks is None and isinstance(mask, str) and mask == "causal"
            and queries.dtype == keys.dtype == mx.float32 and queries.shape[2] == keys.shape[2]
            and queries.shape[1] % keys.shape[1] == 0)


@contextmanager
def patched(model):
    """Within the block, ``model``'s attention runs through ``attention``."""
    module = sys.modules.get(type(model).__module__)
    original = getattr(module, "scaled_dot_product_attention", None)
    if original is None:
        yield
        return

    def sdpa(queries, keys, values, cache, scale, mask, sinks=None):
        if _covered(queries, keys, cache, mask, sinks):
            return attention(queries, keys, values, float(scale))
        return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)

    module.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        module.scaled_dot_product_attention = original
