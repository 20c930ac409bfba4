"""Parameter counts, the shape solver and size parsing."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from conftest import TINY_CONFIGS

from cbd_mlx.arch.anchor import param_template
from cbd_mlx.arch.families import FAMILIES, family_of
from cbd_mlx.arch.shapes import config_for, context_length, count_params, parse_size, shape_of, solve_shape
from cbd_mlx.chain import find_chain, list_chains, manifest_config
from cbd_mlx.errors import CBDError


@pytest.mark.parametrize("text,value", [("138M", 138_000_000), ("1.2B", 1_200_000_000), ("600k", 600_000), (" 60 M ", 60_000_000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["138", "1e9", "-5M", "0M", "M", "12Q", "", "1.2.3M"])
def test_parse_size_rejects(bad):
    with pytest.raises(CBDError):
        parse_size(bad)


def test_count_matches_mlx_lm_for_every_family(family_name):
    cfg = TINY_CONFIGS[family_name]
    fam = family_of(cfg)
    base = shape_of(fam, cfg)
    tmpl = param_template(cfg)
    for layers, heads, kv in [(2, 4, 2), (5, 6, 3), (3, 8, 4)]:
        if fam.tied_attention_width:
            kv = heads
        hidden = heads * base.head_dim if fam.tied_attention_width else 48 + 8 * layers
        ffn = 4 * hidden if fam.ffn_multiple else 72 + layers
        shape = replace(base, layers=layers, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv)
        real = param_template(config_for(fam, cfg, shape))
        assert count_params(fam, tmpl, shape) == sum(math.prod(s) for s in real.values())


def test_manifest_params_are_exact():
    for chain in list_chains():
        for a in chain.anchors:
            tmpl = param_template(manifest_config(chain.family, a.shape))
            assert sum(math.prod(s) for s in tmpl.values()) == a.params, (chain.name, a.name)


@pytest.mark.parametrize("chain,size", [("smollm2", "138M"), ("smollm2", "250M"), ("smollm2", "1B"),
                                        ("gpt2", "138M"), ("gpt2", "500M"), ("qwen3", "1B"),
                                        ("pythia", "120M"), ("pythia", "250M")])
def test_solver_on_real_chains(chain, size):
    c = find_chain(chain)
    n = parse_size(size)
    big, small = c.bracket(n)
    fam = FAMILIES[c.family]
    tmpl = param_template(manifest_config(c.family, big.shape))
    shape = solve_shape(fam, tmpl, small.shape, big.shape, n)
    got = count_params(fam, tmpl, shape)
    assert abs(got - n) / n <= 0.01
    for f in ("layers", "hidden", "ffn", "heads", "kv_heads"):
        lo, hi = sorted((getattr(small.shape, f), getattr(big.shape, f)))
        assert lo <= getattr(shape, f) <= hi, f
    assert shape.hidden % shape.heads == 0 and shape.heads % shape.kv_heads == 0
    assert shape.heads // shape.kv_heads == big.shape.heads // big.shape.kv_heads


@pytest.mark.parametrize("size", ["55M", "65M", "90M", "120M"])
def test_deep_rule_keeps_the_bigger_anchors_depth_where_it_can(size):
    """rule "deep": the depth nearest the bigger anchor's among the shapes of
    the size (widths cut first), never farther than the proportional shape's."""
    c = find_chain("smollm2-mini")
    n = parse_size(size)
    big, small = c.bracket(n)
    fam = FAMILIES[c.family]
    tmpl = param_template(manifest_config(c.family, big.shape))
    prop, deep = (solve_shape(fam, tmpl, small.shape, big.shape, n, rule=r) for r in ("proportional", "deep"))
    assert big.shape.layers >= deep.layers >= prop.layers
    assert abs(count_params(fam, tmpl, deep) - n) / n <= 0.01
    deeper = replace(deep, layers=deep.layers + 1)
    if deeper.layers <= big.shape.layers:  # one layer more cannot reach the size with widths in range
        with pytest.raises(CBDError):
            solve_shape(fam, tmpl, small.shape, big.shape, n, {"layers": deeper.layers})
    with pytest.raises(CBDError, match="unknown shape rule"):
        solve_shape(fam, tmpl, small.shape, big.shape, n, rule="wide")


def test_solver_names_nearest_reachable_size():
    # gpt_neox in mlx-lm fixes ffn = 4 * hidden and hidden = heads * head_dim:
    # between pythia-70m and -160m only (layers, heads) move, so 100M is not
    # reachable within 1%; the error says what is
    c = find_chain("pythia")
    big, small = c.anchors[2], c.anchors[3]
    tmpl = param_template(manifest_config("gpt_neox", big.shape))
    with pytest.raises(CBDError, match="the nearest is"):
        solve_shape(FAMILIES["gpt_neox"], tmpl, small.shape, big.shape, parse_size("100M"))


def test_solver_respects_pinned_dims():
    c = find_chain("smollm2")
    big, small = c.anchors[1], c.anchors[2]
    fam = FAMILIES["llama"]
    tmpl = param_template(manifest_config("llama", big.shape))
    shape = solve_shape(fam, tmpl, small.shape, big.shape, parse_size("200M"), {"layers": 31})
    assert shape.layers == 31
    with pytest.raises(CBDError):
        solve_shape(fam, tmpl, small.shape, big.shape, parse_size("200M"), {"layers": 31, "hidden": 576, "ffn": 1536})


def test_bracket_refuses_sizes_outside_chain():
    c = find_chain("smollm2")
    with pytest.raises(CBDError, match="outside chain"):
        c.bracket(parse_size("50M"))
    with pytest.raises(CBDError, match="outside chain"):
        c.bracket(parse_size("3B"))


def test_every_init_shape_of_the_shipped_chains_is_exportable():
    """Across the range of every shipped chain, the solver's shapes keep
    hidden % heads == 0 (mlx-lm/transformers load them) and widths that a
    quantization group of 32 divides (export with default options)."""
    from cbd_mlx.arch.anchor import param_template
    from cbd_mlx.arch.families import FAMILIES
    from cbd_mlx.chain import list_chains, manifest_config
    from cbd_mlx.errors import CBDError

    checked = 0
    for c in list_chains():
        fam = FAMILIES[c.family]
        for big, small in zip(c.anchors, c.anchors[1:]):
            if big.shape.head_dim != small.shape.head_dim:
                continue
            template = param_template(manifest_config(c.family, big.shape))
            for f in (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95):
                n = int(small.params + f * (big.params - small.params))
                try:
                    s = solve_shape(fam, template, small.shape, big.shape, n)
                except CBDError:
                    continue  # a size the family cannot reach within 1% (gpt2/neox fix ffn = 4 hidden)
                assert s.hidden % s.heads == 0 and s.hidden % 32 == 0 and s.ffn % 32 == 0, (c.name, n, s)
                checked += 1
    assert checked >= 20


def test_context_length_reads_every_familys_key():
    assert context_length({"max_position_embeddings": 8192}) == 8192
    assert context_length({"n_positions": 1024, "n_ctx": 1024}) == 1024  # gpt2
    assert context_length({"hidden_size": 64}) is None
