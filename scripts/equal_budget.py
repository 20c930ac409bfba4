#!/usr/bin/env python3
"""Which start is better for N tokens of your own? A CBD init + `recover`,
the pruned-only Subset of the source + `recover` (what a user could do
without a chain), and training from scratch, at equal token budgets, on the
same data and the same held-out windows as scripts/scratch_baseline.py.

Each init is recovered once per budget (a run sized for N: its own warmup
and cosine); scratch points come from scratch_baseline.py's one long run
(its curve, and snapshots of its weights at the budgets, `--snapshot N=DIR`;
a point of that run at N has seen the same tokens, but its learning rate is
still high there, unlike a run sized for N). Every model is scored on the
chain corpus's held-out split (the scratch run's windows) and on each text
of an out-of-domain suite (`cbd-mlx data suite`). Writes OUT (JSON) and a
plot with one panel per held-out text.

    python scripts/equal_budget.py --cbd cbd-init-45M --subset subset-45M --data CACHE \\
        --scratch-work ~/.cache/cbd-mlx/scratch-45M --snapshot 262144=snap-128 --suite SUITE \\
        --budgets 65536,262144
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cbd_mlx  # noqa: E402,F401  (OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from cbd_mlx.data import PackedSequences, open_cache, run_splits  # noqa: E402
from cbd_mlx.evaluate import perplexity, tokenize_file  # noqa: E402
from cbd_mlx.arch.anchor import model_from_weights  # noqa: E402
from cbd_mlx.loader import load_anchor, load_tokenizer  # noqa: E402
from cbd_mlx.recover import recover, recover_lr  # noqa: E402
from cbd_mlx.train import CHECKPOINT, TrainConfig, heldout_loss  # noqa: E402

EVAL = TrainConfig(tokens=1, batch_size=8, seq_len=256, eval_batches=8)  # the scratch run's held-out windows


def score(model, heldout: PackedSequences, suite: dict[str, list[int]]) -> dict:
    out = {"heldout": heldout_loss(model, heldout, EVAL)}
    for name, toks in suite.items():
        out[name] = perplexity(model, toks, seq_len=512, batch_size=4, progress=False)["nll"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cbd", required=True, help="the CBD init")
    ap.add_argument("--subset", required=True, help="the pruned-only init of the same shape")
    ap.add_argument("--data", type=Path, required=True, help="the chain's token cache (the scratch run's)")
    ap.add_argument("--scratch-work", type=Path, required=True, help="scratch_baseline.py's --work")
    ap.add_argument("--snapshot", action="append", default=[], help="N=DIR: the scratch run's weights at N tokens")
    ap.add_argument("--suite", type=Path, required=True, help="out-of-domain suite directory")
    ap.add_argument("--suite-tokens", type=int, default=4096)
    ap.add_argument("--budgets", default="65536,262144")
    ap.add_argument("--lr", type=float, default=None, help="recover's lr [default: recover's own, by size]")
    ap.add_argument("--work", type=Path, default=Path("equal-budget"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "smollm2-mini" / "equal_budget.json")
    args = ap.parse_args()

    _, splits = open_cache(args.data)
    _, heldout, _ = run_splits(splits, EVAL.seq_len, 0)
    cbd = load_anchor(args.cbd)
    tok = load_tokenizer(cbd.path)
    suite = {p.stem: tokenize_file(tok, p, args.suite_tokens) for p in sorted(args.suite.glob("*.txt"))
             if p.name != "README.txt"}
    res = json.loads(args.out.read_text()) if args.out.is_file() else {}
    res.setdefault("points", {})
    budgets = [int(b) for b in args.budgets.split(",")]

    def put(kind, n, scores):
        res["points"].setdefault(kind, {})[str(n)] = scores
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
        print(kind, n, json.dumps(scores), flush=True)

    for kind, src in (("cbd", args.cbd), ("subset", args.subset)):
        if "0" not in res["points"].get(kind, {}):
            a = load_anchor(src)
            put(kind, 0, score(model_from_weights(a.config, a.weights), heldout, suite))
        for n in budgets:
            if str(n) in res["points"].get(kind, {}):
                continue
            lr = args.lr or recover_lr(load_anchor(src).n_params)
            cfg = TrainConfig(tokens=n, batch_size=8, seq_len=256, loss="ce", eval_every=max(1, n // 2048 // 8),
                              eval_batches=8, save_every=20, lr=lr)
            out = args.work / f"{kind}-{n}"
            rec = recover(src, [args.data], out, cfg, None, force=True, log=print)
            a = load_anchor(str(out))
            put(kind, n, {**score(model_from_weights(a.config, a.weights), heldout, suite),
                          "best_step": rec["best_step"], "steps": rec["steps"]})
    for spec in args.snapshot:
        n, d = spec.split("=", 1)
        if n in res["points"].get("scratch", {}):
            continue
        model = model_from_weights(cbd.config, dict(mx.load(str(Path(d) / "model.safetensors"))))
        put("scratch", int(n), score(model, heldout, suite))
    done = args.scratch_work / "metrics.json"  # the finished run's record, else its last checkpoint's
    state = json.loads((done if done.is_file() else args.scratch_work / CHECKPOINT / "state.json").read_text())
    res["scratch_curve"] = [[0, state["heldout_before"]]] + [
        [m["tokens"], m["heldout_loss"]] for m in state["metrics"] if m.get("heldout_loss") is not None
        and "event" not in m]
    res["budgets"], res["recover_lr"] = budgets, args.lr or recover_lr(cbd.n_params)
    args.out.write_text(json.dumps(res, indent=1))
    plot(res, args.out.with_suffix(".png"))


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = [k for k in next(iter(res["points"].values()))["0"] if k not in ("best_step", "steps")]
    fig, axes = plt.subplots(1, len(texts), figsize=(4.2 * len(texts), 4), squeeze=False)
    for ax, text in zip(axes[0], texts):
        if text == "heldout":
            c = np.array(res["scratch_curve"])
            ax.plot(np.maximum(c[:, 0], 1024), c[:, 1], "-", color="C0", alpha=0.6, label="scratch (one 1M run)")
        for i, (kind, label) in enumerate((("cbd", "CBD init + recover"), ("subset", "pruned Subset + recover"),
                                           ("scratch", "scratch (snapshots)"))):
            pts = sorted((int(n), v[text]) for n, v in res["points"].get(kind, {}).items() if text in v)
            if pts:
                xs = [max(n, 1024) for n, _ in pts]
                ax.plot(xs, [v for _, v in pts], "o-" if kind != "scratch" else "s", color=f"C{i + 1}",
                        label=label)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens (0 plotted at 1K)")
        ax.set_ylabel("CE (nats)")
        ax.set_title("chain corpus held-out" if text == "heldout" else f"out of domain: {text}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
