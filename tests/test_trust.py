"""Nothing on disk is trusted: names that become paths, pinned hashes, cache
entries, symlinked outputs, teacher caches and non-finite results."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONFIGS, make_tiny_chain, tiny_anchor_pair

from cbd_mlx.chain import CHAINS_DIR, find_chain, load_chain, load_chain_anchor
from cbd_mlx.errors import CBDError
from cbd_mlx.loader import load_anchor, resolve

EVIL_NAMES = ["../../x", "/etc/passwd", "..", "a/b", "a\\b", "", ".hidden", "x" * 200, 7, ["a"]]


@pytest.fixture
def tiny_chain(tmp_path, tokenizer_dir):
    big, small = tiny_anchor_pair(tmp_path, TINY_CONFIGS["llama"], tokenizer_dir, layers=3, ffn=96)
    return make_tiny_chain(tmp_path / "chain", big, small, pin=True)


@pytest.mark.parametrize("evil", EVIL_NAMES)
def test_anchor_names_that_would_become_paths_are_refused(tiny_chain, evil):
    text = (tiny_chain / "chain.toml").read_text()
    bad = text.replace('name = "a1"', f"name = {evil!r}".replace("'", '"') if isinstance(evil, str)
                       else f"name = {evil}".replace("'", '"'), 1)
    (tiny_chain / "chain.toml").write_text(bad)
    with pytest.raises(CBDError):
        load_chain(tiny_chain / "chain.toml")


def _flip(f: Path, at_from_end: int = 4096, n: int = 4096) -> None:
    """Zero n bytes of a file's tensor data (its end, far from the header)."""
    with open(f, "r+b") as fh:
        fh.seek(-at_from_end, os.SEEK_END)
        fh.write(b"\0" * n)


def test_a_tampered_anchor_fails_its_pin_although_its_record_is_unchanged(tiny_chain):
    c = find_chain(str(tiny_chain))
    assert load_chain_anchor(c, c.anchors[1]).n_params > 0
    _flip(tiny_chain / "anchors" / "a1" / "model.safetensors")
    with pytest.raises(CBDError, match="does not match the sha256"):
        load_chain_anchor(c, c.anchors[1])


def test_the_embedded_chain_pins_its_delta_stored_anchors(tmp_path, monkeypatch):
    """A shipped anchor is a delta on its parent's Subset: a tampered delta
    file rebuilds to other weights, and the manifest's sha256 refuses them."""
    monkeypatch.setenv("CBD_MLX_CACHE", str(tmp_path / "cache"))
    shutil.copytree(CHAINS_DIR / "smollm2-mini", tmp_path / "c", symlinks=True)
    c = find_chain(str(tmp_path / "c"))
    first = c.anchors[1]  # coded on the source itself: the cheapest to rebuild
    _flip(tmp_path / "c" / first.source / "delta.safetensors", at_from_end=1 << 20)
    with pytest.raises(CBDError, match="do not match the chain's sha256"):
        load_chain_anchor(c, first, check_finite=False)


def test_a_poisoned_gguf_cache_entry_is_converted_again(tmp_path, tokenizer_dir):
    from cbd_mlx.gguf import write_gguf

    big, _ = tiny_anchor_pair(tmp_path, TINY_CONFIGS["llama"], tokenizer_dir, layers=3, ffn=96)
    a = load_anchor(str(big))
    gguf = tmp_path / "tiny.gguf"
    write_gguf(a.config, a.weights, a.path, gguf, "f16")
    entry = resolve(str(gguf))
    good = {k: np.array(v) for k, v in load_anchor(str(entry)).weights.items()}
    _flip(entry / "model.safetensors", at_from_end=512, n=256)  # the edit a poisoner would make
    assert resolve(str(gguf)) == entry
    again = load_anchor(str(entry)).weights
    assert all(np.array_equal(good[k], again[k]) for k in good)
    (entry / "config.json").write_text((entry / "config.json").read_text().replace("64", "65", 1))
    assert load_anchor(str(resolve(str(gguf)))).shape == a.shape


def test_symlinked_outputs_and_checkpoints_are_refused(tmp_path, tokenizer_dir):
    from conftest import write_docs

    from cbd_mlx.data import prepare
    from cbd_mlx.distill import distill, work_dir
    from cbd_mlx.train import TrainConfig

    big, small = tiny_anchor_pair(tmp_path, TINY_CONFIGS["llama"], tokenizer_dir, layers=3, ffn=96)
    cache = tmp_path / "cache"
    prepare([write_docs(tmp_path / "docs")], str(big), cache, heldout_fraction=0.25)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    out = tmp_path / "out"
    os.symlink(victim, work_dir(out))
    cfg = TrainConfig(tokens=2 * 4 * 32, batch_size=4, seq_len=32)
    with pytest.raises(CBDError, match="symbolic link"):
        distill(str(big), str(small), cache, out, cfg, log=lambda *_: None)
    os.unlink(work_dir(out))
    os.symlink(victim, out)
    with pytest.raises(CBDError, match="symbolic link"):
        distill(str(big), str(small), cache, out, cfg, force=True, log=lambda *_: None)
    assert (victim / "keep.txt").read_text() == "precious" and sorted(os.listdir(victim)) == ["keep.txt"]


@pytest.mark.parametrize("damage", ["index", "positive", "nan", "shape"])
def test_a_damaged_teacher_cache_is_refused_not_trained_on(tmp_path, damage):
    import mlx.core as mx

    from cbd_mlx.teacher_cache import TeacherCache

    kw = dict(k=4, batch_size=2, seq_len=8, seed=0, n_batches=3, vocab=300, teacher_sha256="t", data="d")
    tc = TeacherCache(tmp_path / "tc", None, **kw)
    tc.idx[:] = 1
    tc.logp[:] = -3.0
    tc.filled[:] = True
    if damage == "index":
        tc.idx[1, 0, 0, 0] = 60000
    elif damage == "positive":
        tc.logp[1, 0, 0, 0] = 2.0
    elif damage == "nan":
        tc.logp[1, 0, 0, 0] = np.nan
    tc.flush()
    if damage == "shape":
        np.save(tmp_path / "tc" / "filled.npy", np.ones(7, bool))
        with pytest.raises(CBDError, match="damaged"):
            TeacherCache(tmp_path / "tc", None, **kw)
        return
    tc = TeacherCache(tmp_path / "tc", None, **kw)
    x = mx.zeros((2, 8), mx.int32)
    assert tc.topk(0, x).idx.shape == (2, 8, 4)
    with pytest.raises(CBDError, match="damaged"):
        tc.topk(1, x)


def test_eval_of_a_nan_model_is_an_error_not_ppl_nan(tmp_path, tokenizer_dir):
    import mlx.core as mx
    from conftest import random_weights

    from cbd_mlx.arch.anchor import model_from_weights
    from cbd_mlx.evaluate import perplexity

    cfg = TINY_CONFIGS["llama"]
    w = random_weights(cfg, 0)
    w["model.norm.weight"] = np.full_like(w["model.norm.weight"], np.inf)
    model = model_from_weights(cfg, w)
    mx.eval(model.parameters())
    with pytest.raises(CBDError, match="not a number"):
        perplexity(model, list(range(3, 200)), seq_len=64, progress=False)


def test_generate_names_a_bad_model_path_instead_of_a_network_error(tmp_path, capsys, tokenizer_dir):
    from cbd_mlx.cli import main

    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "adapters.safetensors").write_bytes(b"x")
    for model, want in ((tmp_path / "nope", "does not exist"), (tmp_path / "adapters", "--adapter-path")):
        with pytest.raises(SystemExit) as e:
            main(["generate", "--model", str(model), "--prompt", "hi"])
        err = capsys.readouterr().err
        assert e.value.code == 1 and want in err and len(err.strip().splitlines()) == 1, err
    big, _ = tiny_anchor_pair(tmp_path, TINY_CONFIGS["llama"], tokenizer_dir)
    for args, want in ((["--prompt", "hi"], "give --model"),
                       (["--model", str(big), "--max-tokens", "abc"], "invalid int value")):
        with pytest.raises(SystemExit) as e:
            main(["generate", *args])
        err = capsys.readouterr().err
        assert e.value.code == 1 and want in err and len(err.strip().splitlines()) == 1, err


BAD_FIELDS = [("rope_theta", float("nan")), ("rope_theta", -1.0), ("rope_theta", float("inf")),
              ("rope_theta", "big"), ("rope_scaling", "linear"), ("rotary_pct", 5), ("max_position_embeddings", 0),
              ("tie_word_embeddings", "yes"), ("attention_bias", 3)]


@pytest.mark.parametrize("key,value", BAD_FIELDS)
def test_config_fields_a_model_reads_are_range_checked(tmp_path, tokenizer_dir, key, value):
    import json

    big, _ = tiny_anchor_pair(tmp_path, TINY_CONFIGS["llama"], tokenizer_dir)
    cfg = json.loads((big / "config.json").read_text())
    cfg[key] = value
    (big / "config.json").write_text(json.dumps(cfg))  # NaN/Infinity as Python's json writes them
    with pytest.raises(CBDError, match=key):
        load_anchor(str(big))


@pytest.mark.parametrize("record", ['{"text": null}', '{"text": 12345}', '{"text": ["a"]}', '{"text": {"a": 1}}',
                                    '[' * 100000 + ']' * 100000])
def test_jsonl_records_that_are_not_text_are_refused(tmp_path, tokenizer_dir, record):
    from cbd_mlx.data import prepare

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a fine line of text"}\n' + record + "\n")
    with pytest.raises(CBDError, match="d.jsonl:2"):
        prepare([f], str(tokenizer_dir), tmp_path / "cache")


@pytest.mark.parametrize("body", [b"\xff\xfe\x00bad", b"[" * 100000 + b"]" * 100000])
def test_json_and_toml_that_cannot_be_read_are_one_clear_error(tmp_path, body):
    from cbd_mlx.save import read_json

    (tmp_path / "x.json").write_bytes(body)
    with pytest.raises(CBDError, match="not valid JSON"):
        read_json(tmp_path / "x.json", "record")
    (tmp_path / "chain.toml").write_bytes(body.replace(b"[", b"a = [") if body[0] == 91 else body)
    with pytest.raises(CBDError, match="not valid TOML"):
        load_chain(tmp_path / "chain.toml")


def test_a_batch_beyond_memory_is_refused_before_it_crashes(tmp_path, tokenizer_dir):
    from conftest import random_weights

    from cbd_mlx.arch.anchor import model_from_weights
    from cbd_mlx.data import PackedSequences
    from cbd_mlx.train import TrainConfig, train

    cfg = TINY_CONFIGS["llama"]
    model = model_from_weights(cfg, random_weights(cfg, 0))
    data = PackedSequences(np.arange(4096, dtype=np.int32) % 200, 64)
    big = TrainConfig(tokens=10**12, batch_size=10**6, seq_len=10**4)
    with pytest.raises(CBDError, match="lower --batch-size"):
        train(model, data, None, big, tmp_path / "w", log=lambda *_: None)


def test_pipes_and_endless_devices_are_not_read(tmp_path, tokenizer_dir):
    from cbd_mlx.bridge import prompts_from
    from cbd_mlx.evaluate import tokenize_file
    from cbd_mlx.loader import load_tokenizer

    big, _ = tiny_anchor_pair(tmp_path, TINY_CONFIGS["llama"], tokenizer_dir)
    (big / "model.safetensors").unlink()
    os.mkfifo(big / "model.safetensors")
    with pytest.raises(CBDError, match="not a regular file"):
        load_anchor(str(big))
    with pytest.raises(CBDError, match="not a regular file"):
        prompts_from(Path("/dev/zero"), [], 4)
    big_text = tmp_path / "big.txt"
    big_text.write_text("word " * 2_000_000)  # 10 MB: only a prefix is tokenized for 100 tokens
    assert len(tokenize_file(load_tokenizer(tokenizer_dir), big_text, 100)) == 100


def _gguf(path: Path, head_count=2, tokens=True, tensor=np.zeros((4, 8), np.float32)) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    if head_count is not None:
        w.add_head_count(head_count)
    if tokens:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b", "c", "d"])
    w.add_tensor("token_embd.weight", tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kw,want", [({"head_count": 0}, "head_count"), ({"head_count": None}, "head_count"),
                                     ({"tokens": False}, "tokenizer"),
                                     ({"tensor": np.zeros((4, 8), np.int32)}, "I32"),
                                     ({"tensor": np.zeros((4, 8), np.float64)}, "F64")])
def test_gguf_contents_are_checked_not_only_its_container(tmp_path, kw, want):
    from cbd_mlx.gguf import read_gguf

    with pytest.raises(CBDError, match=want):
        read_gguf(_gguf(tmp_path / "m.gguf", **kw))


def test_anchors_too_far_apart_to_search_are_refused_not_spun_on():
    from cbd_mlx.arch.anchor import param_template
    from cbd_mlx.arch.families import FAMILIES
    from cbd_mlx.arch.shapes import Shape, solve_shape
    from cbd_mlx.chain import manifest_config

    small = Shape(1, 64, 64, 1, 1, 64, 1000)
    big = Shape(1024, 65536, 65536, 1024, 1024, 64, 1000)
    template = param_template(manifest_config("llama", big))
    with pytest.raises(CBDError, match="too far apart"):
        solve_shape(FAMILIES["llama"], template, small, big, 10**9)
