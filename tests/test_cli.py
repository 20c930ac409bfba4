"""The CLI on bad input: one clear line, non-zero exit, outputs intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CALIB, HELDOUT, TINY_CONFIGS, make_tokenizer, random_weights, save_tiny

from cbd_mlx.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    try:
        main(list(map(str, args)))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


CLI_CONFIG = dict(TINY_CONFIGS["llama"], hidden_size=128, intermediate_size=256,
                  num_attention_heads=8, num_key_value_heads=4)


@pytest.fixture
def tiny_pair(tokenizer_dir, tmp_path, capsys):
    cfg = CLI_CONFIG
    big = save_tiny(tmp_path / "big", cfg, random_weights(cfg, 1), tokenizer_dir)
    code, _, err = run(capsys, "prune", "--from", big, "--size", "300K", "--calib", CALIB,
                       "--calib-tokens", 512, "--out", tmp_path / "small")
    assert code == 0, err
    return big, tmp_path / "small"


def test_help_on_every_command(capsys):
    for cmd in ([], ["init"], ["prune"], ["eval"], ["chains"], ["chain", "show"], ["convert"]):
        code, out, _ = run(capsys, *cmd, "--help")
        assert code == 0 and "Usage:" in out


def test_init_between_tiny_anchors(tiny_pair, tmp_path, capsys):
    big, small = tiny_pair
    out = tmp_path / "mid"
    code, _, err = run(capsys, "init", "--size", "450K", "--anchors", big, small, "--out", out)
    assert code == 0, err
    assert "shape:" in err and "alpha:" in err
    prov = json.loads((out / "cbd.json").read_text())
    assert prov["kind"] == "init" and prov["info"]["alignment"] == "lineage"
    code, out_text, _ = run(capsys, "eval", out, "--data", HELDOUT, "--max-tokens", 2048, "--seq-len", 128, "--json")
    assert code == 0
    r = json.loads(out_text.strip().splitlines()[-1])
    assert r["ppl"] > 1 and r["tokens"] > 0


def test_missing_model(capsys, tmp_path):
    code, _, err = run(capsys, "eval", tmp_path / "nope", "--data", HELDOUT)
    assert_one_line_error(code, err, "not found")


def test_truncated_safetensors(tiny_pair, capsys, tmp_path):
    big, small = tiny_pair
    f = big / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "init", "--size", "450K", "--anchors", big, small, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "truncated")
    assert not (tmp_path / "o").exists()


def test_config_not_matching_weights(tiny_pair, capsys, tmp_path):
    big, small = tiny_pair
    cfg = json.loads((big / "config.json").read_text())
    cfg["hidden_size"] = 96
    (big / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "eval", big, "--data", HELDOUT)
    assert_one_line_error(code, err, "config.json")


def test_anchors_of_different_families(tiny_pair, tokenizer_dir, capsys, tmp_path):
    big, _ = tiny_pair
    cfg = TINY_CONFIGS["gpt2"]
    other = save_tiny(tmp_path / "g", cfg, random_weights(cfg), tokenizer_dir)
    code, _, err = run(capsys, "init", "--size", "408K", "--anchors", big, other, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "different families")


def test_anchors_with_different_tokenizers(tiny_pair, capsys, tmp_path):
    big, small = tiny_pair
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (small / name).unlink()
    other_tok = tmp_path / "tok2"
    make_tokenizer(other_tok, HELDOUT)  # same size, trained on other text
    for f in other_tok.iterdir():
        (small / f.name).write_bytes(f.read_bytes())
    code, _, err = run(capsys, "init", "--size", "450K", "--anchors", big, small, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "tokenizer")


def test_size_outside_anchors(tiny_pair, capsys, tmp_path):
    big, small = tiny_pair
    code, _, err = run(capsys, "init", "--size", "10M", "--anchors", big, small, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "outside")


@pytest.mark.parametrize("size", ["138", "1e9", "-5M"])
def test_malformed_size(capsys, size, tmp_path):
    code, _, err = run(capsys, "init", "--size", size, "--chain", "smollm2", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "size")


def test_unknown_chain(capsys, tmp_path):
    code, _, err = run(capsys, "init", "--size", "138M", "--chain", "no-such-chain", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "unknown chain")


def test_existing_out_is_refused_then_forced(tiny_pair, capsys, tmp_path):
    big, small = tiny_pair
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run(capsys, "init", "--size", "450K", "--anchors", big, small, "--out", out)
    assert_one_line_error(code, err, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "precious"
    code, _, err = run(capsys, "init", "--size", "450K", "--anchors", big, small, "--out", out, "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_failed_write_leaves_previous_output(tiny_pair, capsys, tmp_path, monkeypatch):
    import errno

    import cbd_mlx.save as models

    big, small = tiny_pair
    out = tmp_path / "o"
    assert run(capsys, "init", "--size", "450K", "--anchors", big, small, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(path, *a, **k):  # half a file, then the disk is full
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models, "save_weights", full_disk)
    code, _, err = run(capsys, "init", "--size", "408K", "--anchors", big, small, "--out", out, "--force")
    assert_one_line_error(code, err, "no space left")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_hub_repo_from_local_cache_offline(tokenizer_dir, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants as hc

    from cbd_mlx.errors import CBDError
    from cbd_mlx.loader import load_anchor

    cache = tmp_path / "hub"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--someone--tiny" / "snapshots" / rev
    save_tiny(snap, TINY_CONFIGS["llama"], random_weights(TINY_CONFIGS["llama"]), tokenizer_dir)
    (cache / "models--someone--tiny" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny" / "refs" / "main").write_text(rev)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    a = load_anchor("someone/tiny")
    assert a.shape.layers == 4 and a.path == snap
    with pytest.raises(CBDError, match="cannot be reached|not in the local"):
        load_anchor("someone/absent")


def test_extrapolate_below_and_above(tiny_pair, capsys, tmp_path):
    import mlx.core as mx
    import numpy as np

    from cbd_mlx.arch.anchor import model_from_weights
    from cbd_mlx.loader import load_anchor

    big, small = tiny_pair
    code, _, err = run(capsys, "init", "--size", "900K", "--anchors", big, small, "--out", tmp_path / "x")
    assert_one_line_error(code, err, "outside", "--extrapolate")
    code, _, err = run(capsys, "init", "--size", "900K", "--anchors", big, small, "--extrapolate", "--out", tmp_path / "up")
    assert code == 0, err
    assert "warning:" in err and "growth" in err
    b, up = load_anchor(str(big)), load_anchor(str(tmp_path / "up"))
    assert abs(up.n_params - 900_000) / 900_000 <= 0.01
    toks = mx.array([[5, 17, 33, 2, 99, 120, 7, 64]])
    np.testing.assert_allclose(np.array(model_from_weights(up.config, up.weights)(toks)),
                               np.array(model_from_weights(b.config, b.weights)(toks)), rtol=1e-4, atol=1e-4)
    code, _, err = run(capsys, "init", "--size", "150K", "--anchors", big, small, "--extrapolate", "--out", tmp_path / "down")
    assert code == 0, err
    assert "below the smallest" in err


def test_init_without_lineage_aligns_on_builtin_text(tokenizer_dir, tmp_path, capsys):
    """Two checkpoints with no lineage (as public ones): init aligns them by
    activation matching on the built-in calibration text, no flag needed."""
    from dataclasses import replace

    from cbd_mlx.arch.families import family_of
    from cbd_mlx.arch.shapes import config_for, shape_of

    cfg = CLI_CONFIG
    fam = family_of(cfg)
    big = save_tiny(tmp_path / "big", cfg, random_weights(cfg, 1), tokenizer_dir)
    small_cfg = config_for(fam, cfg, replace(shape_of(fam, cfg), layers=2, hidden=96, ffn=160))
    small = save_tiny(tmp_path / "small", small_cfg, random_weights(small_cfg, 2), tokenizer_dir)
    code, _, err = run(capsys, "init", "--size", "450K", "--anchors", big, small, "--out", tmp_path / "o")
    assert code == 0, err
    assert "built-in calib-init.txt" in err and "alignment: activation-matching" in err


@pytest.mark.parametrize("edit,words", [
    (lambda t: t.replace('family = "llama"', 'family = "llama"\ncolour = "red"'), ["unknown key"]),
    (lambda t: t.replace("params = 134515008", 'params = "many"'), ["positive integer"]),
    (lambda t: t.replace('source = "hf:HuggingFaceTB/SmolLM2-135M"', 'source = "../../etc/passwd"'), ["inside the chain"]),
    (lambda t: t.replace('source = "hf:HuggingFaceTB/SmolLM2-135M"', 'source = "/etc/passwd"'), ["inside the chain"]),
    (lambda t: t + "[[anchors]\n", ["not valid toml"]),
])
def test_bad_manifests(capsys, tmp_path, edit, words):
    from cbd_mlx.chain import CHAINS_DIR

    bad = tmp_path / "bad.toml"
    bad.write_text(edit((CHAINS_DIR / "smollm2.toml").read_text()))
    code, _, err = run(capsys, "chain", "show", bad)
    assert_one_line_error(code, err, *words)


def test_symlinked_anchor_outside_chain_is_refused(capsys, tmp_path):
    chain = tmp_path / "c"
    (chain / "anchors").mkdir(parents=True)
    (chain / "anchors" / "a1").symlink_to(tmp_path)
    text = """name = "c"\nfamily = "llama"\ntokenizer = "x"\n"""
    for name, src, p in (("a0", "hf:o/r", 200), ("a1", "anchors/a1", 100)):
        text += (f'[[anchors]]\nname = "{name}"\nsource = "{src}"\nparams = {p}\nlayers = 1\nhidden = 8\n'
                 "ffn = 8\nheads = 1\nkv_heads = 1\nhead_dim = 8\nvocab = 10\n")
    (chain / "chain.toml").write_text(text)
    code, _, err = run(capsys, "chain", "show", chain)
    assert_one_line_error(code, err, "outside the chain")


def test_nan_weights_are_refused(tiny_pair, capsys, tmp_path):
    import numpy as np

    from cbd_mlx.loader import read_safetensors
    from cbd_mlx.save import save_weights

    big, small = tiny_pair
    w, _ = read_safetensors(big / "model.safetensors")
    w = {k: np.array(v) for k, v in w.items()}
    w["model.norm.weight"][3] = np.nan
    save_weights(big / "model.safetensors", w)
    code, _, err = run(capsys, "eval", big, "--data", HELDOUT)
    assert_one_line_error(code, err, "NaN")
    code, _, err = run(capsys, "init", "--size", "450K", "--anchors", big, small, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "NaN")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0])
def test_sigkill_during_init_keeps_previous_output(tiny_pair, tmp_path, delay):
    import os
    import signal
    import subprocess
    import sys
    import time

    big, small = tiny_pair
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "cbd_mlx.cli", "init", "--size", "450K", "--anchors", str(big), str(small),
           "--out", str(out), "--force"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    p = subprocess.Popen(cmd[:-1] + ["--force", "--alpha", "0.3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    after = {q.name: q.read_bytes() for q in out.iterdir()}
    if after != before:  # the kill came after the swap: then the new output is whole
        assert set(after) == set(before) and json.loads(after["cbd.json"])["alpha"] == 0.3
    # the next writer clears what the killed one left behind
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert [q.name for q in tmp_path.iterdir() if ".tmp-" in q.name] == []


def test_a_size_a_little_above_the_chain_is_grown_without_a_flag(tiny_pair, capsys, tmp_path):
    """Up to 10% above a chain's largest anchor: function-preserving growth,
    one line that says so; further above: refused without --extrapolate."""
    from cbd_mlx.chain import Chain, ChainAnchor, dump_chain
    from cbd_mlx.loader import load_anchor

    big, small = tiny_pair
    root = tmp_path / "chain"
    entries = []
    for name, src, parent in (("a0", big, None), ("a1", small, "a0")):
        import shutil

        shutil.copytree(src, root / "anchors" / name)
        a = load_anchor(str(root / "anchors" / name))
        entries.append(ChainAnchor(name, f"anchors/{name}", a.n_params, a.shape, None, None, parent, True))
    (root / "chain.toml").write_text(dump_chain(Chain("t", "llama", "tiny", root / "chain.toml", entries)))
    top = entries[0].params
    near = f"{top * 1.06 / 1e3:.1f}K"
    code, _, err = run(capsys, "init", "--size", near, "--chain", root, "--out", tmp_path / "near")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "above chain 't'" in notes[0] and "grown function-preservingly" in notes[0]
    assert json.loads((tmp_path / "near" / "cbd.json").read_text())["mode"] == "grow-above"
    code, _, err = run(capsys, "init", "--size", f"{top * 1.3 / 1e3:.1f}K", "--chain", root, "--out", tmp_path / "far")
    assert_one_line_error(code, err, "outside chain", "--extrapolate")
