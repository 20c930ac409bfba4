"""A whole llama block in numpy, for training on the CPU.

mlx-lm's ``TransformerBlock`` (llama: RMSNorm, q/k/v, RoPE, causal GQA
attention, o, residual, RMSNorm, SwiGLU MLP, residual) as one MLX custom
function whose forward and backward run in numpy: the norms, RoPE and the
residual adds leave MLX's slow CPU elementwise kernels, q/k/v and gate/up
each run as one wider matmul, and a layer hands its arrays between MLX and
numpy once each way instead of at every op. ``cpu_kernels.patched`` routes a
block here when ``covered`` says it is this exact computation (fp32, no
bias, plain RoPE, full causal attention, no KV cache); anything else keeps
mlx-lm's block.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, reduce

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.llama import TransformerBlock

from . import cpu_kernels, cpu_threads

NAMES = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
         "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
         "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


@dataclass(frozen=True)
class Dims:
    heads: int
    kv_heads: int
    head_dim: int
    eps_in: float
    eps_post: float
    rope_base: float
    rope_scale: float
    scale: float


def covered(block: nn.Module) -> Dims | None:
    """The block's dimensions when it is mlx-lm's llama block in exactly the
    form ``forward`` computes, else None."""
    if type(block) is not TransformerBlock or getattr(block, "use_sliding", False):
        return None
    at, rope = block.self_attn, block.self_attn.rope
    linears = (at.q_proj, at.k_proj, at.v_proj, at.o_proj, block.mlp.gate_proj, block.mlp.up_proj,
               block.mlp.down_proj)
    weights = [reduce(getattr, n.split("."), block) for n in NAMES]
    if (type(rope) is not nn.RoPE or any(w.dtype != mx.float32 for w in weights) or rope.traditional or rope.dims != at.head_dim
            or any(type(m) is not nn.Linear or "bias" in m for m in linears)
            or any(type(m) is not nn.RMSNorm for m in (block.input_layernorm, block.post_attention_layernorm))):
        return None
    return Dims(at.n_heads, at.n_kv_heads, at.head_dim, float(block.input_layernorm.eps),
                float(block.post_attention_layernorm.eps), float(rope.base), float(rope.scale), float(at.scale))


@lru_cache(maxsize=8)
def _rope_tables(t: int, dims: int, base: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (t, dims/2) of mlx's non-traditional RoPE at positions 0..t-1."""
    angle = (np.arange(t, dtype=np.float64)[:, None] * scale) * base ** (-np.arange(0, dims, 2) / dims)
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, inverse: bool = False) -> np.ndarray:
    """x (b, h, t, d) rotated by the RoPE angles (their negatives with ``inverse``: the gradient)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    if inverse:
        sin = -sin
    out = np.empty(x.shape, np.float32)
    np.multiply(x1, cos, out=out[..., :h])
    out[..., :h] -= x2 * sin
    np.multiply(x1, sin, out=out[..., h:])
    out[..., h:] += x2 * cos
    return out


def _norm(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(x / rms(x), 1 / rms(x)) per row."""
    r = 1.0 / np.sqrt(np.einsum("nd,nd->n", x, x) / x.shape[1] + eps)
    return x * r[:, None], r


def _norm_vjp(g: np.ndarray, xn: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The gradient of x -> x / rms(x) at ``xn`` = x / rms(x), given the output's ``g``."""
    dot = np.einsum("nd,nd->n", g, xn) / g.shape[1]
    g -= xn * dot[:, None]
    g *= r[:, None]
    return g


def _heads(a: np.ndarray, b: int, t: int, h: int) -> np.ndarray:
    """(b*t, h*d) -> (b, h, t, d), contiguous."""
    return np.ascontiguousarray(a.reshape(b, t, h, -1).transpose(0, 2, 1, 3))


def _rows(a: np.ndarray) -> np.ndarray:
    """(b, h, t, d) -> (b*t, h*d)."""
    b, h, t, d = a.shape
    return a.transpose(0, 2, 1, 3).reshape(b * t, h * d)


@np.errstate(all="ignore")  # a diverging run's inf/nan reach the training guards
def forward(x: np.ndarray, w: list[np.ndarray], d: Dims) -> tuple[np.ndarray, dict]:
    """The block's output for x (b, t, hidden), weights in ``NAMES`` order; and what backward needs."""
    w_in, wq, wk, wv, wo, w_post, wg, wu, wd = w
    b, t, dim = x.shape
    x = x.reshape(b * t, dim)
    xn1, r1 = _norm(x, d.eps_in)
    h1 = xn1 * w_in
    wqkv = np.concatenate([wq, wk, wv])
    qkv = h1 @ wqkv.T
    nq, nk = d.heads * d.head_dim, d.kv_heads * d.head_dim
    cos, sin = _rope_tables(t, d.head_dim, d.rope_base, d.rope_scale)
    q = _rope(_heads(qkv[:, :nq], b, t, d.heads), cos, sin)
    k = _rope(_heads(qkv[:, nq:nq + nk], b, t, d.kv_heads), cos, sin)
    v = _heads(qkv[:, nq + nk:], b, t, d.kv_heads)
    o, p = cpu_kernels.forward(q, k, v, d.scale)
    of = _rows(o)
    x2 = x + of @ wo.T
    xn2, r2 = _norm(x2, d.eps_post)
    h2 = xn2 * w_post
    wgu = np.concatenate([wg, wu])
    gu = h2 @ wgu.T
    f = wg.shape[0]
    gate, up = gu[:, :f], gu[:, f:]
    sig, silu, s = (np.empty_like(gate) for _ in range(3))
    cpu_threads.rows(cpu_kernels._swiglu_fwd, gate, up, sig, silu, s)
    out = x2 + s @ wd.T
    saved = dict(shape=(b, t, dim), xn1=xn1, r1=r1, h1=h1, wqkv=wqkv, q=q, k=k, v=v, o=o, p=p, of=of, xn2=xn2,
                 r2=r2, h2=h2, wgu=wgu, up=up, sig=sig, silu=silu, s=s)
    return out.reshape(b, t, dim), saved


@np.errstate(all="ignore")
def backward(dout: np.ndarray, w: list[np.ndarray], sv: dict, d: Dims) -> tuple[np.ndarray, list[np.ndarray]]:
    """(dx, the weights' gradients in ``NAMES`` order) of ``forward`` given its output's cotangent."""
    w_in, wq, wk, wv, wo, w_post, wg, wu, wd = w
    b, t, dim = sv["shape"]
    dout = dout.reshape(b * t, dim)
    ds = dout @ wd
    dwd = dout.T @ sv["s"]
    f = wg.shape[0]
    dgu = np.empty((b * t, 2 * f), np.float32)
    cpu_threads.rows(cpu_kernels._swiglu_bwd, sv["up"], ds, sv["sig"], sv["silu"], dgu[:, :f], dgu[:, f:])
    dwgu = dgu.T @ sv["h2"]
    dh2 = dgu @ sv["wgu"]
    dw_post = np.einsum("nd,nd->d", dh2, sv["xn2"])
    dh2 *= w_post
    dx2 = dout + _norm_vjp(dh2, sv["xn2"], sv["r2"])
    dwo = dx2.T @ sv["of"]
    do = _heads(dx2 @ wo, b, t, d.heads)
    dq, dk, dv = cpu_kernels.backward(sv["q"], sv["k"], sv["v"], sv["p"], sv["o"], do, d.scale)
    cos, sin = _rope_tables(t, d.head_dim, d.rope_base, d.rope_scale)
    dqkv = np.concatenate([_rows(_rope(dq, cos, sin, inverse=True)), _rows(_rope(dk, cos, sin, inverse=True)),
                           _rows(dv)], axis=1)
    dwqkv = dqkv.T @ sv["h1"]
    dh1 = dqkv @ sv["wqkv"]
    dw_in = np.einsum("nd,nd->d", dh1, sv["xn1"])
    dh1 *= w_in
    dx = dx2 + _norm_vjp(dh1, sv["xn1"], sv["r1"])
    nq, nk = wq.shape[0], wk.shape[0]
    grads = [dw_in, dwqkv[:nq], dwqkv[nq:nq + nk], dwqkv[nq + nk:], dwo, dw_post, dwgu[:f], dwgu[f:], dwd]
    return dx.reshape(b, t, dim), grads


def _np(a: mx.array) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a))


def block(layer: nn.Module, x: mx.array, dims: Dims) -> mx.array:
    """``layer(x, "causal")`` through numpy, differentiable in x and in every weight."""
    ws = [reduce(getattr, n.split("."), layer) for n in NAMES]
    saved = {}

    @mx.custom_function
    def f(x, *ws):
        out, saved["s"] = forward(_np(x), [_np(w) for w in ws], dims)
        return mx.array(out)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, *ws = primals
        dx, grads = backward(_np(cotangent), [_np(w) for w in ws], saved.pop("s"), dims)
        return (mx.array(dx), *(mx.array(np.ascontiguousarray(g)) for g in grads))

    return f(x, *ws)


@contextmanager
def patched(model: nn.Module):
    """Within the block, ``model``'s covered layers run as one numpy function
    each (``block``) and the rest through ``cpu_kernels.patched``."""
    layers = [(m, covered(m)) for m in getattr(model, "layers", [])]
    layers = [(m, d) for m, d in layers if d is not None]
    fast = _fast_class(TransformerBlock)
    for m, d in layers:
        m.__class__ = fast
        object.__setattr__(m, "_cbd_dims", d)
    try:
        with cpu_kernels.patched(model):
            yield
    finally:
        for m, _ in layers:
            object.__delattr__(m, "_cbd_dims")
            m.__class__ = TransformerBlock


@lru_cache(maxsize=1)
def _fast_class(base: type) -> type:
    def __call__(self, x, mask=None, cache=None):
        if cache is None and isinstance(mask, str) and mask == "causal" and x.ndim == 3 and x.dtype == mx.float32:
            return block(self, x, self._cbd_dims)
        return base.__call__(self, x, mask, cache)

    return type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__})
