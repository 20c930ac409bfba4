"""`recover` (full-parameter training of an init) and `finetune` (mlx-lm tuner)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CALIB, TINY_CONFIGS, random_weights, save_tiny, tiny_anchor_pair, write_docs
from test_cli import assert_one_line_error, run

from cbd_mlx.loader import load_anchor

CFG = TINY_CONFIGS["llama"]


@pytest.fixture
def docs(tmp_path):
    return write_docs(tmp_path / "docs")


@pytest.fixture
def init_model(tokenizer_dir, tmp_path, capsys):
    """An init blended from two tiny anchors (lineage), as `init` writes it."""
    big, small = tiny_anchor_pair(tmp_path, CFG, tokenizer_dir, layers=2, hidden=32, ffn=64, heads=2, kv_heads=1)
    mid = (load_anchor(str(big)).n_params + load_anchor(str(small)).n_params) // 2
    code, _, err = run(capsys, "init", "--size", f"{mid / 1e3:.1f}K", "--anchors", big, small, "--out",
                       tmp_path / "init")
    assert code == 0, err
    return tmp_path / "init", big


def test_recover_trains_every_parameter_and_lowers_heldout_loss(init_model, docs, tmp_path, capsys):
    init, _ = init_model
    out = tmp_path / "rec"
    code, _, err = run(capsys, "recover", init, "--data", docs, "--tokens", str(16 * 4 * 64), "--batch-size", "4",
                       "--seq-len", "64", "--lr", "3e-3", "--eval-every", "8", "--out", out)
    assert code == 0, err
    assert "held-out loss" in err
    rec = json.loads((out / "cbd.json").read_text())["history"][-1]
    assert rec["kind"] == "train" and rec["heldout_loss_after"] < rec["heldout_loss_before"]
    a, b = load_anchor(str(init)), load_anchor(str(out))
    for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert not np.array_equal(a.weights[k], b.weights[k]), k  # embeddings and norms train too
    # the text was tokenized once into the user cache and is reused
    code, _, err = run(capsys, "recover", init, "--data", docs, "--tokens", str(2 * 4 * 64), "--batch-size", "4",
                       "--seq-len", "64", "--out", tmp_path / "rec2")
    assert code == 0 and "tokenizing" not in err


def test_recover_kd_from_auto_uses_the_bigger_anchor(init_model, docs, tmp_path, capsys):
    init, big = init_model
    code, _, err = run(capsys, "recover", init, "--data", docs, "--tokens", str(4 * 4 * 64), "--batch-size", "4",
                       "--seq-len", "64", "--kd-from", "auto", "--out", tmp_path / "kd")
    assert code == 0, err
    rec = json.loads((tmp_path / "kd" / "cbd.json").read_text())["history"][-1]
    assert rec["kind"] == "distill" and rec["teacher"] == str(big) and rec["config"]["loss"] == "forward_kl"
    # a model without recorded anchors cannot resolve auto
    code, _, err = run(capsys, "recover", big, "--data", docs, "--tokens", "512", "--kd-from", "auto",
                       "--out", tmp_path / "x")
    assert_one_line_error(code, err, "records no anchors", "--kd-from")


def _jsonl(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_finetune_lora_adapters_and_full_fused(tokenizer_dir, tmp_path, capsys):
    from mlx_lm import load

    base = save_tiny(tmp_path / "base", CFG, random_weights(CFG, 1), tokenizer_dir)
    words = CALIB.read_text().split()
    data = tmp_path / "ft"
    _jsonl(data, [{"text": " ".join(words[i * 40 : (i + 1) * 40])} for i in range(40)])
    code, _, err = run(capsys, "finetune", base, "--data", data, "--out", tmp_path / "lora", "--iters", "20",
                       "--lr", "1e-3", "--lora-rank", "4")
    assert code == 0, err
    assert (tmp_path / "lora" / "adapters.safetensors").is_file()
    rec = json.loads((tmp_path / "lora" / "cbd.json").read_text())["history"][-1]
    assert rec["format"] == "text" and rec["valid_loss_after"] < rec["valid_loss_before"]
    load(str(base), adapter_path=str(tmp_path / "lora"))  # mlx-lm takes the adapters as they are
    code, _, err = run(capsys, "finetune", base, "--data", data, "--out", tmp_path / "full", "--iters", "10",
                       "--full", "--lr", "1e-3")
    assert code == 0, err
    model, _ = load(str(tmp_path / "full"))  # standalone
    assert json.loads((tmp_path / "full" / "cbd.json").read_text())["history"][-1]["fused"]


def test_finetune_never_writes_adapters_worse_than_the_start(tokenizer_dir, tmp_path, capsys):
    """A learning rate that wrecks the model: the adapters written keep the
    best validation point (here the start), and say so."""
    base = save_tiny(tmp_path / "base", CFG, random_weights(CFG, 1), tokenizer_dir)
    words = CALIB.read_text().split()
    data = tmp_path / "ft"
    _jsonl(data, [{"text": " ".join(words[i * 40 : (i + 1) * 40])} for i in range(40)])
    code, out, err = run(capsys, "finetune", base, "--data", data, "--out", tmp_path / "lora", "--iters", "10",
                         "--lr", "1", "--lora-rank", "4")
    assert code == 0, err
    rec = json.loads((tmp_path / "lora" / "cbd.json").read_text())["history"][-1]
    assert rec["valid_loss_after"] <= rec["valid_loss_before"], rec
    if rec["kept_iteration"] == 0:
        assert "never went below the start" in out + err


def test_finetune_bad_input(tokenizer_dir, tmp_path, capsys):
    base = save_tiny(tmp_path / "base", CFG, random_weights(CFG, 1), tokenizer_dir)
    _jsonl(tmp_path / "odd", [{"question": "a", "answer": "b"}] * 10)
    code, _, err = run(capsys, "finetune", base, "--data", tmp_path / "odd", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "unknown format", "prompt")
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "finetune", base, "--data", tmp_path / "empty", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "no train.jsonl")
    assert not (tmp_path / "o").exists()
