"""Identities of Subset / Expand / blend on tiny models of every family."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from conftest import HELDOUT, TINY_CONFIGS, random_weights, save_tiny

from cbd_mlx.arch.anchor import model_from_weights
from cbd_mlx.arch.families import FAMILIES, family_of
from cbd_mlx.arch.shapes import config_for, shape_of
from cbd_mlx.loader import load_anchor
from cbd_mlx.method.interpolation import grow
from cbd_mlx.method.operators import Selection, blend, expand, iter_compensate, iter_subset, subset
from cbd_mlx.method.ranking import collect_stats, placement, select, uniform_rankings


def logits(config, weights, tokens):
    model = model_from_weights(config, weights)
    return np.array(model(mx.array(tokens)[None]).astype(mx.float32))[0]


def text_tokens(tokenizer_dir, n=96):
    from cbd_mlx.loader import load_tokenizer

    return load_tokenizer(tokenizer_dir).encode(HELDOUT.read_text()[:2000])[:n]


def smaller(fam, shape):
    """A shape smaller on every axis (keeping the query group size)."""
    group = shape.heads // shape.kv_heads
    kv = max(1, shape.kv_heads // 2)
    heads = kv * group
    hidden = heads * shape.head_dim if fam.tied_attention_width else shape.hidden // 2
    ffn = 4 * hidden if fam.ffn_multiple else shape.ffn // 2
    return replace(shape, layers=shape.layers - 1, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv)


def scaled_eps(fam, cfg, small, big):
    """Expand's config: the norm epsilon scaled by d_S / d_T (see interpolate.target_config)."""
    out = dict(cfg)
    out[fam.eps_key] = cfg[fam.eps_key] * small.hidden / big.hidden
    return out


def test_subset_to_own_shape_is_identity(family_name):
    cfg = TINY_CONFIGS[family_name]
    fam = family_of(cfg)
    shape = shape_of(fam, cfg)
    w = random_weights(cfg)
    out = subset(fam, w, shape, Selection.full(shape))
    assert out.keys() == w.keys()
    for k in w:
        assert np.array_equal(out[k], w[k]), k


def test_subset_and_expand_shapes_match_mlx_lm(family_name):
    cfg = TINY_CONFIGS[family_name]
    fam = family_of(cfg)
    big = shape_of(fam, cfg)
    small = smaller(fam, big)
    w = random_weights(cfg)
    sel = select(big, small, uniform_rankings(big))
    sw = subset(fam, w, big, sel)
    small_cfg = config_for(fam, cfg, small)
    model_from_weights(small_cfg, sw)  # strict load: names and shapes exact
    grown = expand(fam, sw, small, big, placement(Selection.full(big), sel))
    model_from_weights(cfg, grown)


def test_expand_reproduces_logits_on_real_text(family_name, tokenizer_dir):
    """Expand(S) alone keeps S's function to fp32 tolerance in every family:
    RMSNorm through gain/epsilon scaling, LayerNorm also through mean-filled
    new residual channels (operators._fill_residual_mean)."""
    cfg = TINY_CONFIGS[family_name]
    fam = family_of(cfg)
    big = shape_of(fam, cfg)
    small = smaller(fam, big)
    small_cfg = config_for(fam, cfg, small)
    ws = random_weights(small_cfg, seed=1)
    sel = select(big, small, uniform_rankings(big))  # where S sits inside B's coordinates
    target = big
    place = placement(Selection.full(target), sel)
    wt = expand(fam, ws, small, target, place)
    t_cfg = scaled_eps(fam, cfg, small, target)
    toks = text_tokens(tokenizer_dir)
    ls, lt = logits(small_cfg, ws, toks), logits(t_cfg, wt, toks)
    np.testing.assert_allclose(lt, ls, rtol=1e-4, atol=1e-4)


def test_blend_endpoints(family_name):
    cfg = TINY_CONFIGS[family_name]
    fam = family_of(cfg)
    shape = shape_of(fam, cfg)
    a, b = random_weights(cfg, 1), random_weights(cfg, 2)
    for k, v in blend(a, b, 1.0).items():
        assert np.array_equal(v, a[k])
    for k, v in blend(a, b, 0.0).items():
        assert np.array_equal(v, b[k])
    mid = blend(a, b, 0.25)
    k = next(iter(a))
    np.testing.assert_allclose(mid[k], 0.25 * a[k] + 0.75 * b[k], rtol=1e-6)
    assert shape.layers == 4


def test_grow_is_function_preserving(tokenizer_dir):
    cfg = TINY_CONFIGS["llama"]
    fam = family_of(cfg)
    s = shape_of(fam, cfg)
    w = random_weights(cfg, 3)
    a = type("A", (), {})()
    a.family, a.weights, a.shape = fam, w, s
    t = replace(s, layers=6, hidden=96, ffn=192, heads=6, kv_heads=3)
    a.config = cfg
    wt, t_cfg = grow(a, t)
    toks = text_tokens(tokenizer_dir)
    np.testing.assert_allclose(logits(t_cfg, wt, toks), logits(cfg, w, toks), rtol=1e-4, atol=1e-4)


def test_every_family_round_trips_save_load(family_name, tokenizer_dir, tmp_path):
    from mlx_lm import load

    cfg = TINY_CONFIGS[family_name]
    w = random_weights(cfg, 4)
    d = save_tiny(tmp_path / "m", cfg, w, tokenizer_dir)
    a = load_anchor(str(d))
    assert a.family.name == FAMILIES[family_name].name
    for k in w:
        assert np.array_equal(a.weights[k], w[k]), k
    model, tok = load(str(d))  # mlx-lm itself accepts the directory
    assert tok.encode("hello world")
    toks = text_tokens(tokenizer_dir, 32)
    np.testing.assert_allclose(
        np.array(model(mx.array(toks)[None]))[0], logits(cfg, w, toks), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("g_big,g_small", [(1, 2), (2, 2)])
def test_expand_replicates_kv_heads_into_smaller_groups(g_big, g_small, tokenizer_dir):
    """GQA S into a target with smaller query groups (e.g. MHA): kv heads are
    replicated, the function is kept."""
    cfg = dict(TINY_CONFIGS["llama"])
    fam = family_of(cfg)
    s = replace(shape_of(fam, cfg), heads=4, kv_heads=4 // g_small)
    s_cfg = config_for(fam, cfg, s)
    w = random_weights(s_cfg, 5)
    t = replace(s, heads=6, kv_heads=6 // g_big, layers=5)
    place = Selection(
        [0, 1, 3, 4], list(range(s.hidden)), [list(range(s.ffn))] * 4,
        [[0, 1, 2, 3]] * 4, [list(range(s.kv_heads))] * 4,
    )
    wt = expand(fam, w, s, t, place)
    toks = text_tokens(tokenizer_dir)
    np.testing.assert_allclose(logits(config_for(fam, cfg, t), wt, toks), logits(s_cfg, w, toks), rtol=1e-5, atol=1e-5)


def test_lineage_composes_across_two_prunes(tokenizer_dir, tmp_path):
    """Subset(Subset(B -> A1) -> A2) == Subset(B -> A2) with the composed lineage."""
    from dataclasses import replace

    from conftest import TINY_CONFIGS, random_weights, save_tiny

    from cbd_mlx.arch.shapes import config_for
    from cbd_mlx.loader import load_anchor
    from cbd_mlx.method.operators import Selection
    from cbd_mlx.method.pruning import prune_weights

    cfg = TINY_CONFIGS["llama"]
    b = load_anchor(str(save_tiny(tmp_path / "b", cfg, random_weights(cfg, 2), tokenizer_dir)))
    s1 = replace(b.shape, layers=3, hidden=48, ffn=96)
    w1, lin1 = prune_weights(b, s1, None)
    a1 = load_anchor(str(save_tiny(tmp_path / "a1", config_for(b.family, cfg, s1), w1, tokenizer_dir)))
    s2 = replace(s1, layers=2, hidden=32, ffn=64, heads=2, kv_heads=1)
    w2, lin2 = prune_weights(a1, s2, None)
    composed = Selection.from_json(lin1).then(Selection.from_json(lin2))
    from cbd_mlx.method.operators import subset

    direct = subset(b.family, b.weights, b.shape, composed)
    for k, v in w2.items():
        np.testing.assert_array_equal(direct[k], v, err_msg=k)


def test_compensated_subset_is_closer_to_its_parent(tokenizer_dir, tmp_path):
    """Least-squares FFN compensation: nothing removed, nothing changes; half
    the FFN channels removed, the pruned model's logits on the calibration
    text move closer to the full model's than plain Subset's."""
    cfg = TINY_CONFIGS["llama"]
    fam = family_of(cfg)
    shape = shape_of(fam, cfg)
    anchor = load_anchor(str(save_tiny(tmp_path / "big", cfg, random_weights(cfg, 4), tokenizer_dir)))
    toks = text_tokens(tokenizer_dir, 96)
    grams = collect_stats(anchor, np.array([toks]), grams=True).grams
    full = Selection.full(shape)
    same = dict(iter_compensate(fam, iter_subset(fam, anchor.weights, shape, full), anchor.weights, shape, full, grams))
    assert all(np.array_equal(same[k], anchor.weights[k]) for k in same)

    rng = np.random.default_rng(0)
    half = replace(full, ffn=[sorted(rng.choice(shape.ffn, shape.ffn // 2, replace=False).tolist())
                              for _ in range(shape.layers)])
    plain = subset(fam, anchor.weights, shape, half)
    comp = dict(iter_compensate(fam, iter_subset(fam, anchor.weights, shape, half), anchor.weights, shape, half,
                                grams))
    child_cfg = config_for(fam, cfg, half.shape(shape))
    ref = logits(cfg, anchor.weights, toks)
    err = lambda w: float(np.abs(logits(child_cfg, w, toks) - ref).mean())  # noqa: E731
    assert err(comp) < 0.8 * err(plain)
