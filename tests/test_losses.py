"""The loss functions: the CPU fast path (cpu_head, numpy) against the plain
MLX reference, values and gradients, on every family's output head."""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import TINY_CONFIGS, random_weights
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.activations import swiglu

from cbd_mlx import cpu_block, cpu_kernels, cpu_memory, cpu_threads, losses
from cbd_mlx.arch.anchor import model_from_weights
from cbd_mlx.train import TrainConfig, _ScaledAdamW, _Updater

V, D, N = 300, 16, 24


def _rel(a: mx.array, b: mx.array) -> float:
    return float(mx.abs(a - b).max()) / max(float(mx.abs(b).max()), 1e-12)


def _both(monkeypatch, fn):
    """fn() on the fast path and on the plain MLX path."""
    monkeypatch.setenv("CBD_MLX_FAST_HEAD", "1")
    fast = fn()
    monkeypatch.setenv("CBD_MLX_FAST_HEAD", "0")
    plain = fn()
    return fast, plain


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    h = mx.array(rng.standard_normal((2, N // 2, D)).astype(np.float32))
    w = mx.array((rng.standard_normal((V, D)) * 0.7).astype(np.float32))
    ht = mx.array(rng.standard_normal((2, N // 2, D + 8)).astype(np.float32))
    wt = mx.array((rng.standard_normal((V, D + 8)) * 0.7).astype(np.float32))
    y = mx.array(rng.integers(0, V, (2, N // 2)).astype(np.int32))
    return h, w, ht, wt, y


SPECS = [("ce", 1.0, 0.0), ("forward_kl", 1.0, 0.0), ("forward_kl", 1.0, 0.5), ("forward_kl", 2.0, 0.5),
         ("reverse_kl", 1.0, 0.0), ("reverse_kl", 1.0, 0.5), ("reverse_kl", 2.0, 0.3)]


def _check_head(monkeypatch, h, w, y, teacher, spec, trainable: bool) -> None:
    """The loss and its gradients (w.r.t. the hidden states, and the head when
    it trains) agree on the fast path and on the MLX ops."""

    def run():
        f = lambda hh, ww: losses.vocab_loss(losses.HeadOut(hh, ww, trainable), y, teacher, spec)  # noqa: E731
        v, (gh, gw) = mx.value_and_grad(f, argnums=(0, 1))(h, w)
        mx.eval(v, gh, gw)
        return v, gh, gw

    (v1, gh1, gw1), (v2, gh2, gw2) = _both(monkeypatch, run)
    assert abs(float(v1) - float(v2)) <= 1e-4 * abs(float(v2))
    assert _rel(gh1, gh2) <= 1e-4
    if trainable:
        assert _rel(gw1, gw2) <= 1e-4


@pytest.mark.parametrize("mode,t,c", SPECS)
@pytest.mark.parametrize("trainable", [True, False])
def test_fast_head_matches_mlx_dense_teacher(monkeypatch, mode, t, c, trainable, split):
    h, w, ht, wt, y = _arrays()
    _check_head(monkeypatch, h, w, y, losses.HeadOut(ht, wt), losses.cpu_head.Spec(mode, t, c), trainable)


@pytest.mark.parametrize("c", [0.0, 0.5])
def test_fast_head_matches_mlx_topk_teacher(monkeypatch, c, split):
    h, w, ht, wt, y = _arrays(1)
    logp = nn.log_softmax(ht @ wt.T, axis=-1)
    idx = mx.argsort(-logp, axis=-1)[..., :8].astype(mx.int32)
    teacher = losses.TopK(idx, mx.take_along_axis(logp, idx, -1))
    _check_head(monkeypatch, h, w, y, teacher, losses.cpu_head.Spec("forward_kl", 1.0, c), True)


def test_chunks_do_not_change_the_result(monkeypatch):
    h, w, ht, wt, y = _arrays(2)
    hn, wn, yn = np.asarray(h).reshape(-1, D), np.asarray(w), np.asarray(y).reshape(-1)
    spec = losses.cpu_head.Spec("forward_kl", 1.0, 0.5)
    teacher = ("head", np.asarray(ht).reshape(N, -1), np.asarray(wt))
    whole = losses.cpu_head.loss_and_grads(hn, wn, yn, spec, teacher, need_dw=True)
    monkeypatch.setattr(losses.cpu_head, "CHUNK_ELEMS", 5 * V)  # 5 rows per chunk, the last one short
    chunked = losses.cpu_head.loss_and_grads(hn, wn, yn, spec, teacher, need_dw=True)
    assert abs(whole[0] - chunked[0]) < 1e-4
    np.testing.assert_allclose(whole[1], chunked[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whole[2], chunked[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_trains_the_same_on_both_paths(monkeypatch, family):
    """head_out finds each family's head (tied or not); the model's gradients
    through a KD + CE loss agree on both paths, and the head is restored."""
    cfg = TINY_CONFIGS[family]
    model = model_from_weights(cfg, random_weights(cfg, 0))
    teacher = model_from_weights(cfg, random_weights(cfg, 1))
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, V, (2, 9)).astype(np.int32))
    batch_x, batch_y = x[:, :-1], x[:, 1:]
    out = losses.head_out(model, batch_x)
    assert isinstance(out, losses.HeadOut)
    assert _rel(out.logits(), model(batch_x)) < 1e-5  # the tap is gone after the call
    fn = losses.kd_loss("forward_kl", 1.0, 0.5)

    def run():
        batch = losses.Batch(batch_x, batch_y, losses.teacher_out(teacher, batch_x))
        v, g = nn.value_and_grad(model, fn)(model, batch)
        mx.eval(v, g)
        return v, dict(__import__("mlx.utils").utils.tree_flatten(g))

    (v1, g1), (v2, g2) = _both(monkeypatch, run)
    assert abs(float(v1) - float(v2)) <= 1e-4 * abs(float(v2))
    assert g1.keys() == g2.keys()
    for k in g1:
        assert _rel(g1[k], g2[k]) <= 1e-4, k


def test_frozen_head_gets_no_gradient(monkeypatch):
    cfg = TINY_CONFIGS["llama"]
    model = model_from_weights(cfg, random_weights(cfg, 0))
    model.model.embed_tokens.freeze()
    x = mx.array(np.arange(18, dtype=np.int32).reshape(2, 9))
    out = losses.head_out(model, x)
    assert not out.trainable
    _, g = nn.value_and_grad(model, losses.ce_loss())(model, losses.Batch(x[:, :-1], x[:, 1:]))
    assert "weight" not in g["model"]["embed_tokens"]


def test_heldout_sum_matches_cross_entropy(monkeypatch):
    cfg = TINY_CONFIGS["qwen3"]
    model = model_from_weights(cfg, random_weights(cfg, 0))
    x = mx.array(np.random.default_rng(3).integers(0, V, (3, 10)).astype(np.int32))
    a, b = _both(monkeypatch, lambda: losses.heldout_sum(model, x[:, :-1], x[:, 1:]))
    ref = float(nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:], reduction="sum"))
    assert abs(a - ref) <= 1e-4 * ref and abs(b - ref) <= 1e-4 * ref


@pytest.fixture(params=[False, True], ids=["whole", "row-split"])
def split(request, monkeypatch):
    """Run a numpy kernel whole, then split over threads even at test sizes."""
    if request.param:
        monkeypatch.setattr(cpu_threads, "MIN_ELEMS", 1)


@pytest.mark.parametrize("heads,kv", [(4, 2), (4, 4), (6, 2)])
def test_numpy_attention_matches_mlx(heads, kv, split):
    rng = np.random.default_rng(heads * 10 + kv)
    q, k, v = (mx.array(rng.standard_normal(s).astype(np.float32))
               for s in ((2, heads, 7, 8), (2, kv, 7, 8), (2, kv, 7, 8)))
    cot = mx.array(rng.standard_normal((2, heads, 7, 8)).astype(np.float32))

    def ref(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask="causal")

    def ours(q, k, v):
        return cpu_kernels.attention(q, k, v, 0.35)

    o1, g1 = mx.vjp(ours, [q, k, v], [cot])
    o2, g2 = mx.vjp(ref, [q, k, v], [cot])
    assert _rel(o1[0], o2[0]) < 1e-5
    for a, b in zip(g1, g2):
        assert _rel(a, b) < 1e-4


def test_numpy_swiglu_matches_mlx(split):
    rng = np.random.default_rng(5)
    g, x, cot = (mx.array((rng.standard_normal((2, 5, 12)) * 4).astype(np.float32)) for _ in range(3))
    o1, g1 = mx.vjp(cpu_kernels.swiglu, [g, x], [cot])
    o2, g2 = mx.vjp(swiglu, [g, x], [cot])
    assert _rel(o1[0], o2[0]) < 1e-5
    for a, b in zip(g1, g2):
        assert _rel(a, b) < 1e-4


def _llama(**kw):
    from mlx_lm.models import llama

    cfg = {**TINY_CONFIGS["llama"], **kw}
    return model_from_weights(cfg, random_weights(cfg, 0)), llama


@pytest.mark.parametrize("kw", [{}, dict(num_attention_heads=4, num_key_value_heads=4),
                                dict(rope_theta=500.0, rms_norm_eps=1e-3, intermediate_size=96)],
                         ids=["gqa", "mha", "theta-eps-ffn"])
def test_numpy_block_matches_mlx(kw, split):
    """A whole llama block in numpy: output and every gradient (input, all
    nine weights) match mlx-lm's block to fp32 tolerance."""
    model, llama = _llama(**kw)
    layer = model.model.layers[1]
    assert cpu_block.covered(layer) is not None
    rng = np.random.default_rng(7)
    x = mx.array(rng.standard_normal((2, 11, 64)).astype(np.float32))
    cot = mx.array(rng.standard_normal((2, 11, 64)).astype(np.float32))

    def run():
        f = lambda m, x: (m(x, "causal", None) * cot).sum()  # noqa: E731
        (v, g), gx = nn.value_and_grad(layer, f)(layer, x), mx.grad(lambda x: f(layer, x))(x)
        mx.eval(v, g, gx)
        return v, dict(tree_flatten(g)), gx

    v2, g2, gx2 = run()
    with cpu_block.patched(model):
        assert type(layer) is not llama.TransformerBlock  # the numpy block inside
        v1, g1, gx1 = run()
    assert type(layer) is llama.TransformerBlock and not hasattr(layer, "_cbd_dims")
    assert abs(float(v1) - float(v2)) <= 1e-4 * abs(float(v2))
    assert _rel(gx1, gx2) <= 1e-4
    assert g1.keys() == g2.keys() and len(g1) == 9
    for k in g1:
        assert _rel(g1[k], g2[k]) <= 1e-4, k


def test_numpy_block_leaves_other_calls_to_mlx_lm():
    """Blocks it does not compute (bias, sliding window, half precision) keep
    mlx-lm's; within the patch a KV-cache call (generation) still runs
    mlx-lm's block, and the class comes back after an exception."""
    from mlx_lm.models.cache import make_prompt_cache

    assert cpu_block.covered(_llama(attention_bias=True)[0].model.layers[0]) is None
    half, _ = _llama()
    half.set_dtype(mx.float16)
    assert cpu_block.covered(half.model.layers[0]) is None
    model, llama = _llama()
    x = mx.array(np.arange(12, dtype=np.int32).reshape(2, 6))
    ref = model(x, cache=make_prompt_cache(model))
    with pytest.raises(RuntimeError):
        with cpu_block.patched(model):
            assert _rel(model(x, cache=make_prompt_cache(model)), ref) < 1e-6
            raise RuntimeError
    assert all(type(m) is llama.TransformerBlock for m in model.model.layers)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_scaled_adamw_is_adamw_on_scaled_gradients(bias_correction):
    """The trainer's AdamW with the gradients' scale folded into its moments
    gives mlx's AdamW on the scaled gradients, step after step."""
    mx.random.seed(0)
    p, g = mx.random.normal((8, 16)), mx.random.normal((8, 16))
    kw = dict(learning_rate=1e-2, weight_decay=0.1, bias_correction=bias_correction)
    plain, folded = optim.AdamW(**kw), _ScaledAdamW(**kw)
    pa, pb = {"w": p}, {"w": p}
    for scale in (0.3, 2.0, 0.7):
        pa = plain.apply_gradients({"w": g * scale}, pa)
        folded.grad_scale = mx.array(scale)
        pb = folded.apply_gradients({"w": g}, pb)
    assert float(mx.abs(pa["w"] - pb["w"]).max()) <= 1e-6 * float(mx.abs(pa["w"]).max())
    assert float(mx.abs(pa["w"] - p).max()) > 1e-3  # it moved


@pytest.mark.parametrize("max_norm", [0.0, 1e-3, 10.0])
def test_numpy_norm_update_matches_clip_grad_norm(monkeypatch, max_norm):
    """The CPU update (numpy global norm, clipping folded into one factor)
    gives the weights of the compiled MLX step with optim.clip_grad_norm:
    clipping off, active, and inactive."""
    config = TINY_CONFIGS["llama"]

    def run():
        model = model_from_weights(config, random_weights(config))
        mx.random.seed(3)
        grads = tree_map(lambda p: mx.random.normal(p.shape) * 1e-2, model.trainable_parameters())
        upd = _Updater(model, TrainConfig(tokens=10**4, max_grad_norm=max_norm), 10)
        for _ in range(3):
            upd.apply(grads, 0.5)
        return dict(tree_flatten(model.parameters()))

    fast, plain = _both(monkeypatch, run)
    assert max(float(mx.abs(fast[k] - plain[k]).max()) for k in plain) <= 1e-6


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_training_keeps_large_blocks_in_the_heap():
    """On Linux (glibc) the CPU trainer raises the mmap threshold: a 64 MB
    array then comes from the heap (reused from step to step), not from a
    fresh mapping (glibc's mallinfo2: bytes in mmapped blocks)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    n = 16 << 20  # 64 MB of fp32, above glibc's largest dynamic threshold (32 MB)
    assert cpu_memory.keep_large_blocks()
    before = mallinfo2()
    a = np.ones(n, np.float32)
    after = mallinfo2()
    assert after.hblkhd - before.hblkhd < a.nbytes  # not mapped
    assert after.uordblks - before.uordblks > a.nbytes // 2  # in the heap's blocks in use
