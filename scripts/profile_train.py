#!/usr/bin/env python3
"""Where a training step's time goes, on the MLX path and on the CPU fast
path (numpy head, attention and SwiGLU), in one process: the model's body
(attention, MLP with its gate, norms; forward + backward), the vocabulary
(the output head's matmuls and the passes over the logits, for CE and for
forward KL + CE against a cached top-32 teacher), the optimizer's update
(plain and compiled AdamW) and reading a batch. Medians of --reps.

    python scripts/profile_train.py MODEL [--batch-size 4 --seq-len 256]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cbd_mlx  # noqa: E402,F401  (OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402

from cbd_mlx import cpu_block, losses  # noqa: E402
from cbd_mlx.data import PackedSequences  # noqa: E402
from cbd_mlx.arch.anchor import model_from_weights  # noqa: E402
from cbd_mlx.loader import load_anchor  # noqa: E402
from cbd_mlx.train import TrainConfig, _Updater  # noqa: E402


def timed(f, reps: int) -> float:
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def profile(model, batch: losses.Batch, teacher: losses.TopK, reps: int, fast: bool) -> dict:
    os.environ["CBD_MLX_FAST_HEAD"] = "1" if fast else "0"
    layer = model.model.layers[0]
    n_layers = len(model.model.layers)
    h = mx.random.normal((*batch.x.shape, model.args.hidden_size))
    mx.eval(h)
    ctx = cpu_block.patched(model) if fast else contextlib.nullcontext()
    r = {}
    with ctx:
        ga = nn.value_and_grad(layer.self_attn, lambda m, h: (m(h, "causal", None) ** 2).sum())
        gm = nn.value_and_grad(layer.mlp, lambda m, h: (m(h) ** 2).sum())
        gl = nn.value_and_grad(layer, lambda m, h: (m(h, "causal", None) ** 2).sum())
        r["attention (fwd+bwd, all layers)"] = timed(lambda: mx.eval(ga(layer.self_attn, h)), reps) * n_layers
        r["MLP with its gate (fwd+bwd, all layers)"] = timed(lambda: mx.eval(gm(layer.mlp, h)), reps) * n_layers
        r["layers (fwd+bwd, all)"] = timed(lambda: mx.eval(gl(layer, h)), reps) * n_layers
    body = nn.value_and_grad(model, lambda m, b: (losses.head_out(m, b.x).h ** 2).sum() * 1e-6)
    r["body: embeddings + layers + final norm (fwd+bwd)"] = timed(lambda: mx.eval(body(model, batch)), reps)
    for name, fn, t in (("CE", losses.ce_loss(), None), ("KD top-32 + 0.5 CE", losses.kd_loss("forward_kl", 1.0, 0.5),
                                                          teacher)):
        b = losses.Batch(batch.x, batch.y, t)
        step = nn.value_and_grad(model, fn)
        r[f"step grads, {name}"] = timed(lambda: mx.eval(step(model, b)), reps)
        r[f"vocabulary, {name} (step - body)"] = r[f"step grads, {name}"] - r["body: embeddings + layers + final "
                                                                                  "norm (fwd+bwd)"]
    _, grads = nn.value_and_grad(model, losses.ce_loss())(model, batch)
    mx.eval(grads)
    if fast:
        upd = _Updater(model, TrainConfig(tokens=10**6), 100)
        r["optimizer: AdamW, compiled step"] = timed(lambda: upd.apply(grads, 1.0), reps)
    else:
        opt = optim.AdamW(learning_rate=1e-4, weight_decay=0.01)
        opt.init(model.trainable_parameters())

        def plain():
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)

        r["optimizer: AdamW, plain"] = timed(plain, reps)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    a = load_anchor(args.model)
    model = model_from_weights(a.config, a.weights)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, a.shape.vocab, 100_000).astype(np.uint32)
    data = PackedSequences(tokens, args.seq_len)
    t_data = timed(lambda: mx.eval(mx.array(data.batch(3, args.batch_size))), args.reps)
    b = mx.array(data.batch(0, args.batch_size))
    batch = losses.Batch(b[:, :-1], b[:, 1:])
    lp = mx.array(np.ascontiguousarray(np.sort(rng.standard_normal((*batch.x.shape, 32)).astype(np.float32) - 4,
                                                 -1)[..., ::-1]))
    idx = mx.array(rng.integers(0, a.shape.vocab, (*batch.x.shape, 32)).astype(np.int32))
    teacher = losses.TopK(idx, lp)
    res = {"model": args.model, "batch": [args.batch_size, args.seq_len], "data (read a batch)": t_data}
    res["mlx"] = profile(model, batch, teacher, args.reps, fast=False)
    res["fast"] = profile(model, batch, teacher, args.reps, fast=True)
    print("| part | MLX ops (s) | CPU fast path (s) |")
    print("|---|---|---|")
    for k in res["mlx"]:
        k2 = k.replace("plain", "compiled step")
        print(f"| {k.replace(', plain', '')} | {res['mlx'][k]:.3f} | {res['fast'].get(k, res['fast'].get(k2, 0)):.3f} |")
    print(f"| data (read a batch) | {t_data:.4f} | {t_data:.4f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
