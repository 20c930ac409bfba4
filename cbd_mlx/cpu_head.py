"""The output head and its loss, fused, in numpy: the CPU fast path.

On CPU, MLX's elementwise kernels run 3-10x slower than numpy's, and a
training step over a 49K vocabulary spends most of its time in passes over
the (tokens x vocab) logits. Here the logits are never held by MLX: for a
chunk of rows at a time, ``z = h @ w.T`` (BLAS), the softmax, the loss and
its gradient with respect to ``z`` are computed in numpy, and only
``dh = g @ w`` (and ``dw = G.T @ h`` when the head trains) go back.

Pure arrays in, arrays out; ``losses.py`` wraps it as an MLX function with
a hand-written gradient. Supported: cross-entropy; forward and reverse KL
against a dense teacher (its final hidden states and head weight) at any
temperature; forward KL against a top-k teacher at temperature 1; each plus
``ce_weight`` x CE. Anything else takes the plain MLX path.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import cpu_threads

CHUNK_ELEMS = 1 << 23  # logits per chunk (32 MB of fp32): bounds the temporaries
CHUNK_ELEMS_DW = 1 << 26  # with the head's gradient: bigger chunks (256 MB) keep dw's matmul efficient
FLOOR = -60.0  # lowest log-probability kept in a softmax (e^-60 ~ 1e-26, a normal float)


class Spec(NamedTuple):
    mode: str  # "ce", "forward_kl" or "reverse_kl"
    temperature: float = 1.0
    ce_weight: float = 0.0


def supports(spec: Spec, teacher_kind: str | None) -> bool:
    """Whether the fast path computes ``spec`` against a teacher of that kind
    (None, "head": dense hidden + weight, "topk": cached top-k log-probs)."""
    if spec.mode == "ce" or teacher_kind is None:
        return True
    if spec.mode not in ("forward_kl", "reverse_kl"):
        return False
    return teacher_kind == "head" or (teacher_kind == "topk" and spec.mode == "forward_kl"
                                       and spec.temperature == 1.0)


def _exp_shifted(z: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """exp(z - rowmax) into ``out`` (may be ``z``); returns (rowmax, rowsum)."""
    m = z.max(axis=1, keepdims=True)
    np.subtract(z, m, out=out)
    np.maximum(out, FLOOR, out=out)  # probabilities below e^-60 stay normal floats: denormals are ~100x slower
    np.exp(out, out=out)
    return m[:, 0], out.sum(axis=1)


def _exp_rows(z: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_exp_shifted`` over row blocks on every core."""
    parts = cpu_threads.rows(_exp_shifted, z, out)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _softmax(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Row softmax of ``z`` into ``out`` (may be ``z``); returns the row logsumexp."""
    m, s = _exp_rows(z, out)
    cpu_threads.rows(lambda o, d: np.divide(o, d[:, None], out=o), out, s)
    return m + np.log(s)


def _add_dw(dw: np.ndarray, g: np.ndarray, h: np.ndarray, first: bool) -> None:
    """dw (+)= g.T @ h: the first chunk writes ``dw`` (no zero fill, no temporary)."""
    if first:
        np.matmul(g.T, h, out=dw)
    else:
        dw += g.T @ h


def _chunk_rows(vocab: int, n: int, elems: int = CHUNK_ELEMS) -> int:
    return max(1, min(n, elems // max(vocab, 1)))


@np.errstate(all="ignore")  # a diverging run's inf/nan reach the training guards, not the terminal
def loss_and_grads(h: np.ndarray, w: np.ndarray, y: np.ndarray, spec: Spec, teacher=None, *,
                   grad: bool = True, need_dw: bool = False):
    """Summed loss over rows of ``h`` (n, d) with head ``w`` (vocab, d) and
    targets ``y`` (n,); with ``grad`` also ``dh`` (n, d) and, with
    ``need_dw``, ``dw`` (vocab, d) of that sum (else None).

    ``teacher``: None, ("head", ht (n, dt), wt (vocab, dt)) or
    ("topk", idx (n, k), logp (n, k))."""
    if spec.mode != "ce" and teacher is not None and teacher[0] == "head":
        return _dense_loss_and_grads(h, w, y, spec, teacher, grad=grad, need_dw=need_dw)
    return _sparse_loss_and_grads(h, w, y, spec, teacher if spec.mode != "ce" else None, grad=grad,
                                  need_dw=need_dw)


def _sparse_loss_and_grads(h, w, y, spec: Spec, teacher, *, grad: bool, need_dw: bool):
    """CE, or forward KL against a top-k teacher plus ``ce_weight`` x CE,
    with one pass of exp over the logits and none over a gradient array.

    Per row the logits' gradient is ``a (e - S / a)``: ``e`` the unnormalized
    softmax (computed in the logits' own buffer), ``a`` = (1 + ce_weight) /
    sum(e), and ``S`` the teacher's share: its probability at each top-k
    token, its uniform rest mass ``u`` elsewhere, plus ce_weight at the target
    (plain CE: 1 at the target). ``e - S / a`` is formed in place, and the
    row scale ``a`` is applied to ``e @ w`` (n x d) and to ``h`` instead of
    to the (n x vocab) array."""
    n, vocab = h.shape[0], w.shape[0]
    need_dw = grad and need_dw
    r = _chunk_rows(vocab, n, CHUNK_ELEMS_DW if need_dw else CHUNK_ELEMS)
    topk = teacher is not None
    cw = float(spec.ce_weight) if topk else 1.0  # the CE term's weight (plain CE: 1, its only term)
    total = 0.0
    dh = np.empty_like(h) if grad else None
    dw = np.empty_like(w) if need_dw else None
    w_sum = w.sum(axis=0) if topk else None  # a row's sum of logits is h @ w_sum
    buf = np.empty((r, vocab), np.float32)
    for a0 in range(0, n, r):
        b0 = min(n, a0 + r)
        rows = np.arange(b0 - a0)
        hc, yc = h[a0:b0], y[a0:b0]
        e = np.matmul(hc, w.T, out=buf[:b0 - a0])
        zy = e[rows, yc].copy()
        if topk:
            idx, lp = teacher[1][a0:b0], teacher[2][a0:b0]
            z_top = np.take_along_axis(e, idx, axis=1)
        m, s = _exp_rows(e, e)
        lse = m + np.log(s)
        if cw:
            total += cw * float((lse - zy).sum())
        if topk:  # KL(teacher || student), the non-top-k mass spread evenly
            q = np.exp(lp)
            rest = np.maximum(1.0 - q.sum(axis=1), 1e-6)
            u = rest / max(vocab - idx.shape[1], 1)
            logp_top = z_top - lse[:, None]
            logp_rest = hc @ w_sum - vocab * lse - logp_top.sum(axis=1)
            total += float(((q * (lp - logp_top)).sum(axis=1) + rest * np.log(u) - u * logp_rest).sum())
        if not grad:
            continue
        scale = ((1.0 + cw if topk else 1.0) / s).astype(np.float32)
        if topk:
            cpu_threads.rows(lambda x, v: np.subtract(x, v[:, None], out=x), e, u / scale)
            e[rows[:, None], idx] -= ((q - u[:, None]) / scale[:, None])  # a row's top-k indices are distinct
        if cw:
            e[rows, yc] -= cw / scale
        np.matmul(e, w, out=dh[a0:b0])
        dh[a0:b0] *= scale[:, None]
        if need_dw:
            _add_dw(dw, e, hc * scale[:, None], first=a0 == 0)
    return total, dh, dw


def _dense_loss_and_grads(h, w, y, spec: Spec, teacher, *, grad: bool, need_dw: bool):
    """Forward or reverse KL against a dense teacher (hidden states and head)
    at any temperature, plus ``ce_weight`` x CE."""
    n, vocab = h.shape[0], w.shape[0]
    need_dw = grad and need_dw
    r = _chunk_rows(vocab, n, CHUNK_ELEMS_DW if need_dw else CHUNK_ELEMS)
    total = 0.0
    dh = np.empty_like(h) if grad else None
    dw = np.empty_like(w) if need_dw else None
    t = float(spec.temperature)
    c = float(spec.ce_weight)
    for a in range(0, n, r):
        b = min(n, a + r)
        rows = np.arange(b - a)
        yc = y[a:b]
        z = h[a:b] @ w.T
        zy = z[rows, yc]
        g = np.empty_like(z)
        # the CE term shares the student's softmax when the KL runs at temperature 1
        cw = c if t == 1.0 else 0.0
        kl, lse = _dense_kl(z, g, teacher[1][a:b] @ teacher[2].T, spec.mode, t, cw)
        total += kl
        if cw:
            total += cw * float((lse - zy).sum())
            if grad:
                g[rows, yc] -= cw
        elif c:  # temperature != 1: CE on the untempered logits, its own softmax
            p1 = np.empty_like(z)
            lse1 = _softmax(z, out=p1)
            total += c * float((lse1 - zy).sum())
            if grad:
                p1[rows, yc] -= 1.0
                p1 *= c
                g += p1
        if grad:
            np.matmul(g, w, out=dh[a:b])
        if need_dw:
            _add_dw(dw, g, h[a:b], first=a == 0)
    return total, dh, dw


def _lse(z: np.ndarray) -> np.ndarray:
    m, s = _exp_rows(z, np.empty_like(z))
    return m + np.log(s)


def _dense_kl(z: np.ndarray, g: np.ndarray, zt: np.ndarray, mode: str, t: float, cw: float):
    """KL between the student's and the teacher's tempered distributions of
    one chunk, times t^2, and the student's logsumexp; writes the gradient
    w.r.t. the student's logits into ``g``, plus ``cw`` x the softmax (the
    CE term's share; its one-hot part is the caller's)."""
    zs = z / t if t != 1.0 else z
    if t != 1.0:
        zt /= t
    ps = g
    lse_s = _softmax(zs, out=ps)
    pt = np.empty_like(zt)
    lse_t = _softmax(zt, out=pt)
    if mode == "forward_kl":  # KL(t || s) = sum pt (zt - zs) - lse_t + lse_s; grad t (ps - pt)
        kl = np.einsum("ij,ij->i", pt, zt - zs) - lse_t + lse_s
        if t != 1.0 or cw:
            g *= t + cw
        g -= pt if t == 1.0 else pt * t
    else:  # KL(s || t) with d = log ps - log pt; grad t ps (d - kl)
        d = zs - zt
        d -= (lse_s - lse_t)[:, None]
        kl = np.einsum("ij,ij->i", ps, d)
        d -= kl[:, None]
        if t != 1.0:
            d *= t
        if cw:
            d += cw
        g *= d
    return float(kl.sum()) * t * t, lse_s


@np.errstate(all="ignore")
def topk_logprobs(h: np.ndarray, w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` log-probabilities (indices, values) of each row's ``h @ w.T``."""
    n, vocab = h.shape[0], w.shape[0]
    r = _chunk_rows(vocab, n)
    idx = np.empty((n, k), np.int64)
    val = np.empty((n, k), np.float32)
    for a in range(0, n, r):
        z = h[a:a + r] @ w.T
        lse = _lse(z)
        top = np.argpartition(-z, k - 1, axis=1)[:, :k]
        idx[a:a + r] = top
        val[a:a + r] = np.take_along_axis(z, top, axis=1) - lse[:, None]
    return idx, val
