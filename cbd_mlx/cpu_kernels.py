"""Causal self-attention and the SwiGLU gate in numpy, for training on the CPU.

MLX's CPU elementwise kernels run several times slower than numpy's, and a
layer's attention softmax (heads x seq x seq) and SiLU gate (seq x ffn) cost
more than its projections. ``patched(model)`` swaps mlx-lm's
``scaled_dot_product_attention`` and ``swiglu`` in the model's module for
``attention`` and ``swiglu`` below (custom MLX functions whose forward and
backward run in numpy) while the block runs; a call they do not cover (a KV
cache, an explicit mask, attention sinks, half precision) goes to mlx-lm's.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from functools import lru_cache, partial

import mlx.core as mx
import numpy as np

from . import cpu_threads

FLOOR = -60.0  # lowest log-probability kept; masked positions get e^-60 (~1e-26) instead of 0


@lru_cache(maxsize=4)
def _causal(t: int) -> np.ndarray:
    """0 / -inf additive causal mask over ``t`` positions."""
    return np.triu(np.full((t, t), -np.inf, np.float32), 1)


@np.errstate(all="ignore")  # a diverging run's inf/nan reach the training guards, not the terminal
def forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float):
    """q (b, h, t, d), k/v (b, kv, t, d) -> (out (b, h, t, d), probs).
    Query heads h*rep..h*rep+rep-1 share key/value head h (grouped queries)."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    rep = h // kv
    qs = (q * np.float32(scale)).reshape(b, kv, rep * t, d)  # the scale on q, not on the (t x t) scores
    s = qs @ k.transpose(0, 1, 3, 2)
    cpu_threads.rows(partial(_softmax_causal, t=t), s.reshape(b * kv, rep, t, t))
    return (s @ v).reshape(b, h, t, d), s


@np.errstate(all="ignore")
def _softmax_causal(s: np.ndarray, t: int) -> None:
    """In place: the causal softmax of scores ``s`` (..., t, t)."""
    s += _causal(t)
    s -= s.max(axis=-1, keepdims=True)
    np.maximum(s, FLOOR, out=s)  # probabilities below e^-60 stay normal floats: denormals are ~100x slower
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)


@np.errstate(all="ignore")
def _softmax_vjp(ds: np.ndarray, rowdot: np.ndarray, p: np.ndarray) -> None:
    """In place: the (scaled) scores' cotangent from the probabilities' (``ds``)."""
    ds -= rowdot[..., None]
    ds *= p


@np.errstate(all="ignore")
def backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, p: np.ndarray, out: np.ndarray, dout: np.ndarray,
             scale: float):
    """Gradients (dq, dk, dv) of ``forward`` given its probs, output and the
    output's cotangent."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    rep = h // kv
    qs = (q * np.float32(scale)).reshape(b, kv, rep * t, d)
    do = dout.reshape(b, kv, rep * t, d)
    dv = p.transpose(0, 1, 3, 2) @ do
    ds = do @ v.transpose(0, 1, 3, 2)
    rowdot = np.einsum("bkid,bkid->bki", do, out.reshape(b, kv, rep * t, d))
    cpu_threads.rows(_softmax_vjp, ds.reshape(b * kv, rep * t, t), rowdot.reshape(b * kv, rep * t),
                     p.reshape(b * kv, rep * t, t))
    dq = ds @ k
    dq *= np.float32(scale)
    dq = dq.reshape(b, h, t, d)
    dk = ds.transpose(0, 1, 3, 2) @ qs
    return dq, dk, dv


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal attention through numpy, differentiable (an MLX custom function)."""
    saved = {}

    def arr(a: mx.array) -> np.ndarray:  # numpy's matmul leaves BLAS for strided operands
        return np.ascontiguousarray(np.asarray(a))

    @mx.custom_function
    def f(q, k, v):
        out, p = forward(arr(q), arr(k), arr(v), scale)
        saved["p"], saved["out"] = p, out
        return mx.array(out)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        q, k, v = primals
        dq, dk, dv = backward(arr(q), arr(k), arr(v), saved["p"], saved["out"], arr(cotangent), scale)
        return mx.array(dq), mx.array(dk), mx.array(dv)

    return f(q, k, v)


@np.errstate(all="ignore")
def _swiglu_fwd(a: np.ndarray, b: np.ndarray, sig: np.ndarray, silu: np.ndarray, out: np.ndarray) -> None:
    np.negative(a, out=sig)
    np.maximum(sig, -80.0, out=sig)
    np.minimum(sig, 80.0, out=sig)
    np.exp(sig, out=sig)
    sig += 1.0
    np.reciprocal(sig, out=sig)  # sigmoid(a)
    np.multiply(a, sig, out=silu)
    np.multiply(silu, b, out=out)


@np.errstate(all="ignore")
def _swiglu_bwd(b: np.ndarray, g: np.ndarray, sig: np.ndarray, silu: np.ndarray, da: np.ndarray,
                dx: np.ndarray) -> None:
    np.multiply(g, silu, out=dx)
    # d silu / da = sig + silu (1 - sig)
    np.subtract(1.0, sig, out=da)
    da *= silu
    da += sig
    da *= b
    da *= g


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x through numpy, differentiable."""
    saved = {}

    def flat(a: mx.array) -> np.ndarray:
        return np.asarray(a).reshape(-1, a.shape[-1])

    @mx.custom_function
    def f(gate, x):
        a, b = flat(gate), flat(x)
        sig, silu, out = np.empty_like(a), np.empty_like(a), np.empty_like(a)
        cpu_threads.rows(_swiglu_fwd, a, b, sig, silu, out)
        saved["sig"], saved["silu"] = sig, silu
        return mx.array(out).reshape(gate.shape)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        b, g = flat(primals[1]), flat(cotangent)
        da, dx = np.empty_like(b), np.empty_like(b)
        cpu_threads.rows(_swiglu_bwd, b, g, saved["sig"], saved["silu"], da, dx)
        shape = primals[0].shape
        return mx.array(da).reshape(shape), mx.array(dx).reshape(shape)

    return f(gate, x)


def _covered(queries, keys, values, cache, mask, sinks) -> bool:
    return (cache is None and sinks is None and isinstance(mask, str) and mask == "causal"
            and queries.dtype == keys.dtype == values.dtype == mx.float32 and queries.shape[2] == keys.shape[2]
            and queries.shape[1] % keys.shape[1] == 0 and values.shape[-1] == queries.shape[-1])


@contextmanager
def patched(model):
    """Within the block, ``model``'s attention and SwiGLU run through numpy."""
    module = sys.modules.get(type(model).__module__)
    originals = {name: getattr(module, name) for name in ("scaled_dot_product_attention", "swiglu")
                 if hasattr(module, name)}
    sdpa_0, swiglu_0 = originals.get("scaled_dot_product_attention"), originals.get("swiglu")

    def sdpa(queries, keys, values, cache, scale, mask, sinks=None):
        if _covered(queries, keys, values, cache, mask, sinks):
            return attention(queries, keys, values, float(scale))
        return sdpa_0(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)

    def gate(g, x):
        if g.dtype == x.dtype == mx.float32 and g.shape == x.shape:
            return swiglu(g, x)
        return swiglu_0(g, x)

    for name, fn in (("scaled_dot_product_attention", sdpa), ("swiglu", gate)):
        if name in originals:
            setattr(module, name, fn)
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)
