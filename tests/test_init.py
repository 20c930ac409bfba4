"""prune -> init on tiny models: lineage, blend endpoints, alignment."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from conftest import CALIB, HELDOUT, TINY_CONFIGS, random_weights, save_tiny

from cbd_mlx.arch.anchor import model_from_weights
from cbd_mlx.arch.families import family_of
from cbd_mlx.arch.shapes import config_for, count_params, solve_shape
from cbd_mlx.calibration import calibration_batches
from cbd_mlx.errors import CBDError
from cbd_mlx.evaluate import tokenize_file
from cbd_mlx.loader import load_anchor, load_tokenizer
from cbd_mlx.method.interpolation import SUBSET_MARGIN, default_alpha, interpolate, pick_alpha
from cbd_mlx.method.operators import Selection, expand, subset
from cbd_mlx.method.pruning import prune_weights
from cbd_mlx.method.ranking import align, placement


def calib(tokenizer_dir, n=1024):
    return calibration_batches(tokenize_file(load_tokenizer(tokenizer_dir), CALIB), 128, n)


def child_of(fam, shape):
    group = shape.heads // shape.kv_heads
    kv = max(1, shape.kv_heads // 2)
    hidden = kv * group * shape.head_dim if fam.tied_attention_width else 40
    ffn = 4 * hidden if fam.ffn_multiple else 72
    return replace(shape, layers=2, hidden=hidden, ffn=ffn, heads=kv * group, kv_heads=kv)


@pytest.fixture
def pair(family_name, tokenizer_dir, tmp_path):
    """(big anchor, pruned child anchor) of one family, saved and reloaded."""
    cfg = TINY_CONFIGS[family_name]
    big_dir = save_tiny(tmp_path / "big", cfg, random_weights(cfg, 7), tokenizer_dir)
    big = load_anchor(str(big_dir))
    child = child_of(big.family, big.shape)
    w, lineage = prune_weights(big, child, calib(tokenizer_dir))
    prov = {"kind": "pruned", "lineage": lineage}
    small_dir = save_tiny(tmp_path / "small", config_for(big.family, cfg, child), w, tokenizer_dir, prov)
    return big, load_anchor(str(small_dir))


def logits(config, weights, toks):
    return np.array(model_from_weights(config, weights)(mx.array(toks)[None]))[0]


def test_prune_records_lineage_and_is_a_subset(pair):
    big, small = pair
    lin = small.lineage
    assert lin["method"] == "activation-importance"
    assert len(lin["layers"]) == small.shape.layers and len(lin["hidden"]) == small.shape.hidden
    sel = Selection.from_json(lin)
    again = subset(big.family, big.weights, big.shape, sel)
    for k in again:
        assert np.array_equal(again[k], small.weights[k]), k


def test_init_endpoints_equal_expand_and_subset(pair, tokenizer_dir):
    big, small = pair
    mid = replace(big.shape, layers=3)
    toks = load_tokenizer(tokenizer_dir).encode(HELDOUT.read_text()[:1500])[:80]
    one = interpolate(big, small, mid, 1.0, log=lambda *_: None)
    zero = interpolate(big, small, mid, 0.0, log=lambda *_: None)
    sel_s = Selection.from_json(small.lineage)
    sel_t = Selection.from_json(one.info["selection_in_big"])
    exp = expand(big.family, small.weights, small.shape, mid, placement(sel_t, sel_s))
    sub = subset(big.family, big.weights, big.shape, sel_t)
    for k in exp:
        assert np.array_equal(one.weights[k], exp[k]), k
        assert np.array_equal(zero.weights[k], sub[k]), k
    # alpha = 1 is Expand alone: the smaller anchor's function, on real text
    np.testing.assert_allclose(
        logits(one.config, one.weights, toks), logits(small.config, small.weights, toks), rtol=1e-4, atol=1e-4
    )
    assert zero.config[big.family.eps_key] == big.config[big.family.eps_key]


def test_default_alpha_is_parameter_distance(pair):
    big, small = pair
    mid = replace(big.shape, layers=3)
    res = interpolate(big, small, mid, None, log=lambda *_: None)
    n_t = count_params(big.family, big.template, mid)
    assert res.alpha == pytest.approx((big.n_params - n_t) / (big.n_params - small.n_params))
    assert 0 < res.alpha < 1
    for v in res.weights.values():
        assert np.isfinite(v).all()


def test_paper_alpha_example():
    # 138M between 117M and 345M -> alpha ~ 0.9 (the paper's GPT-2 case)
    assert default_alpha(345, 117, 138) == pytest.approx(0.908, abs=1e-3)


def test_alpha_auto_never_worse_than_endpoints(pair, tokenizer_dir):

    big, small = pair
    mid = replace(big.shape, layers=3)
    batches = calib(tokenizer_dir)
    res = interpolate(big, small, mid, "auto", batches, log=lambda *_: None)
    scores = {float(k): v for k, v in res.info["alpha_scores"].items()}
    assert 0.0 in scores and 1.0 in scores
    assert scores[res.alpha] <= min(scores[0.0], scores[1.0]) or scores[0.0] - min(scores.values()) <= SUBSET_MARGIN
    assert res.alpha == pick_alpha(scores)


def test_alpha_auto_keeps_the_bigger_anchors_subset_within_the_margin():
    """A blend must beat Subset(B) (alpha 0) by more than SUBSET_MARGIN nats
    of calibration loss to be picked."""
    assert pick_alpha({0.0: 4.94, 0.5: 5.10, 1.0: 4.92}) == 0.0
    assert pick_alpha({0.0: 5.13, 0.5: 5.10, 1.0: 4.92}) == 1.0
    assert pick_alpha({0.0: 4.90, 0.9: 4.75, 1.0: 4.76}) == 0.9
    assert pick_alpha({0.0: 4.90, 0.9: 4.75}, margin=0.2) == 0.0
    assert pick_alpha({0.5: 4.0, 1.0: 4.1}) == 0.5  # no alpha 0 in the grid: the best


def test_align_recovers_permuted_channels(family_name, tokenizer_dir, tmp_path):
    """Two checkpoints without lineage: S is a subset of B whose channels
    were then permuted (kv groups, heads, hidden, ffn); activation matching
    finds where each of S's channels sits in B."""
    cfg = TINY_CONFIGS[family_name]
    fam = family_of(cfg)
    bw = random_weights(cfg, 11)
    big = load_anchor(str(save_tiny(tmp_path / "b", cfg, bw, tokenizer_dir)))
    b = big.shape
    s_shape = child_of(fam, b)
    g = b.heads // b.kv_heads
    rng = np.random.default_rng(0)
    pick = lambda n, k: rng.choice(n, k, replace=False)  # noqa: E731  (random order = permuted)
    layers = [0, b.layers - 1]
    kvs = [pick(b.kv_heads, s_shape.kv_heads) for _ in layers]
    truth = Selection(
        layers,
        pick(b.hidden, s_shape.hidden).tolist(),
        [pick(b.ffn, s_shape.ffn).tolist() for _ in layers],
        [[int(k) * g + r for k in kv for r in range(g)] for kv in kvs],
        [kv.tolist() for kv in kvs],
    )
    sw = subset(fam, bw, b, truth)  # channel c of S is truth.hidden[c] of B
    small = load_anchor(str(save_tiny(tmp_path / "s", config_for(fam, cfg, s_shape), sw, tokenizer_dir)))
    found = align(small, big, calib(tokenizer_dir, 2048))
    assert found.layers == truth.layers
    assert np.mean(np.array(found.hidden) == np.array(truth.hidden)) >= 0.9
    for i in range(len(layers)):
        assert np.mean(np.array(found.ffn[i]) == np.array(truth.ffn[i])) >= 0.9
        assert found.kv_heads[i] == truth.kv_heads[i]
        assert found.heads[i] == truth.heads[i]
    # init through the alignment path produces a sane model
    mid = replace(b, layers=3)
    res = interpolate(big, small, mid, None, calib(tokenizer_dir), log=lambda *_: None)
    assert res.info["alignment"] == "activation-matching"
    assert all(np.isfinite(v).all() for v in res.weights.values())


def test_solver_hits_requested_size(pair):
    big, small = pair
    lo, hi = small.n_params, big.n_params
    for frac in (0.25, 0.5, 0.75):
        n = int(lo + frac * (hi - lo))
        try:
            shape = solve_shape(big.family, big.template, small.shape, big.shape, n)
        except Exception:
            continue  # tiny models have coarse steps; real sizes are tested in test_shapes
        got = count_params(big.family, big.template, shape)
        assert abs(got - n) / n <= 0.01
        assert small.shape.layers <= shape.layers <= big.shape.layers


def test_choice_items_and_scoring(tokenizer_dir, tmp_path):
    """Choice items hold the true next sentence among 4 of similar length,
    are seeded, and batched scoring equals scoring each candidate alone."""
    from conftest import CALIB, TINY_CONFIGS, random_weights

    from cbd_mlx.arch.anchor import model_from_weights
    from cbd_mlx.choice import build_items, candidate_scores, choice_accuracy, full_sequence_scores, sentences
    from cbd_mlx.loader import load_tokenizer

    text = CALIB.read_text() + " " + HELDOUT.read_text()
    tok = load_tokenizer(tokenizer_dir)
    items = build_items(text, tok, 12, seed=3)
    assert 8 <= len(items) <= 12 and items == build_items(text, tok, 12, seed=3)
    sents = [tok.encode(" " + s) for s in sentences(text)]
    for ctx, cands, truth in items:
        assert len(cands) == 4 and 0 <= truth < 4 and cands[truth] in sents
        assert len({tuple(c) for c in cands}) == 4
    for family in ("llama", "qwen3", "gpt2", "gpt_neox"):  # the shared KV cache gives the full-sequence scores
        model = model_from_weights(TINY_CONFIGS[family], random_weights(TINY_CONFIGS[family], 4))
        ctx, cands, _ = items[0]
        np.testing.assert_allclose(candidate_scores(model, ctx, cands), full_sequence_scores(model, ctx, cands),
                                   rtol=1e-4, atol=1e-4)
    assert 0.0 <= choice_accuracy(model, items) <= 1.0
    with pytest.raises(CBDError, match="too short for the choice task"):
        build_items("One sentence. Two sentences.", tok, 5)
