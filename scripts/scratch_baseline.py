#!/usr/bin/env python3
"""The paper's headline at our scale: how many tokens does a model trained
from scratch need to reach a CBD init's step-0 held-out loss?

Trains a model of an init's exact shape from random weights (GPT-2 style
N(0, 0.02) init, AdamW lr 1e-3, 2% warmup, cosine, weight decay 0.1, CE) on a
token cache, resumably (rerun the same command after an interruption), and
scores the CBD init on the same held-out batches. Writes OUT (JSON with shape,
tokens, curve [[tokens, heldout_loss], ...], cbd_step0_heldout_loss,
chain_tokens, tokens_to_cbd_step0) and a plot beside it.

    python scripts/scratch_baseline.py --like cbd-init-45M --data CACHE --tokens 1048576 \\
        --work ~/.cache/cbd-mlx/scratch-45M --out results/smollm2-mini/scratch.json
    # while it runs (or after): --report-only writes the JSON and plot from the last checkpoint
    # (--shape-of DIR trains on DIR's shape before the init exists; --like is then needed for the report)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cbd_mlx  # noqa: E402,F401  (OpenBLAS before MLX)
from cbd_mlx.train import INIT_STD  # noqa: E402

FINAL = "final.safetensors"  # the finished run's weights, in --work

def chain_tokens(init_dir: Path) -> int | None:
    """Distillation tokens spent building the chain down to the init's smaller
    anchor (every anchor on the way, those a packed chain left out included,
    from their cbd.json records)."""
    from cbd_mlx.chain import find_chain
    from cbd_mlx.loader import read_provenance

    prov = read_provenance(init_dir)
    chain = prov.get("chain") or {}
    if not chain.get("manifest"):
        return None
    c = find_chain(chain["manifest"])
    names = [a.name for a in c.anchors]
    small = chain["anchors"][-1]
    built = Path(c.path).parent
    total = 0
    for name in names[1:names.index(small) + 1]:
        rec = read_provenance(built / "anchors" / name)
        histories = [rec.get("history", [])] + [a.get("history", []) for a in rec.get("left_out", [])]
        total += sum(h.get("tokens_seen", 0) for hist in histories for h in hist if h.get("kind") == "distill")
    return total


def power_law(d, e, b, beta):
    return e + b * d ** (-beta)


def fit_crossing(curve: list, target: float, boots: int = 1000, min_tokens: int = 32768, seed: int = 0) -> dict:
    """Fit L(D) = E + B D^-beta to the curve's points past ``min_tokens`` and
    solve L(D*) = ``target``; a bootstrap over the points gives a 5-95% band.
    D* is None when the fitted floor E is at or above the target (never reached)."""
    import numpy as np
    from scipy.optimize import curve_fit

    pts = np.array([(t, loss) for t, loss in curve if t >= min_tokens], dtype=np.float64)

    def fit(p):
        (e, b, beta), _ = curve_fit(power_law, p[:, 0], p[:, 1], p0=(2.0, 100.0, 0.3),
                                    bounds=([0.0, 0.0, 0.01], [20.0, 1e9, 3.0]), maxfev=20000)
        d = (b / (target - e)) ** (1.0 / beta) if target > e else None
        return (e, b, beta), d

    (e, b, beta), d_star = fit(pts)
    rng = np.random.default_rng(seed)
    ds = []
    for _ in range(boots):
        sample = pts[np.sort(rng.integers(0, len(pts), len(pts)))]
        if len(np.unique(sample[:, 0])) < 4:
            continue
        try:
            ds.append(fit(sample)[1])
        except RuntimeError:
            continue
    finite = np.array([d for d in ds if d is not None])
    return {"E": e, "B": b, "beta": beta, "points": len(pts), "d_star": d_star,
            "band_5_95": [float(np.percentile(finite, 5)), float(np.percentile(finite, 95))] if len(finite) else None,
            "bootstrap_never_reached": 1.0 - len(finite) / max(len(ds), 1), "measured_up_to": float(pts[-1, 0])}


def report(args, curve: list, cbd_loss: float, shape: dict, chain_toks) -> dict:
    hit = next((t for t, loss in curve if loss <= cbd_loss), None)
    fit = fit_crossing(curve, cbd_loss)
    out = {
        "shape": shape,
        "tokens": curve[-1][0] if curve else 0,
        "curve": curve,
        "cbd_step0_heldout_loss": cbd_loss,
        "chain_tokens": chain_toks,
        "tokens_to_cbd_step0": hit,
        "tokens_to_cbd_step0_is_lower_bound": hit is None,
        "fit": fit,
        "d_star_over_chain_tokens": (fit["d_star"] / chain_toks) if fit["d_star"] and chain_toks else None,
        "d_star_over_measured": (fit["d_star"] / fit["measured_up_to"]) if fit["d_star"] else None,
        "recipe": {"init": f"N(0, {INIT_STD})", "lr": args.lr, "batch": [args.batch_size, args.seq_len],
                   "warmup": 0.02, "weight_decay": 0.1, "loss": "ce", "data": str(args.data)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([t for t, _ in curve], [loss for _, loss in curve], "o-", ms=3, label="scratch (random init)")
    if fit["d_star"]:
        import numpy as np

        xs = np.geomspace(32768, fit["d_star"] * 1.5, 200)
        ax.plot(xs, power_law(xs, fit["E"], fit["B"], fit["beta"]), "--", color="C0", alpha=0.6,
                label=f"fit E + B D^-{fit['beta']:.2f}; D* = {fit['d_star']:.3g} tokens")
        ax.set_xscale("log")
    ax.axhline(cbd_loss, color="C3", ls="--", label=f"CBD init at step 0 ({cbd_loss:.3f})")
    if chain_toks:
        ax.axvline(chain_toks, color="C2", ls=":", label=f"tokens spent on the chain ({chain_toks:,})")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out CE (nats)")
    ax.set_title(f"scratch vs CBD init ({shape['layers']} layers x {shape['hidden']}, ffn {shape['ffn']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=100)
    plt.close(fig)
    print(f"scratch: {out['tokens']:,} tokens, held-out {curve[-1][1]:.3f} (CBD step 0: {cbd_loss:.3f}); "
          + (f"reaches CBD's step 0 after {hit:,} tokens" if hit else
             f"does not reach CBD's step 0 within {out['tokens']:,} tokens (a lower bound)"))
    return out


def main() -> None:
    from cbd_mlx.data import open_cache, run_splits
    from cbd_mlx.losses import ce_loss
    from cbd_mlx.arch.anchor import model_from_weights
    from cbd_mlx.train import CHECKPOINT, TrainConfig, heldout_loss, random_model, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--like", type=Path, help="a CBD init: its shape, and its step-0 loss")
    ap.add_argument("--shape-of", type=Path, help="a model whose shape to train (default: --like's)")
    ap.add_argument("--data", type=Path, required=True, help="token cache (the chain's)")
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--evals", type=int, default=32, help="held-out points on the curve")
    ap.add_argument("--work", type=Path, required=True, help="checkpoints (resumed when present)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "smollm2-mini" / "scratch.json")
    ap.add_argument("--report-only", action="store_true", help="write the JSON/plot from the last checkpoint")
    args = ap.parse_args()

    if not (args.like or args.shape_of):
        ap.error("give --like INIT (or --shape-of MODEL to train before the init exists)")
    from cbd_mlx.loader import load_anchor as _load, read_json

    shape_cfg = read_json((args.shape_of or args.like) / "config.json", "config.json")
    _, splits = open_cache(args.data)
    train_data, heldout, _ = run_splits(splits, args.seq_len, 0)
    per_step = args.batch_size * args.seq_len
    steps = max(1, args.tokens // per_step)
    cfg = TrainConfig(tokens=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      warmup_fraction=0.02, weight_decay=0.1, loss="ce", eval_every=max(1, steps // args.evals),
                      eval_batches=8, save_every=max(1, min(20, steps // args.evals)))
    if args.report_only:  # the finished run's record, else the last checkpoint's
        done = args.work / "metrics.json"
        state = json.loads((done if done.is_file() else args.work / CHECKPOINT / "state.json").read_text())
        metrics, start = state["metrics"], state["heldout_before"]
    else:
        model = random_model(shape_cfg)
        res = train(model, train_data, heldout, cfg, args.work, log=print, loss_fn=ce_loss())
        metrics, start = res.metrics, res.heldout_before
        if res.finished:  # the last step's weights (scored out of domain by equal_budget.py) and its full record
            import mlx.core as mx
            from mlx.utils import tree_flatten

            mx.save_safetensors(str(args.work / FINAL), dict(tree_flatten(model.parameters())))
            (args.work / "metrics.json").write_text(json.dumps({"metrics": metrics, "heldout_before": start}))
    curve = [[0, start]] + [[m["tokens"], m["heldout_loss"]] for m in metrics
                            if m.get("heldout_loss") is not None and "event" not in m]
    if args.like is None:
        print(f"trained {curve[-1][0]:,} tokens; rerun with --like INIT --report-only for the report")
        return
    like = _load(str(args.like))
    if args.shape_of and _load(str(args.shape_of)).shape != like.shape:
        raise SystemExit(f"--shape-of {args.shape_of} and --like {args.like} have different shapes")
    cbd_loss = heldout_loss(model_from_weights(like.config, like.weights), heldout, cfg)
    report(args, curve, cbd_loss, like.shape.as_dict(), chain_tokens(args.like))


if __name__ == "__main__":
    main()
