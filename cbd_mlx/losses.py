"""Training losses as plain functions, ``loss_fn(model, batch) -> mean loss``,
in the shape of mlx-lm's ``default_loss``: distill, recover, bridge and the
scratch baseline pass one to ``train.train``, whose loop knows none of them.

Each loss reads the model's final hidden states and its output head's weight
(``head_out``) instead of its logits. On Metal/CUDA the logits are formed and
scored with MLX ops; on the CPU, where MLX's elementwise kernels are the
bottleneck, the head and the loss run fused in numpy (``cpu_head``) and so
do causal attention and the SwiGLU gate (``cpu_kernels``), with hand-written gradients: the
same numbers to fp32 tolerance (tested). CBD_MLX_FAST_HEAD=0 turns both off.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterable, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cpu_block, cpu_head
from .errors import CBDError

LOSSES = ("forward_kl", "reverse_kl", "jsd", "ce")


class TopK(NamedTuple):
    """A teacher's top-k log-probs per position (from a teacher cache)."""

    idx: mx.array
    logp: mx.array


class HeadOut(NamedTuple):
    """What a model's output head sees: final hidden states (..., d) and the
    head's weight (vocab, d); ``logits()`` applies it."""

    h: mx.array
    w: mx.array
    trainable: bool = False  # whether the head's weight gets a gradient

    def logits(self) -> mx.array:
        return self.h @ self.w.T


class Batch(NamedTuple):
    x: mx.array  # inputs (batch, seq)
    y: mx.array  # next-token targets (batch, seq)
    teacher: HeadOut | TopK | mx.array | None = None  # None, the teacher's head, its top-k, or logits
    xvocab: tuple | None = None  # ULD targets and mask (bridge)


LossFn = Callable[[nn.Module, Batch], mx.array]


def reads_teacher(loss_fn: LossFn) -> bool:
    """Whether ``loss_fn`` uses the batch's teacher signal (a loss function says
    otherwise with ``loss_fn.reads_teacher = False``; the trainer then skips
    the teacher's forward)."""
    return getattr(loss_fn, "reads_teacher", True)


def fast_cpu() -> bool:
    """The numpy head path: on the CPU, unless CBD_MLX_FAST_HEAD=0."""
    return mx.default_device() == mx.cpu and os.environ.get("CBD_MLX_FAST_HEAD", "1") != "0"


# ---------------------------------------------------------------- the output head

_TAPS: dict[type, type] = {}


def _tap_class(cls: type) -> type:
    """A subclass of ``cls`` whose head call returns its input unchanged."""
    if cls not in _TAPS:
        method = "as_linear" if issubclass(cls, nn.Embedding) else "__call__"
        _TAPS[cls] = type(f"Tapped{cls.__name__}", (cls,), {method: lambda self, x: x})
    return _TAPS[cls]


def _head_module(model: nn.Module) -> nn.Module | None:
    """The module that maps final hidden states to logits: an untied Linear
    with vocab outputs (lm_head, embed_out), else the token embedding
    (tied, used through ``as_linear``); None when neither is plain."""
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    linears, embeds = [], []
    for _, m in model.named_modules():
        if type(m) is nn.Linear and m.weight.shape[0] == vocab and "bias" not in m:
            linears.append(m)
        elif type(m) is nn.Embedding and m.weight.shape[0] == vocab:
            embeds.append(m)
    if len(linears) == 1:
        return linears[0]
    return embeds[0] if not linears and len(embeds) == 1 else None


@contextmanager
def _tapped(module: nn.Module):
    cls = module.__class__
    module.__class__ = _tap_class(cls)
    try:
        yield
    finally:
        module.__class__ = cls


def head_out(model: nn.Module, x: mx.array) -> HeadOut | mx.array:
    """The model's final hidden states and head weight on inputs ``x``; its
    logits when the head is not a plain Linear/Embedding."""
    head = _head_module(model)
    with cpu_block.patched(model) if fast_cpu() else nullcontext():
        if head is None:
            return model(x)
        with _tapped(head):
            h = model(x)
        if h.ndim != x.ndim + 1 or h.shape[-1] != head.weight.shape[-1]:
            return model(x)  # the head was not the model's last step (a wrapped or post-processed head)
    return HeadOut(h, head.weight, "weight" in head.trainable_parameters())


def teacher_out(teacher: nn.Module, x: mx.array):
    """A frozen teacher's head output (or logits), for the student's loss."""
    out = head_out(teacher, x)
    if isinstance(out, HeadOut):
        return HeadOut(mx.stop_gradient(out.h), out.w, False)
    return mx.stop_gradient(out)


def numpy_ready(out) -> bool:
    """Whether ``out`` is a head output in fp32 (numpy has no bfloat16)."""
    return isinstance(out, HeadOut) and out.h.dtype == mx.float32 and out.w.dtype == mx.float32


def logits_of(out) -> mx.array:
    return out.logits() if isinstance(out, HeadOut) else out


# ---------------------------------------------------------------- MLX reference losses

def _softmax_lse(z: mx.array) -> tuple[mx.array, mx.array]:
    """(softmax, logsumexp) with a single exp pass over the vocabulary."""
    m = mx.stop_gradient(z.max(-1, keepdims=True))
    e = mx.exp(z - m)
    s = e.sum(-1, keepdims=True)
    return e / s, m + mx.log(s)


def _minus_onehot(ps: mx.array, y: mx.array) -> mx.array:
    """ps - onehot(y): the gradient of CE with respect to the logits."""
    return mx.put_along_axis(mx.zeros_like(ps), y[..., None], mx.full(y[..., None].shape, -1.0), axis=-1) + ps


def _fused_kd(mode: str, ce_weight: float):
    """Per-token KL(student || teacher) (reverse) or KL(teacher || student)
    (forward), plus ``ce_weight`` * CE, with a hand-written gradient (two exp
    passes over the vocabulary for forward and backward together)."""

    @mx.custom_function
    def rows(zs, zt, y):
        ps, lse_s = _softmax_lse(zs)
        if mode == "reverse_kl":  # only the teacher's normalizer is needed
            pt, lse_t = mx.zeros((1,)), mx.logsumexp(zt, axis=-1, keepdims=True)
        else:
            pt, lse_t = _softmax_lse(zt)
        d = (zs - zt) - (lse_s - lse_t)  # log p_s - log p_t
        kl = (ps * d).sum(-1) if mode == "reverse_kl" else -(pt * d).sum(-1)
        loss = kl
        if ce_weight:
            loss = loss + ce_weight * (lse_s[..., 0] - mx.take_along_axis(zs, y[..., None], -1)[..., 0])
        return loss, ps, pt, d, kl

    @rows.vjp
    def rows_vjp(primals, cotangents, outputs):
        zs, zt, y = primals
        _, ps, pt, d, kl = outputs
        g = ps * (d - kl[..., None]) if mode == "reverse_kl" else ps - pt
        if ce_weight:
            g = g + ce_weight * _minus_onehot(ps, y)
        return g * cotangents[0][..., None], mx.zeros_like(zt), mx.zeros_like(y)

    return rows


def _topk_forward_kl(ce_weight: float):
    """Per-token KL(teacher || student) against a top-k teacher (the k
    log-probs as cached, the remaining mass spread evenly over the rest of the
    vocabulary), plus ``ce_weight`` * CE; one exp pass over the vocabulary."""

    @mx.custom_function
    def rows(zs, idx, lp, y):
        vocab, k = zs.shape[-1], lp.shape[-1]
        ps, lse = _softmax_lse(zs)
        q = mx.exp(lp)
        rest = mx.maximum(1.0 - q.sum(-1, keepdims=True), 1e-6)
        u = rest / max(vocab - k, 1)
        logp_top = mx.take_along_axis(zs, idx, -1) - lse
        logp_rest = zs.sum(-1, keepdims=True) - vocab * lse - logp_top.sum(-1, keepdims=True)
        loss = (q * (lp - logp_top)).sum(-1) + (rest * mx.log(u) - u * logp_rest)[..., 0]
        if ce_weight:
            loss = loss + ce_weight * (lse[..., 0] - mx.take_along_axis(zs, y[..., None], -1)[..., 0])
        return loss, ps, q, u

    @rows.vjp
    def rows_vjp(primals, cotangents, outputs):
        zs, idx, lp, y = primals
        _, ps, q, u = outputs
        g = mx.put_along_axis(ps - u, idx, mx.take_along_axis(ps, idx, -1) - q, axis=-1)
        if ce_weight:
            g = g + ce_weight * _minus_onehot(ps, y)
        return g * cotangents[0][..., None], mx.zeros_like(idx), mx.zeros_like(lp), mx.zeros_like(y)

    return rows


def dense_logprobs(idx: mx.array, logp: mx.array, vocab: int) -> mx.array:
    """Full-vocabulary teacher log-probs from top-k: the k entries as stored,
    the remaining mass spread evenly over the rest of the vocabulary."""
    k = logp.shape[-1]
    rest = mx.maximum(1.0 - mx.exp(logp).sum(-1, keepdims=True), 1e-6)
    fill = mx.log(rest / max(vocab - k, 1))
    full = mx.broadcast_to(fill, (*logp.shape[:-1], vocab))
    return mx.put_along_axis(full, idx, logp, axis=-1)


def distill_loss(logits: mx.array, targets: mx.array, teacher, cfg) -> mx.array:
    """The reference (MLX ops) mean per-token loss on full logits: a KL-type
    distance to the teacher (times T^2) plus ``cfg.ce_weight`` * CE; plain CE
    without a teacher or with loss=ce. ``teacher`` is the teacher's logits or
    a top-k (indices, log-probs) pair."""
    if teacher is None or cfg.loss == "ce":
        return nn.losses.cross_entropy(logits, targets).mean()
    t = cfg.temperature
    if isinstance(teacher, tuple):
        if cfg.loss == "forward_kl" and t == 1.0:
            return _topk_forward_kl(cfg.ce_weight)(logits, *teacher, targets)[0].mean()
        teacher = dense_logprobs(*teacher, logits.shape[-1])
    if cfg.loss in ("reverse_kl", "forward_kl"):
        if t == 1.0:
            return _fused_kd(cfg.loss, cfg.ce_weight)(logits, teacher, targets)[0].mean()
        kl = _fused_kd(cfg.loss, 0.0)(logits / t, teacher / t, targets)[0].mean() * t * t
        return kl + cfg.ce_weight * nn.losses.cross_entropy(logits, targets).mean() if cfg.ce_weight else kl
    if cfg.loss != "jsd":
        raise CBDError(f"unknown loss '{cfg.loss}'; choose one of {', '.join(LOSSES)}")
    log_s = nn.log_softmax(logits / t, axis=-1)
    log_t = nn.log_softmax(teacher / t, axis=-1)
    p_s, p_t = mx.exp(log_s), mx.exp(log_t)
    log_m = mx.log(0.5 * (p_s + p_t) + 1e-20)
    kl = 0.5 * (p_t * (log_t - log_m)).sum(-1) + 0.5 * (p_s * (log_s - log_m)).sum(-1)
    loss = kl.mean() * t * t
    return loss + cfg.ce_weight * nn.losses.cross_entropy(logits, targets).mean() if cfg.ce_weight else loss


# ---------------------------------------------------------------- the fast CPU path

def _teacher_np(teacher) -> tuple[str | None, tuple]:
    """(kind, arrays) of a teacher signal for cpu_head."""
    if teacher is None:
        return None, ()
    if isinstance(teacher, TopK):
        return "topk", (teacher.idx, teacher.logp)
    if numpy_ready(teacher):
        return "head", (teacher.h, teacher.w)
    return "other", ()


def _fused_cpu(spec: cpu_head.Spec, kind: str | None, need_dw: bool, n_teacher: int):
    """An MLX function (h, w, y, *teacher) -> mean loss whose forward runs
    cpu_head (computing the gradients at once) and whose vjp hands them on."""

    @mx.custom_function
    def f(h, w, y, *t):
        d = h.shape[-1]
        hn = np.asarray(h).reshape(-1, d)
        yn = np.asarray(y).reshape(-1)
        tn = None
        if kind == "topk":
            tn = ("topk", np.asarray(t[0]).reshape(len(yn), -1), np.asarray(t[1]).reshape(len(yn), -1))
        elif kind == "head":
            tn = ("head", np.asarray(t[0]).reshape(len(yn), -1), np.asarray(t[1]))
        total, dh, dw = cpu_head.loss_and_grads(hn, np.asarray(w), yn, spec, tn, grad=True, need_dw=need_dw)
        n = len(yn)
        dh *= 1.0 / n
        # a frozen head gets a broadcast zero (nothing allocated; its gradient is never used)
        dw_mx = mx.array(dw * (1.0 / n)) if dw is not None else mx.broadcast_to(mx.zeros((), w.dtype), w.shape)
        return mx.array(total / n, dtype=mx.float32), mx.array(dh).reshape(h.shape), dw_mx

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        c = cotangents[0]
        return (c * outputs[1], c * outputs[2], mx.zeros_like(primals[2])) + tuple(
            mx.zeros_like(p) for p in primals[3:])

    return f


def vocab_loss(out, y: mx.array, teacher, spec: cpu_head.Spec) -> mx.array:
    """Mean per-token loss of the head output ``out`` (HeadOut or logits)
    against targets ``y`` and ``teacher`` (None, HeadOut, TopK or logits)."""
    kind, t_arrays = _teacher_np(teacher) if spec.mode != "ce" else (None, ())
    if fast_cpu() and numpy_ready(out) and kind != "other" and cpu_head.supports(spec, kind):
        return _fused_cpu(spec, kind, out.trainable, len(t_arrays))(out.h, out.w, y, *t_arrays)[0]
    if isinstance(teacher, (HeadOut, TopK)):
        teacher = logits_of(teacher) if isinstance(teacher, HeadOut) else tuple(teacher)
    return distill_loss(logits_of(out), y, teacher if spec.mode != "ce" else None,
                        _SpecCfg(spec.mode, spec.temperature, spec.ce_weight))


class _SpecCfg(NamedTuple):
    loss: str
    temperature: float
    ce_weight: float


def heldout_sum(model: nn.Module, x: mx.array, y: mx.array) -> float:
    """Summed CE of ``model`` on ``x`` -> ``y`` (no gradient)."""
    out = head_out(model, x)
    if fast_cpu() and numpy_ready(out):
        d = out.h.shape[-1]
        total, _, _ = cpu_head.loss_and_grads(np.asarray(out.h).reshape(-1, d), np.asarray(out.w),
                                              np.asarray(y).reshape(-1), cpu_head.Spec("ce"), grad=False)
        return total
    return float(nn.losses.cross_entropy(logits_of(out).astype(mx.float32), y, reduction="sum"))


def uld_loss(logits: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """ULD, the cross-tokenizer loss of bridge distillation: masked mean L1
    distance between sorted top-k probability vectors (the source's, already
    in ``targets``)."""
    k = targets.shape[-1]
    p = mx.softmax(logits.astype(mx.float32), axis=-1)
    top = mx.sort(mx.topk(p, k, axis=-1), axis=-1)[..., ::-1]
    d = mx.abs(top - targets).sum(-1)
    return (d * mask).sum() / mx.maximum(mask.sum(), 1.0)


def windows_nll(model: nn.Module, batches: Iterable[np.ndarray], on_batch: Callable[[int], None] | None = None
                ) -> tuple[float, int]:
    """(summed next-token CE, tokens scored) of ``model`` over batches of
    token windows (int arrays [batch, seq_len]): the one held-out loss loop of
    evaluation, training and init's alpha grid."""
    total, count = 0.0, 0
    for b in batches:
        x = mx.array(b)
        total += heldout_sum(model, x[:, :-1], x[:, 1:])
        k = x.shape[0] * (x.shape[1] - 1)
        count += k
        if on_batch is not None:
            on_batch(k)
    return total, count


# ---------------------------------------------------------------- loss functions

def ce_loss() -> LossFn:
    """Next-token cross-entropy (recover, the scratch baseline)."""
    return kd_loss("ce")


def kd_loss(mode: str = "forward_kl", temperature: float = 1.0, ce_weight: float = 0.0,
            uld_weight: float = 0.0) -> LossFn:
    """Forward or reverse KL to the batch's teacher (times T^2), plus
    ``ce_weight`` x CE; plain CE for mode "ce" or a batch without a teacher;
    plus ``uld_weight`` x the ULD cross-tokenizer loss of the batch's
    ``xvocab`` targets (bridge distillation)."""
    spec = cpu_head.Spec(mode, float(temperature), float(ce_weight))

    def loss(model: nn.Module, batch: Batch) -> mx.array:
        out = head_out(model, batch.x)
        return _plus_uld(vocab_loss(out, batch.y, batch.teacher, spec), out, batch, uld_weight)

    loss.reads_teacher = mode != "ce"
    return loss


def jsd_loss(temperature: float = 1.0, ce_weight: float = 0.0, uld_weight: float = 0.0) -> LossFn:
    """Jensen-Shannon divergence to the teacher (MLX ops on every device)."""
    cfg = _SpecCfg("jsd", float(temperature), float(ce_weight))

    def loss(model: nn.Module, batch: Batch) -> mx.array:
        t = batch.teacher
        t = logits_of(t) if isinstance(t, HeadOut) else tuple(t) if isinstance(t, TopK) else t
        out = head_out(model, batch.x)
        return _plus_uld(distill_loss(logits_of(out), batch.y, t, cfg), out, batch, uld_weight)

    return loss


def _plus_uld(value: mx.array, out, batch: Batch, weight: float) -> mx.array:
    if not weight or batch.xvocab is None:
        return value
    return value + weight * uld_loss(logits_of(out), *batch.xvocab)


def from_config(cfg) -> LossFn:
    """The loss a TrainConfig names (loss, temperature, ce_weight, xvocab_weight)."""
    if cfg.loss not in LOSSES:
        raise CBDError(f"unknown loss '{cfg.loss}'; choose one of {', '.join(LOSSES)}")
    if cfg.loss == "jsd":
        return jsd_loss(cfg.temperature, cfg.ce_weight, cfg.xvocab_weight)
    return kd_loss(cfg.loss, cfg.temperature, cfg.ce_weight, cfg.xvocab_weight)
