#!/usr/bin/env python3
"""Bits per weight against perplexity for a chain's anchors (issue 25):
each distilled anchor of a full-precision chain (`chain build`, or
scripts/densify_chain.py's WORK/chain) scored on the out-of-domain suite in
fp32, quantized directly (mlx affine, 5-bit, groups of 64), and stored as a
2/3/4-bit delta against the Subset of its parent (as `chain pack
--delta-bits` codes it: each parent as rebuilt from its own delta). Writes
OUT (JSON) and prints a table.

    python scripts/delta_storage.py --chain ~/.cache/cbd-mlx/densify/chain --suite SUITE
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cbd_mlx  # noqa: E402,F401  (OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from cbd_mlx.method import delta  # noqa: E402
from cbd_mlx.chain import find_chain, load_chain_anchor  # noqa: E402
from cbd_mlx.delta_store import parent_subset  # noqa: E402
from cbd_mlx.evaluate import perplexity, tokenize_file  # noqa: E402
from cbd_mlx.arch.anchor import model_from_weights  # noqa: E402
from cbd_mlx.loader import load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chain", required=True)
    ap.add_argument("--suite", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "smollm2-mini" / "delta_storage.json")
    args = ap.parse_args()
    chain = find_chain(args.chain)
    anchors = {e.name: load_chain_anchor(chain, e) for e in chain.anchors}
    tok = load_tokenizer(anchors[chain.anchors[0].name].path)
    texts = {p.stem: np.array(tokenize_file(tok, p, args.max_tokens), dtype=np.int32)
             for p in sorted(args.suite.glob("*.txt")) if p.name != "README.txt"}

    def score(config, weights, quant_bits=None) -> dict:
        if quant_bits:  # mlx's affine quantization, scored through its dequantized copy (same function,
            # ~20x faster than MLX's CPU quantized matmul); the embedding as the layers
            weights = {k: (np.array(mx.dequantize(*mx.quantize(mx.array(v), group_size=64, bits=quant_bits),
                                                  group_size=64, bits=quant_bits))
                           if v.ndim == 2 and v.shape[-1] % 64 == 0 else v) for k, v in weights.items()}
        m = model_from_weights(config, weights)
        return {k: perplexity(m, t, progress=False)["ppl"] for k, t in texts.items()}

    rows = {}
    recon = {b: {chain.anchors[0].name: anchors[chain.anchors[0].name].weights} for b in args.bits.split(",")}
    for e in chain.anchors[1:]:
        a, p = anchors[e.name], anchors[e.parent]
        fp = score(a.config, a.weights)
        row = {"params": a.n_params, "fp32": {"bits_per_weight": 32.0, "ppl": fp},
               "direct-5bit": {"bits_per_weight": 5.5, "ppl": score(a.config, a.weights, 5)}}
        for b in recon:
            base = parent_subset(replace(p, weights=recon[b][e.parent]), a.lineage)
            arrays, meta = delta.encode(a.weights, base, int(b), 64)
            w = delta.decode(base, arrays, meta)
            recon[b][e.name] = w
            row[f"delta-{b}bit"] = {"bits_per_weight": delta.bits_per_weight(arrays, meta), "ppl": score(a.config, w),
                                    "bytes": int(sum(x.nbytes for x in arrays.values()))}
        for v in row.values():
            if isinstance(v, dict):
                v["ratio_to_fp32"] = float(np.mean([v["ppl"][k] / fp[k] for k in texts]))
        rows[e.name] = row
        print(e.name, {k: round(v["ratio_to_fp32"], 4) for k, v in row.items() if isinstance(v, dict)}, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"chain": chain.name, "texts": list(texts), "rows": rows}, indent=1))
    kinds = [k for k in next(iter(rows.values())) if k != "params"]
    print("\n| anchor | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]['bits_per_weight']:.2f} b/w: {row[k]['ratio_to_fp32']:.3f}x"
                                          for k in kinds) + " |")


if __name__ == "__main__":
    main()
