#!/usr/bin/env python3
"""Recovery recipes measured on a real init, on two kinds of data: the chain's
own corpus (its token cache, held-out split) and new in-domain text (a file
you give; its last 5% is held out). Each recipe is `recover` with the same
budget; prints held-out CE before -> after and writes OUT.json.

    python scripts/recover_sweep.py my-70m --cache CACHE --text book-part.txt --tokens 16384 \\
        '{"lr": 3e-4}' '{"lr": 1e-4}' '{"lr": 1e-4, "kd": true}'
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


def main() -> None:
    from cbd_mlx.recover import recover
    from cbd_mlx.train import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("recipes", nargs="+", help='JSON: TrainConfig fields, plus "kd": true for --kd-from auto')
    ap.add_argument("--cache", type=Path, required=True, help="the chain's token cache")
    ap.add_argument("--text", type=Path, required=True, help="new in-domain text")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--work", type=Path, default=Path("recover-sweep"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "smollm2-mini" / "recovery_recipes.json")
    args = ap.parse_args()
    rows = json.loads(args.out.read_text()) if args.out.is_file() else []
    for spec in args.recipes:
        kw = json.loads(spec)
        kd = kw.pop("kd", False)
        for data_name, data in (("chain corpus", [args.cache]), ("new text", [args.text])):
            name = "_".join(f"{k}={v}" for k, v in kw.items()) + ("_kd" if kd else "")
            if any(r["recipe"] == name and r["data"] == data_name for r in rows):
                continue
            cfg = TrainConfig(tokens=args.tokens, loss="forward_kl" if kd else "ce", ce_weight=1.0 if kd else 0.0,
                              eval_every=4, save_every=10**6, **kw)
            t0 = time.time()
            rec = recover(args.model, data, args.work / f"{name}-{data_name.replace(' ', '-')}", cfg,
                          "auto" if kd else None, force=True, log=print)
            row = {"recipe": name, "data": data_name, "heldout_before": rec["heldout_loss_before"],
                   "heldout_after": rec["heldout_loss_after"], "heldout_last": rec["heldout_loss_last"],
                   "best_step": rec["best_step"],
                   "steps": rec["steps"], "seconds": round(time.time() - t0)}
            rows.append(row)
            print("RESULT", json.dumps(row), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1))
    print("\n| recipe | data | held-out CE: before -> last step (best, kept) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['data']} | {r['heldout_before']:.3f} -> {r['heldout_last']:.3f} "
              f"({r['heldout_after']:.3f} at step {r['best_step']}) |")


if __name__ == "__main__":
    main()
