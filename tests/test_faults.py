"""Faults for every writing command: SIGKILL in the middle of the write and a
full disk (a small tmpfs). Expectation: the previous output is intact, no
half-written output or temp directory survives the next run, and a full disk
gives one clear error line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CALIB, TINY_CONFIGS, tiny_anchor_pair, write_docs
from test_cli import assert_one_line_error

from cbd_mlx.data import prepare
from cbd_mlx.loader import load_anchor

CFG = dict(TINY_CONFIGS["llama"], hidden_size=128, intermediate_size=256, num_attention_heads=8,
           num_key_value_heads=4)
CLI = [sys.executable, "-m", "cbd_mlx.cli"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("faults")
    big, small = tiny_anchor_pair(d, CFG, tokenizer_dir, layers=2, hidden=64, ffn=128, heads=4, kv_heads=2)
    b = load_anchor(str(big))
    docs = write_docs(d / "docs")
    cache = d / "cache"
    prepare([docs], str(big), cache, heldout_fraction=0.25)
    ft = d / "ft"
    ft.mkdir()
    words = CALIB.read_text().split()
    (ft / "train.jsonl").write_text("\n".join(json.dumps({"text": " ".join(words[i * 40:(i + 1) * 40])})
                                              for i in range(20)) + "\n")
    chain = d / "chain"
    chain.mkdir()
    (chain / "anchors").mkdir()
    shutil.copytree(big, chain / "anchors" / "big")
    shutil.copytree(small, chain / "anchors" / "small")
    lines = ['name = "t"', 'family = "llama"', 'tokenizer = "tiny"']
    for name, a in (("big", b), ("small", load_anchor(str(small)))):
        lines += ["[[anchors]]", f'name = "{name}"', f'source = "anchors/{name}"', f"params = {a.n_params}"]
        lines += [f"{k} = {getattr(a.shape, k)}" for k in ("layers", "hidden", "ffn", "heads", "kv_heads",
                                                           "head_dim", "vocab")]
    (chain / "chain.toml").write_text("\n".join(lines) + "\n")
    mid = (b.n_params + load_anchor(str(small)).n_params) // 2
    train = ["--tokens", "1024", "--batch-size", "4", "--seq-len", "64", "--eval-every", "100"]
    return {
        "convert": ["convert", big],
        "prune": ["prune", "--from", big, "--size", f"{b.n_params * 0.6 / 1e3:.1f}K"],
        "init": ["init", "--size", f"{mid / 1e3:.1f}K", "--anchors", big, small],
        "data prepare": ["data", "prepare", docs, "--tokenizer", big],
        "distill": ["distill", "--teacher", big, "--student", small, "--data", cache, *train],
        "recover": ["recover", small, "--data", cache, *train],
        "export": ["export", big, "--bits", "8", "--group-size", "32", "--package"],
        "chain pack": ["chain", "pack", chain, "--bits", "8", "--group-size", "32"],
        "finetune": ["finetune", big, "--data", ft, "--iters", "4", "--fuse", "--batch-size", "2"],
    }


def tree_hash(path: Path) -> dict:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}*"))


COMMANDS = ["convert", "prune", "init", "data prepare", "distill", "recover", "export", "chain pack", "finetune"]


@pytest.mark.parametrize("command", COMMANDS)
def test_sigkill_while_writing_keeps_the_previous_output(assets, tmp_path, command):
    out = tmp_path / "out"
    args = [*CLI, *map(str, assets[command]), "--out", str(out)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    before = tree_hash(out)
    # again with --force, killed the moment its temp output appears (mid-write)
    p = subprocess.Popen([*args, "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while p.poll() is None and time.time() < deadline:
        if any(".tmp-" in n for n in leftovers(out)):
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    p.wait()
    if p.returncode == -signal.SIGKILL:
        assert tree_hash(out) == before, "a killed writer changed the previous output"
    else:  # finished before the poll saw its temp dir: a complete new output
        assert p.returncode == 0 and set(tree_hash(out)) == set(before)
    # the next run succeeds and clears the killed writer's temp dir
    r = subprocess.run([*args, "--force"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [n for n in leftovers(out) if ".tmp-" in n or ".old-" in n], leftovers(out)


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("command", ["convert", "init", "export", "data prepare", "chain pack"])
def test_full_disk_gives_one_clear_line_and_keeps_the_previous_output(assets, small_disk, command):
    out = small_disk / "out"
    out.mkdir()
    (out / "config.json").write_text('{"previous": true}')  # a previous output that must survive
    r = subprocess.run([*CLI, *map(str, assets[command]), "--out", str(out), "--force"], capture_output=True,
                       text=True, timeout=600)
    assert_one_line_error(r.returncode, r.stderr, "space")
    assert (out / "config.json").read_text() == '{"previous": true}' and sorted(os.listdir(out)) == ["config.json"]
    assert sorted(os.listdir(small_disk)) == ["out"], "temp files left behind on the full disk"


def _damaged(kind: str, assets_dir: Path, tmp: Path) -> Path:
    """A copy of the tiny big anchor damaged in one way."""
    import numpy as np

    from cbd_mlx.gguf import write_gguf
    from cbd_mlx.save import save_weights

    big = Path(assets_dir)
    d = tmp / kind
    shutil.copytree(big, d)
    st = d / "model.safetensors"
    if kind == "corrupt-header":
        data = bytearray(st.read_bytes())
        data[:8] = (10**12).to_bytes(8, "little")
        st.write_bytes(bytes(data))
    elif kind == "flipped-bytes":
        data = bytearray(st.read_bytes())
        n = int.from_bytes(data[:8], "little")
        data[8 + n // 2] ^= 0xFF  # inside the JSON header
        st.write_bytes(bytes(data))
    elif kind == "inf-weights":
        a = load_anchor(str(big))
        w = dict(a.weights)
        w["model.norm.weight"] = np.full_like(w["model.norm.weight"], np.inf)
        save_weights(st, w)
        (d / "cbd.json").unlink()
    elif kind == "no-tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (d / f).unlink()
    elif kind == "truncated-gguf":
        a = load_anchor(str(big))
        g = tmp / "m.gguf"
        write_gguf(a.config, a.weights, a.path, g, "f16")
        g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
        return g
    return d


@pytest.mark.parametrize("kind", ["corrupt-header", "flipped-bytes", "inf-weights", "no-tokenizer",
                                  "truncated-gguf"])
def test_damaged_inputs_give_one_clear_line(assets, tmp_path, capsys, kind):
    from test_cli import run

    big = Path(assets["convert"][1])
    bad = _damaged(kind, big, tmp_path)
    small = Path(assets["init"][5])
    size = assets["init"][2]
    out = tmp_path / "out"
    code, _, err = run(capsys, "init", "--size", size, "--anchors", bad, small, "--out", out)
    words = {"no-tokenizer": "tokenizer", "inf-weights": "nan or inf", "truncated-gguf": "gguf"}.get(kind, "")
    assert_one_line_error(code, err, words)
    assert not out.exists()


def test_concurrent_writers_of_one_out_never_lose_a_result(tokenizer_dir, tmp_path):
    """Two real processes init the same --out at once: one wins, the other
    fails with one clear line, and the output is the winner's, complete."""
    import os
    import subprocess
    import sys

    from conftest import TINY_CONFIGS, tiny_anchor_pair

    big, small = tiny_anchor_pair(tmp_path, TINY_CONFIGS["llama"], tokenizer_dir, layers=3, ffn=96)
    out = tmp_path / "same"
    env = {**os.environ, "CBD_TEST_WRITE_DELAY": "2"}
    from cbd_mlx.loader import load_anchor

    size = f"{load_anchor(str(big)).n_params / 1e6}M"
    cmds = [[sys.executable, "-m", "cbd_mlx", "init", "--size", size, "--anchors", str(big), str(small),
             "--alpha", alpha, "--out", str(out)] for alpha in ("0.25", "0.75")]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    errors = [line for line in loser.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another writer" in errors[0] and "Traceback" not in loser
    winner = next(alpha for (code, _), alpha in zip(results, (0.25, 0.75)) if code == 0)
    assert json.loads((out / "cbd.json").read_text())["alpha"] == winner
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".same.")]  # no leftovers


def test_outputs_get_the_umask_permissions_and_force_leaves_nothing_behind(tmp_path):
    import os

    from cbd_mlx.save import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as t:
            (t / "x").write_text("1")
        assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
        with atomic_dir(tmp_path / "f.tar.gz", file=True) as t:
            t.write_text("a")
        with atomic_dir(tmp_path / "f.tar.gz", force=True, file=True) as t:
            t.write_text("b")
        assert (tmp_path / "f.tar.gz").read_text() == "b"
        assert (tmp_path / "f.tar.gz").stat().st_mode & 0o777 == 0o644
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.tar.gz"]
    finally:
        os.umask(old)


def test_a_gguf_conversion_finished_by_another_process_meanwhile_is_used(tokenizer_dir, tmp_path, monkeypatch):
    """The conversion cache is not a user output: when another process
    finishes the same entry between this one's check and its final move,
    the finished entry is used (was: "created by another writer")."""
    import shutil

    from conftest import TINY_CONFIGS, tiny_anchor_pair

    import cbd_mlx.save as save
    from cbd_mlx.gguf import write_gguf
    from cbd_mlx.loader import load_anchor, resolve

    big, _ = tiny_anchor_pair(tmp_path, TINY_CONFIGS["llama"], tokenizer_dir)
    a = load_anchor(str(big))
    gguf = tmp_path / "m.gguf"
    write_gguf(a.config, a.weights, a.path, gguf, "f16")
    monkeypatch.setenv("CBD_MLX_CACHE", str(tmp_path / "cache"))
    real = save.rename_noreplace

    def other_writer_first(src, dst):
        shutil.copytree(src, dst)  # the other process's identical, finished entry
        return real(src, dst)

    monkeypatch.setattr(save, "rename_noreplace", other_writer_first)
    out = resolve(str(gguf))
    assert (out / "config.json").is_file() and load_anchor(str(out)).n_params == a.n_params


def test_a_kill_between_the_two_renames_restores_the_previous_output(tmp_path):
    """A writer killed after setting the old OUT aside and before moving the
    new one in: the next writer (or reader of OUT) finds the old one back."""
    import subprocess
    import sys

    from cbd_mlx.errors import CBDError
    from cbd_mlx.save import atomic_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".out.old-{dead.pid}"
    aside.mkdir()
    (aside / "result.txt").write_text("the previous result")
    with pytest.raises(CBDError, match="already exists"):  # restored, so a write without --force is refused
        with atomic_dir(tmp_path / "out"):
            pass
    assert (tmp_path / "out" / "result.txt").read_text() == "the previous result" and not aside.exists()
