"""Bridge distillation across architectures and vocabularies (tiny models)."""

from __future__ import annotations

import json

import pytest
from conftest import CALIB, HELDOUT, TINY_CONFIGS, make_tokenizer, random_weights, save_tiny
from test_cli import assert_one_line_error, run

from cbd_mlx.loader import load_anchor, same_tokenizer


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A second real BPE vocabulary (trained on other text)."""
    d = tmp_path_factory.mktemp("tok2")
    make_tokenizer(d, HELDOUT)
    return d


@pytest.mark.parametrize("source_family,chain_family", [("llama", "gpt2"), ("qwen3", "llama")])
def test_bridge_feeds_a_chain_of_another_family_and_vocabulary(tokenizer_dir, other_tokenizer, tmp_path, capsys,
                                                              source_family, chain_family):
    src_cfg, chain_cfg = TINY_CONFIGS[source_family], TINY_CONFIGS[chain_family]
    source = save_tiny(tmp_path / "source", src_cfg, random_weights(src_cfg, 7), tokenizer_dir)
    student = save_tiny(tmp_path / "student", chain_cfg, random_weights(chain_cfg, 1), other_tokenizer)
    assert not same_tokenizer(source, student)
    out = tmp_path / "bridge"
    code, _, err = run(capsys, "bridge", "--source", source, "--student", student, "--prompt-data", CALIB,
                       "--num-prompts", "16", "--max-new-tokens", "48", "--gen-batch", "8", "--init", "random",
                       "--tokens", str(12 * 4 * 32), "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3",
                       "--eval-every", "6", "--out", out)
    assert code == 0, err
    a = load_anchor(str(out))
    assert a.family.name == chain_family and same_tokenizer(out, student)
    prov = json.loads((out / "cbd.json").read_text())
    assert prov["bridge"]["source_model_type"] == src_cfg["model_type"]
    assert prov["bridge"]["generation"]["new_tokens"] > 0
    rec = prov["history"][-1]
    assert rec["kind"] == "train" and rec["heldout_loss_after"] < rec["heldout_loss_before"]
    assert not (tmp_path / "bridge.bridge").exists()  # work dir removed after success


def test_bridge_bad_input(tokenizer_dir, tmp_path, capsys):
    cfg = TINY_CONFIGS["llama"]
    source = save_tiny(tmp_path / "source", cfg, random_weights(cfg, 7), tokenizer_dir)
    student = save_tiny(tmp_path / "student", cfg, random_weights(cfg, 1), tokenizer_dir)
    base = ["bridge", "--source", source, "--student", student, "--tokens", "256", "--out", tmp_path / "b"]
    # prompts longer than the source's context (512)
    (tmp_path / "long.txt").write_text(" ".join(["word"] * 2000) + "\n")
    code, _, err = run(capsys, *base, "--prompts", tmp_path / "long.txt")
    assert_one_line_error(code, err, "exceed the source's context")
    # a source without tokenizer files cannot generate
    (source / "tokenizer.json").unlink()
    (source / "tokenizer_config.json").unlink()
    code, _, err = run(capsys, *base, "--prompt-data", CALIB)
    assert_one_line_error(code, err, "source")
    # no prompts at all
    code, _, err = run(capsys, "bridge", "--source", student, "--student", student, "--tokens", "256",
                       "--out", tmp_path / "b")
    assert_one_line_error(code, err, "--prompts")
    # an unsupported source architecture
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text('{"model_type": "no_such_arch"}')
    (tmp_path / "weird" / "model.safetensors").write_bytes(b"")
    code, _, err = run(capsys, "bridge", "--source", tmp_path / "weird", "--student", student, "--tokens", "256",
                       "--prompt-data", CALIB, "--out", tmp_path / "b")
    assert_one_line_error(code, err, "source")
    assert not (tmp_path / "b").exists()


def test_chain_build_starts_from_a_bridge_anchor(tokenizer_dir, other_tokenizer, tmp_path, capsys):
    from cbd_mlx.chain import find_chain
    from cbd_mlx.data import prepare

    qcfg, lcfg = TINY_CONFIGS["qwen3"], TINY_CONFIGS["llama"]
    source = save_tiny(tmp_path / "source", qcfg, random_weights(qcfg, 7), tokenizer_dir)
    family = save_tiny(tmp_path / "family", lcfg, random_weights(lcfg, 1), other_tokenizer)
    docs = tmp_path / "docs"
    docs.mkdir()
    text = CALIB.read_text()
    for i in range(8):
        (docs / f"d{i}.txt").write_text(text[i * 4000:(i + 1) * 4000])
    prepare([docs], str(family), tmp_path / "cache", heldout_fraction=0.25)
    big = load_anchor(str(family)).n_params
    code, _, err = run(capsys, "chain", "build", "--source", family, "--bridge-from", source, "--prompt-data", CALIB,
                       "--num-prompts", "8", "--sizes", f"{big * 0.7 / 1e3:.1f}K", "--data", tmp_path / "cache",
                       "--tokens-per-step", str(4 * 4 * 32), "--batch-size", "4", "--seq-len", "32",
                       "--max-step", "0.4", "--out", tmp_path / "chain")
    assert code == 0, err
    chain = find_chain(str(tmp_path / "chain"))
    assert chain.anchors[0].name == "a0-bridge" and len(chain.anchors) == 2
    a0 = load_anchor(str(tmp_path / "chain" / chain.anchors[0].source))
    assert a0.provenance["bridge"]["source"] == str(source)


def test_uld_alignment_and_loss(tokenizer_dir, other_tokenizer):
    import mlx.core as mx
    import numpy as np

    from cbd_mlx.loader import load_tokenizer
    from cbd_mlx.losses import uld_loss
    from cbd_mlx.uld import align, token_ends

    a, b = load_tokenizer(tokenizer_dir), load_tokenizer(other_tokenizer)
    text = "Classes provide a means of bundling data and functionality together."
    ia, ea = token_ends(a, text)
    ib, eb = token_ends(b, text)
    assert ia != ib and ea[-1] == eb[-1] == len(text)  # two vocabularies, one text
    pairs = align(ea, eb)
    assert pairs and all(ea[i] == eb[j] for i, j in pairs.items())
    # the loss ignores which vocabulary entries hold the mass: a permuted distribution costs 0
    logits = mx.array(np.random.default_rng(0).standard_normal((1, 3, 50)).astype(np.float32))
    p = np.array(mx.softmax(logits, axis=-1))
    sorted_top = mx.array(-np.sort(-p[..., ::-1], axis=-1)[..., :8])
    mask = mx.ones((1, 3))
    assert float(uld_loss(logits, sorted_top, mask)) < 1e-5
    assert float(uld_loss(logits, mx.zeros((1, 3, 8)), mask)) > 0.1
    assert float(uld_loss(logits, mx.zeros((1, 3, 8)), mx.zeros((1, 3)))) == 0.0


def test_bridge_with_cross_tokenizer_loss(tokenizer_dir, other_tokenizer, tmp_path, capsys):
    src_cfg, chain_cfg = TINY_CONFIGS["llama"], TINY_CONFIGS["llama"]
    source = save_tiny(tmp_path / "source", src_cfg, random_weights(src_cfg, 7), tokenizer_dir)
    student = save_tiny(tmp_path / "student", chain_cfg, random_weights(chain_cfg, 1), other_tokenizer)
    code, _, err = run(capsys, "bridge", "--source", source, "--student", student, "--prompt-data", CALIB,
                       "--num-prompts", "16", "--max-new-tokens", "48", "--init", "random", "--xvocab-weight", "0.5",
                       "--tokens", str(8 * 4 * 32), "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3",
                       "--out", tmp_path / "bridge")
    assert code == 0, err
    assert "ULD targets:" in err
    rec = json.loads((tmp_path / "bridge" / "cbd.json").read_text())["history"][-1]
    assert rec["config"]["xvocab_weight"] == 0.5 and rec["heldout_loss_after"] < rec["heldout_loss_before"]
