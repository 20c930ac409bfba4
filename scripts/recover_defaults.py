#!/usr/bin/env python3
"""Choose `recover`'s defaults by measurement: each init is recovered with each
recipe on the first part of a text the chain never saw and scored on the rest
of that text (perplexity, up to --eval-tokens), all with the same budget.

    python scripts/recover_defaults.py cbd-init-45M cbd-init-80M cbd-init-138M \\
        --train moby-train.txt --eval moby-eval.txt --tokens 16384 \\
        --recipe '{"lr": 3e-4}' --recipe '{"lr": 1e-4}' --recipe '{"lr": 5e-5}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cbd_mlx  # noqa: E402,F401  (OpenBLAS before MLX)
from cbd_mlx.evaluate import evaluate  # noqa: E402
from cbd_mlx.recover import recover  # noqa: E402
from cbd_mlx.train import TrainConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--recipe", action="append", required=True,
                    help='JSON: TrainConfig fields, plus "kd": true for --kd-from auto (repeatable)')
    ap.add_argument("--train", type=Path, required=True, help="the first part of a text (recovery data)")
    ap.add_argument("--eval", type=Path, required=True, help="the rest of that text (scored)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--work", type=Path, default=Path("recover-defaults"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "smollm2-mini" / "recover_defaults.json")
    args = ap.parse_args()
    rows = json.loads(args.out.read_text()) if args.out.is_file() else []
    for model in args.models:
        before = evaluate(model, args.eval, max_tokens=args.eval_tokens, progress=False)["ppl"]
        for spec in args.recipe:
            kw = json.loads(spec)
            kd = kw.pop("kd", False)
            name = "_".join(f"{k}={v}" for k, v in kw.items()) + ("_kd" if kd else "")
            if any(r["model"] == Path(model).name and r["recipe"] == name for r in rows):
                continue
            cfg = TrainConfig(tokens=args.tokens, loss="forward_kl" if kd else "ce", ce_weight=1.0 if kd else 0.0,
                              eval_every=4, save_every=10**6, **kw)
            out = args.work / f"{Path(model).name}-{name}"
            t0 = time.time()
            rec = recover(model, [args.train], out, cfg, "auto" if kd else None, force=True, log=print)
            after = evaluate(str(out), args.eval, max_tokens=args.eval_tokens, progress=False)["ppl"]
            row = {"model": Path(model).name, "recipe": name, "tokens": args.tokens, "ppl_before": before,
                   "ppl_after": after, "change": after / before - 1, "best_step": rec["best_step"],
                   "steps": rec["steps"], "seconds": round(time.time() - t0)}
            rows.append(row)
            print("RESULT", json.dumps(row), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1))
    print(f"\n| init | recipe | ppl on the rest of the text: before -> after ({args.tokens:,} tokens) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['recipe']} | {r['ppl_before']:.1f} -> {r['ppl_after']:.1f} "
              f"({r['change']:+.1%}, best step {r['best_step']}/{r['steps']}) |")


if __name__ == "__main__":
    main()
