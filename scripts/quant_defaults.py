#!/usr/bin/env python3
"""Choose `export --bits 4`'s defaults by measurement: candidate 4-bit recipes
(round-to-nearest with mlx-lm's defaults, smaller groups, 8-bit embeddings,
mlx-lm's mixed recipe, GPTQ) on several inits of the embedded chain, each
scored against its own fp32 on the out-of-domain suite (`cbd-mlx data suite`).
Prints a table and writes OUT (JSON).

    python scripts/quant_defaults.py --suite ~/.cache/cbd-mlx/build-smollm2-mini/suite \
        --sizes 45M,80M,125M --out results/export/quant_defaults.json
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
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.utils import dequantize_model  # noqa: E402

from cbd_mlx.errors import CBDError  # noqa: E402
from cbd_mlx.evaluate import perplexity, read_suite  # noqa: E402
from cbd_mlx.arch.anchor import model_from_weights  # noqa: E402
from cbd_mlx.loader import load_anchor  # noqa: E402
from cbd_mlx.quantize import CALIB_SEQ_LEN, CALIB_SEQS, auto_group_size, bits_per_weight, quantize_anchor  # noqa: E402
from cbd_mlx.calibration import DEFAULT_CALIB, calibration_from  # noqa: E402

# (label, method, group size (None: export's auto, 64 where it divides every width, else 32), recipe,
#  embedding bits or None for the method's own default)
VARIANTS = [
    ("rtn (the old default)", "rtn", None, None, None),
    ("rtn g32", "rtn", 32, None, None),
    ("rtn, embeddings 8-bit", "rtn", None, None, 8),
    ("rtn g32, embeddings 8-bit", "rtn", 32, None, 8),
    ("rtn mixed_4_6", "rtn", None, "mixed_4_6", None),
    ("rtn mixed_4_6, embeddings 8-bit", "rtn", None, "mixed_4_6", 8),
    ("rtn g32 mixed_4_6, embeddings 8-bit", "rtn", 32, "mixed_4_6", 8),
    ("awq, embeddings 8-bit", "awq", None, None, 8),
    ("gptq, embeddings 6-bit (mlx-lm)", "gptq", None, None, None),
    ("gptq, embeddings 8-bit", "gptq", None, None, 8),
    ("gptq g32, embeddings 8-bit", "gptq", 32, None, 8),
]


def suite_ppl(model, suite: dict[str, np.ndarray]) -> dict[str, float]:
    """Perplexity per text; a quantized model through its dequantized copy (the
    same function; MLX's CPU quantized matmul is far slower)."""
    if any(hasattr(m, "bits") for _, m in model.named_modules()):
        model = dequantize_model(model)
        model.set_dtype(mx.float32)
    return {k: perplexity(model, t, progress=False)["ppl"] for k, t in suite.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", type=Path, required=True)
    ap.add_argument("--sizes", default="45M,80M,125M")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "cbd-mlx" / "quant-defaults")
    ap.add_argument("--only", default=None, help="variant labels (prefixes) to run, separated by semicolons")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "export" / "quant_defaults.json")
    args = ap.parse_args()
    variants = [v for v in VARIANTS if not args.only or any(v[0].startswith(p) for p in args.only.split(";") if p)]
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for size in args.sizes.split(","):
        d = args.work / f"init-{size}"
        if not (d / "config.json").is_file():
            cbd_mlx.init(size, out=str(d), force=True)
        a = load_anchor(str(d))
        suite = read_suite(d, [args.suite])
        row = results.setdefault(size, {})
        if "fp32" not in row:
            row["fp32"] = {"ppl": suite_ppl(model_from_weights(a.config, a.weights), suite), "bits_per_weight": 32.0}
        calib = calibration_from(d, DEFAULT_CALIB, CALIB_SEQS * CALIB_SEQ_LEN, CALIB_SEQ_LEN)
        for label, method, group, recipe, embed in variants:
            if label in row:
                continue
            t0 = time.time()
            group = group or auto_group_size(a)
            try:
                model, _ = quantize_anchor(a, 4, group, method, recipe, calib if method != "rtn" else None,
                                           fallback_bits=embed)
            except CBDError as e:  # e.g. mlx-lm's GPTQ: a Hessian its Cholesky cannot invert
                row[label] = {"error": str(e)}
                print(f"{size} {label}: failed: {e}", flush=True)
                continue
            secs = time.time() - t0
            bpw = bits_per_weight(model)
            ppl = suite_ppl(model, suite)
            ratio = float(np.mean([ppl[k] / row["fp32"]["ppl"][k] for k in ppl]))
            row[label] = {"ppl": ppl, "mean_ratio_to_fp32": ratio, "bits_per_weight": bpw,
                          "group_size": group, "seconds": secs}
            print(f"{size} {label}: {ratio - 1:+.1%} at {row[label]['bits_per_weight']:.2f} bits/weight "
                  f"({secs:.0f} s)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
    sizes = list(results)
    print("\n| 4-bit recipe | bits/weight | " + " | ".join(f"{s}: suite ppl vs fp32" for s in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for label, *_ in VARIANTS:
        cells = [results[s].get(label) for s in sizes]
        cells = [c if c and "error" not in c else None for c in cells]
        if not any(cells):
            continue
        bpw = next(c["bits_per_weight"] for c in cells if c)
        print(f"| {label} | {bpw:.2f} | " + " | ".join(f"{c['mean_ratio_to_fp32'] - 1:+.1%}" if c else "—"
                                                         for c in cells) + " |")


if __name__ == "__main__":
    main()
