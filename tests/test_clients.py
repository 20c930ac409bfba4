"""Outputs checked in the real clients users run them in: llama.cpp (through
llama-cpp-python, built by scripts/test.sh) for every GGUF type and family
that `export --gguf` writes, and mlx-lm's OpenAI-style server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import HELDOUT, TINY_CONFIGS, random_weights, save_tiny

from cbd_mlx.arch.anchor import model_from_weights
from cbd_mlx.cli import main
from cbd_mlx.evaluate import encode_text, perplexity
from cbd_mlx.loader import load_anchor, load_tokenizer

# GGUF type -> how far llama.cpp's perplexity may be from ours (fp32): f16/q8_0 are
# near-lossless, 4/5-bit blocks cost what such quantization costs on a tiny random model
TOLERANCE = {"f16": 0.01, "q8_0": 0.01, "q5_0": 0.05, "q4_1": 0.08, "q4_0": 0.12}
SHAPES = {  # hidden != heads x head_dim, GQA, tied and untied embeddings
    "llama": dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=128),
    "qwen3": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=128),
    "gpt2": dict(n_embd=64, n_head=4),
    "gpt_neox": dict(hidden_size=64, num_attention_heads=4, intermediate_size=128),
}


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed (scripts/test.sh builds it)")
        pytest.skip("llama-cpp-python is not installed (bash scripts/test.sh builds it)")
    return llama_cpp


def llama_cpp_ppl(llama_cpp, gguf_path, tokens: list[int]):
    """(llama.cpp's perplexity of ``tokens`` as one window, the Llama object)."""
    from cbd_mlx.gguf import llama_cpp_perplexity

    r = llama_cpp_perplexity(gguf_path, tokens, seq_len=len(tokens), threads=2)
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, vocab_only=True, verbose=False)
    return r["ppl"], llm


def our_ppl(model_dir, tokens: list[int]) -> float:
    a = load_anchor(str(model_dir))
    return perplexity(model_from_weights(a.config, a.weights), tokens, seq_len=len(tokens), batch_size=1,
                      progress=False)["ppl"]


def export_gguf(model_dir, out, qtype) -> object:
    try:
        main(["export", str(model_dir), "--bits", "8", "--group-size", "32", "--gguf", qtype, "--out", str(out)])
    except SystemExit as e:
        assert e.code in (0, None)
    return next(out.glob("*.gguf"))


@pytest.mark.parametrize("family", sorted(SHAPES))
@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
def test_llama_cpp_loads_every_family_with_our_perplexity(llama_cpp, tokenizer_dir, tmp_path, family, qtype):
    cfg = {**TINY_CONFIGS[family], **SHAPES[family]}
    model = save_tiny(tmp_path / "m", cfg, random_weights(cfg, 11), tokenizer_dir)
    tok = load_tokenizer(model)
    tokens = encode_text(tok, HELDOUT.read_text()[:1500])[:256]
    gguf_path = export_gguf(model, tmp_path / "out", qtype)
    theirs, llm = llama_cpp_ppl(llama_cpp, gguf_path, tokens)
    ours = our_ppl(model, tokens)
    assert abs(theirs / ours - 1) < TOLERANCE[qtype], (family, qtype, ours, theirs)
    # llama.cpp splits text into the same tokens (the pre-tokenizer type is right)
    text = HELDOUT.read_text()[:400]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == encode_text(tok, text)


@pytest.mark.parametrize("qtype", ["q5_0", "q4_1"])
def test_llama_cpp_other_block_types(llama_cpp, tokenizer_dir, tmp_path, qtype):
    cfg = {**TINY_CONFIGS["llama"], **SHAPES["llama"]}
    model = save_tiny(tmp_path / "m", cfg, random_weights(cfg, 12), tokenizer_dir)
    tokens = encode_text(load_tokenizer(model), HELDOUT.read_text()[:1500])[:256]
    theirs, _ = llama_cpp_ppl(llama_cpp, export_gguf(model, tmp_path / "out", qtype), tokens)
    assert abs(theirs / our_ppl(model, tokens) - 1) < TOLERANCE[qtype]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlx_lm_server_answers_a_completion(tokenizer_dir, tmp_path):
    """mlx_lm.server serves a cbd-mlx output and answers one OpenAI-style request."""
    cfg = TINY_CONFIGS["llama"]
    model = save_tiny(tmp_path / "m", cfg, random_weights(cfg, 13), tokenizer_dir)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        body = json.dumps({"prompt": "The garden", "max_tokens": 8, "temperature": 0.0}).encode()
        deadline, reply = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                reply = json.loads(urllib.request.urlopen(req, timeout=30).read())
                break
            except OSError:
                time.sleep(0.5)
        assert reply is not None, proc.stderr.read() if proc.poll() is not None else "no answer"
        assert reply["object"] == "text_completion" and isinstance(reply["choices"][0]["text"], str)
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q6_K"])
def test_llama_cpp_quantizes_k_quants_that_it_loads(llama_cpp, tokenizer_dir, tmp_path, qtype):
    """--gguf Q4_K_M / Q6_K: our f16 GGUF quantized by llama.cpp's own quantizer
    (rows narrower than its 256-wide blocks fall back per tensor), loaded and
    scored by llama.cpp near our perplexity."""
    import gguf

    cfg = {**TINY_CONFIGS["llama"], **dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=64, intermediate_size=512, num_hidden_layers=2)}
    model = save_tiny(tmp_path / "m", cfg, random_weights(cfg, 12), tokenizer_dir)
    tokens = encode_text(load_tokenizer(model), HELDOUT.read_text()[:1500])[:256]
    gguf_path = export_gguf(model, tmp_path / "out", qtype)
    assert gguf_path.name.endswith(f"-{qtype}.gguf") and not list((tmp_path / "out").glob(".*"))
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(gguf_path)).tensors}
    assert {"Q4_K", "Q6_K"} & types, types  # llama.cpp's K-quants, not our writer's types
    theirs, _ = llama_cpp_ppl(llama_cpp, gguf_path, tokens)
    assert abs(theirs / our_ppl(model, tokens) - 1) < 0.1
