"""Sampling text from a model (`data sample`) on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_CONFIGS, random_weights, save_tiny

from cbd_mlx import sample
from cbd_mlx.arch.anchor import model_from_weights
from cbd_mlx.data import prepare
from cbd_mlx.errors import CBDError
from cbd_mlx.loader import load_anchor


@pytest.fixture
def tiny(tokenizer_dir, tmp_path):
    cfg = TINY_CONFIGS["llama"]
    src = save_tiny(tmp_path / "src", cfg, random_weights(cfg, 5), tokenizer_dir)
    a = load_anchor(str(src))
    return src, model_from_weights(a.config, a.weights)


def test_first_tokens_follow_the_model_distribution(tiny):
    _, model = tiny
    start, temp = 7, 0.8
    ids = sample.sample_ids(model, start, 40000, 1, temp, mx.random.key(0))
    logits = model(mx.array([[start]]))[0, -1]
    freq = np.bincount(ids[:, 0], minlength=logits.size) / len(ids)
    tv = {t: 0.5 * np.abs(freq - np.array(mx.softmax(logits / t))).sum() for t in (temp, 1.0)}
    assert tv[temp] < 0.05 < tv[1.0]  # total variation: ~0.035 from sampling noise alone


def test_cold_sampling_with_the_kv_cache_is_greedy_decoding(tiny):
    """At a temperature near 0 a sample is the greedy continuation, recomputed
    here without a cache: the cached steps see the same context."""
    _, model = tiny
    ids = sample.sample_ids(model, 3, 2, 12, 1e-4, mx.random.key(1))
    seq = [3]
    for _ in range(12):
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1])))
    assert ids[0].tolist() == seq[1:] and ids[1].tolist() == seq[1:]


def test_documents_end_at_a_stop_token():
    ids = np.array([[5, 6, 7, 0, 8, 9], [1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5]])
    assert sample.cut_documents(ids, {0}, min_tokens=2) == [[5, 6, 7], [1, 2, 3, 4, 5, 6]]


def test_an_interrupted_sample_resumes_to_the_same_text(tiny, tmp_path, monkeypatch):
    src, _ = tiny
    kw = dict(batch_size=4, seq_len=24, temperature=1.0, seed=3, progress=False)
    whole = sample.sample_text(str(src), tmp_path / "whole", 3 * 4 * 24, **kw)
    real, calls = sample.sample_ids, []

    def dies_on_the_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sample, "sample_ids", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        sample.sample_text(str(src), tmp_path / "resumed", 3 * 4 * 24, **kw)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial-sample").is_dir()
    monkeypatch.setattr(sample, "sample_ids", real)
    again = sample.sample_text(str(src), tmp_path / "resumed", 3 * 4 * 24, **kw)
    assert again == whole and whole["batches"] == 3 and whole["documents"] > 0
    for f in sorted((tmp_path / "whole").glob("*.jsonl")):
        assert (tmp_path / "resumed" / f.name).read_text() == f.read_text()
    assert not (tmp_path / "resumed.partial-sample").exists()
    meta = prepare([tmp_path / "whole"], str(src), tmp_path / "cache", heldout_fraction=0.2)
    assert meta["tokens"]["train"] > 0 and meta["documents"]["train"] + meta["documents"]["heldout"] == \
        whole["documents"]
    with pytest.raises(CBDError, match="already exists"):
        sample.sample_text(str(src), tmp_path / "whole", 10, **kw)
    with pytest.raises(CBDError, match="lower --batch-size"):
        sample.sample_text(str(src), tmp_path / "huge", 10, **{**kw, "batch_size": 10 ** 9})
    assert not (tmp_path / "huge").exists()
    with pytest.raises(CBDError, match="beyond the model's context of 512"):
        sample.sample_text(str(src), tmp_path / "long", 10, **{**kw, "batch_size": 1, "seq_len": 512})


def test_cli_samples_and_refuses_bad_input_in_one_line(tiny, tmp_path):
    src, _ = tiny
    cmd = [sys.executable, "-m", "cbd_mlx", "data", "sample", "--model", str(src), "--tokens", "64",
           "--batch-size", "4", "--seq-len", "16", "--out", str(tmp_path / "s")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (tmp_path / "s" / "sample-00000.jsonl").read_text().splitlines()
    assert lines and all(isinstance(json.loads(x)["text"], str) for x in lines)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "already exists" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*cmd[:5], str(tmp_path / "missing"), *cmd[6:-1], str(tmp_path / "t")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
