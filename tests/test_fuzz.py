"""Property/fuzz harness over the command line: corrupted safetensors, GGUF,
config, tokenizer and manifest files, and bad option values, across commands.

For every generated case the command must either succeed or fail with exit
code 1 and exactly one ``error:`` line (no traceback), and an output that
existed before a failed run must be byte-identical afterwards, with no temp
files left beside it."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HELDOUT, TINY_CONFIGS, make_tiny_chain, tiny_anchor_pair, write_docs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbd_mlx.cli import main

SETTINGS = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 15)), deadline=None,
                    derandomize=not os.environ.get("FUZZ_EXAMPLES"),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
WEIRD_VALUES = [None, -1, 0, 1.5, 1e30, "x", [], {}, True, 10**12, -(10**12), float("nan")]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    """Tiny anchors, a chain, a token cache, a GGUF file and an existing output."""
    from cbd_mlx.data import prepare
    from cbd_mlx.gguf import write_gguf
    from cbd_mlx.loader import load_anchor

    d = tmp_path_factory.mktemp("fuzz")
    big, small = tiny_anchor_pair(d, TINY_CONFIGS["llama"], tokenizer_dir, layers=3, ffn=96)
    chain = make_tiny_chain(d / "chain", big, small)
    cache = d / "cache"
    prepare([write_docs(d / "docs")], str(big), cache, heldout_fraction=0.25)
    a = load_anchor(str(big))
    gguf = d / "tiny.gguf"
    write_gguf(a.config, a.weights, a.path, gguf, "f16")
    existing = d / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("an earlier result")
    n_big = load_anchor(str(big)).n_params
    return {"dir": d, "big": big, "small": small, "chain": chain, "cache": cache, "gguf": gguf,
            "existing": existing, "size": f"{n_big / 1e6}M"}


def _tree(path: Path) -> dict:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def check_run(argv: list, existing: Path, subprocess_run: bool = False) -> tuple[int, str]:
    """Run one command; assert the fault contract; return (code, stderr)."""
    before = _tree(existing)
    if subprocess_run:  # inputs that could reach native code: a crash must not take the test run down
        r = subprocess.run([sys.executable, "-m", "cbd_mlx", *map(str, argv)], capture_output=True, text=True,
                           timeout=300)
        code, err = r.returncode, r.stderr
    else:
        buf = io.StringIO()
        code = 0
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
            try:
                main(list(map(str, argv)))
            except SystemExit as e:
                code = e.code or 0
        err = buf.getvalue()
    assert code in (0, 1), (argv, code, err[-3000:])
    assert "Traceback" not in err, (argv, err[-3000:])
    if code == 1:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, (argv, err[-3000:])
        assert not errors[0].startswith("error: unexpected "), (argv, errors[0])
        assert _tree(existing) == before, (argv, "the existing output changed")
    leftovers = [p.name for p in existing.parent.iterdir() if p.name.startswith(f".{existing.name}.")]
    assert not leftovers, (argv, leftovers)
    return code, err


def _restore_existing(existing: Path) -> None:
    shutil.rmtree(existing, ignore_errors=True)
    existing.mkdir()
    (existing / "keep.txt").write_text("an earlier result")


def corrupt_bytes(data: bytes, how: str, pos: float, value: int) -> bytes:
    i = int(pos * max(len(data) - 1, 0))
    if how == "truncate":
        return data[:i]
    if how == "flip":
        return data[:i] + bytes([data[i] ^ (value or 1)]) + data[i + 1:]
    if how == "header":  # damage the first KB: headers, tables, offsets
        j = int(pos * min(len(data) - 1, 1023))
        return data[:j] + bytes([data[j] ^ (value or 1)]) + data[j + 1:]
    return bytes([value]) * 64  # garbage


BYTE_DAMAGE = st.tuples(st.sampled_from(["truncate", "flip", "header", "garbage"]),
                        st.floats(0, 1), st.integers(0, 255))


def model_commands(w: dict, model: Path) -> list[list]:
    out = w["existing"]
    return [
        ["eval", model, "--data", HELDOUT, "--max-tokens", 600, "--seq-len", 64],
        ["convert", model, "--out", out, "--force"],
        ["init", "--size", w["size"], "--anchors", model, w["small"], "--alpha", "0.5", "--out", out, "--force"],
        ["export", model, "--bits", "8", "--group-size", "32", "--out", out, "--force"],
        ["distill", "--teacher", model, "--student", w["small"], "--data", w["cache"], "--tokens", 128,
         "--batch-size", 2, "--seq-len", 32, "--out", out, "--force"],
    ]


@SETTINGS
@given(damage=BYTE_DAMAGE, which=st.sampled_from(["model.safetensors", "config.json", "tokenizer.json"]),
       cmd=st.integers(0, 4))
def test_corrupted_model_files(world, tmp_path_factory, damage, which, cmd):
    bad = tmp_path_factory.mktemp("bad") / "model"
    shutil.copytree(world["big"], bad)
    f = bad / which
    f.write_bytes(corrupt_bytes(f.read_bytes(), *damage))
    code, _ = check_run(model_commands(world, bad)[cmd], world["existing"], subprocess_run=which.endswith("tensors"))
    if code == 0:
        _restore_existing(world["existing"])


@SETTINGS
@given(key=st.sampled_from(["hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                            "intermediate_size", "vocab_size", "head_dim", "rms_norm_eps", "model_type",
                            "tie_word_embeddings"]),
       value=st.sampled_from(WEIRD_VALUES + ["<delete>"]), cmd=st.integers(0, 4))
def test_mangled_config_values(world, tmp_path_factory, key, value, cmd):
    bad = tmp_path_factory.mktemp("cfg") / "model"
    shutil.copytree(world["big"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    if value == "<delete>":
        cfg.pop(key, None)
    else:
        cfg[key] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _ = check_run(model_commands(world, bad)[cmd], world["existing"])
    if code == 0:
        _restore_existing(world["existing"])


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(damage=BYTE_DAMAGE, cmd=st.sampled_from(["convert", "eval", "init"]))
def test_corrupted_gguf(world, tmp_path_factory, damage, cmd):
    bad = tmp_path_factory.mktemp("gguf") / "bad.gguf"
    data = world["gguf"].read_bytes()
    bad.write_bytes(data[:4] + corrupt_bytes(data[4:], *damage))  # the GGUF magic stays
    argv = {"convert": ["convert", bad, "--out", world["existing"], "--force"],
            "eval": ["eval", bad, "--data", HELDOUT, "--max-tokens", 600, "--seq-len", 64],
            "init": ["init", "--size", world["size"], "--anchors", bad, world["small"], "--out", world["existing"],
                     "--force"]}[cmd]
    code, _ = check_run(argv, world["existing"], subprocess_run=True)
    if code == 0:
        _restore_existing(world["existing"])


@SETTINGS
@given(field=st.sampled_from(["params", "layers", "hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab",
                              "source", "sha256", "name", "parent", "<garbage>"]),
       value=st.sampled_from(WEIRD_VALUES[:-1] + ["'../../etc'", 10**15, 2**40]), cmd=st.sampled_from(["show", "init"]))
def test_mangled_manifests(world, tmp_path_factory, field, value, cmd):
    d = tmp_path_factory.mktemp("chain") / "c"
    shutil.copytree(world["chain"], d, symlinks=True)
    text = (d / "chain.toml").read_text()
    if field == "<garbage>":
        text = text[: len(text) // 3] + "[[anchors\nname = "
    else:
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line.split("=")[0].strip() == field:
                lines[i] = f"{field} = {_toml(value)}"
                break
        text = "\n".join(lines)
    (d / "chain.toml").write_text(text)
    argv = (["chain", "show", d] if cmd == "show" else
            ["init", "--size", world["size"], "--chain", d, "--out", world["existing"], "--force"])
    code, _ = check_run(argv, world["existing"])
    if code == 0:
        _restore_existing(world["existing"])


def _toml(v) -> str:
    if v is None:
        return '""'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v.strip("'"))
    if isinstance(v, (list, dict)):
        return "[]" if isinstance(v, list) else "{}"
    return repr(v)


def _bad_option_cases(w: dict) -> list:
    out = w["existing"]
    distill = ["distill", "--teacher", w["big"], "--student", w["small"], "--data", w["cache"], "--out", out]
    return [
        (distill + ["--tokens"], ["0", "-5", "abc", "1e400"]),
        (distill + ["--tokens", "256", "--lr"], ["nan", "inf", "-1e-3", "0", "2"]),
        (distill + ["--tokens", "256", "--temperature"], ["0", "-1", "nan"]),
        (distill + ["--tokens", "256", "--weight-decay"], ["-0.1", "nan"]),
        (distill + ["--tokens", "256", "--batch-size"], ["0", "-2"]),
        (distill + ["--tokens", "256", "--seq-len"], ["0", "1"]),
        (["eval", w["big"], "--data", HELDOUT, "--max-tokens"], ["0", "-3"]),
        (["eval", w["big"], "--data"], [w["dir"], "/dev/null", "/nonexistent.txt", sys.executable]),
        (["init", "--size"], ["0M", "-5M", "abc", "nanM", "1e400M", "10B"]),
        (["init", "--size", w["size"], "--anchors", w["big"], w["small"], "--out", out, "--alpha"],
         ["-0.1", "1.5", "nan", "best"]),
        (["init", "--size", w["size"], "--anchors", w["big"], w["small"], "--out", out, "--layers"], ["0", "-1"]),
        (["finetune", w["big"], "--data", w["dir"], "--out", out, "--lr"], ["nan", "0"]),
        (["finetune", w["big"], "--data", w["dir"], "--out", out, "--num-layers"], ["0", "-2"]),
        (["finetune", w["big"], "--data", w["dir"], "--out", out, "--lora-rank"], ["100000000"]),
        (distill + ["--tokens", "256", "--seq-len", "100000", "--batch-size"], ["1000000"]),
        (["bridge", "--source", w["big"], "--student", w["small"], "--prompt-data", HELDOUT, "--tokens", "64",
          "--out", out, "--top-p"], ["2", "0", "nan"]),
        (["data", "prepare", HELDOUT, "--tokenizer", w["big"], "--out", out, "--heldout-fraction"], ["1", "-0.1", "nan"]),
        (["data", "prepare", sys.executable, "--tokenizer", w["big"], "--out", out, "--force", "--heldout-fraction"],
         ["0.1"]),
        (["prune", "--from", w["big"], "--out", out, "--size"], ["0K", "10B"]),
        (["prune", "--from", w["big"], "--out", out, "--size", "100K", "--calib"], [w["dir"], sys.executable]),
        (["export", w["big"], "--out", out, "--force", "--eval-tokens"], ["0"]),
        (["chain", "pack", w["chain"], "--out", out, "--force", "--anchors"], ["nope"]),
    ]


def test_bad_option_values_across_commands(world):
    """Every bad value of every option above: exit 1, one error line naming
    the option or the fix, the existing output untouched."""
    n = 0
    for prefix, values in _bad_option_cases(world):
        for v in values:
            code, err = check_run([*prefix, v], world["existing"])
            assert code == 1, ([*prefix, v], err[-2000:])
            n += 1
    assert n >= 50
