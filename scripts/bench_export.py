#!/usr/bin/env python3
"""Export figures for one model: size on disk, bits per weight, held-out
perplexity and mlx-lm generation tokens/s for fp32, 8-bit, 4-bit RTN and 4-bit
with learned methods (AWQ, GPTQ), plus the export wall time; then every GGUF
type `export --gguf` writes, scored by llama.cpp itself on the same tokens.
Prints markdown tables and writes OUT/export.json.

    python scripts/bench_export.py MODEL --heldout tests/data/heldout.txt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cbd_mlx  # noqa: E402,F401  (OpenBLAS before MLX)

VARIANTS = [  # (label, export args or None for the model as it is)
    ("fp32", None),
    ("8-bit rtn", ["--bits", "8"]),
    ("4-bit rtn (default: mixed_4_6, 8-bit embeddings)", ["--bits", "4"]),
    ("4-bit rtn uniform", ["--bits", "4", "--recipe", "uniform", "--embed-bits", "4"]),
]
LEARNED = ("awq", "gptq")


def gen_speed(model_dir: Path, tokens: int) -> float:
    """mlx-lm generation tokens/s (greedy, fixed prompt)."""
    from mlx_lm import load, stream_generate

    model, tok = load(str(model_dir))
    last = None
    for last in stream_generate(model, tok, "The history of the Python language", max_tokens=tokens):
        pass
    return float(last.generation_tps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--heldout", type=Path, default=ROOT / "tests" / "data" / "heldout.txt")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--group-size", default="64")
    ap.add_argument("--learned", default="gptq", help="learned 4-bit methods to include (awq is slow on CPU)")
    ap.add_argument("--gguf", default="f16,q8_0,q5_0,q4_1,q4_0", help="GGUF types to score in llama.cpp ('' : none)")
    ap.add_argument("--out", type=Path, default=Path("export-bench"))
    args = ap.parse_args()
    variants = VARIANTS + [(f"4-bit {m}", ["--bits", "4", "--method", m]) for m in args.learned.split(",")
                           if m in LEARNED]
    from cbd_mlx.evaluate import perplexity, tokenize_file
    from cbd_mlx.arch.anchor import model_from_weights
    from cbd_mlx.loader import load_anchor, load_tokenizer, resolve

    args.out.mkdir(parents=True, exist_ok=True)
    src = load_anchor(args.model)
    ids = tokenize_file(load_tokenizer(src.path), args.heldout, args.eval_tokens)
    rows = []
    for label, extra in variants:
        if extra is None:
            d = resolve(args.model)
            ppl = perplexity(model_from_weights(src.config, src.weights), ids, 512, 4, progress=False)["ppl"]
            row = {"variant": label, "bits_per_weight": 32.0, "ppl": ppl, "export_s": 0.0,
                   "size_mb": sum(f.stat().st_size for f in d.glob("*.safetensors")) / 1e6}
        else:
            d = args.out / label.split(" (")[0].replace(" ", "-")
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "cbd_mlx.cli", "export", args.model, "--out", str(d),
                                "--group-size", args.group_size, "--force", *extra], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(r.stderr[-2000:])
            secs = time.time() - t0
            q = load_anchor(str(d))  # dequantized: the same function, scored with fp32 matmuls
            ppl = perplexity(model_from_weights(q.config, q.weights), ids, 512, 4, progress=False)["ppl"]
            cfg = json.loads((d / "cbd.json").read_text())["history"][-1]
            row = {"variant": label, "bits_per_weight": cfg["bits_per_weight"], "ppl": ppl, "export_s": secs,
                   "size_mb": sum(f.stat().st_size for f in d.glob("*.safetensors")) / 1e6}
        row["gen_tok_s"] = gen_speed(d, args.gen_tokens)
        rows.append(row)
        print(json.dumps(row), flush=True)
    from cbd_mlx.gguf import llama_cpp_perplexity

    grows = []
    for t in [t for t in args.gguf.split(",") if t]:
        d = args.out / f"gguf-{t}"
        r = subprocess.run([sys.executable, "-m", "cbd_mlx.cli", "export", args.model, "--out", str(d), "--bits", "8",
                            "--group-size", args.group_size, "--gguf", t, "--force"], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr[-2000:])
        g = next(d.glob("*.gguf"))
        lc = llama_cpp_perplexity(g, ids, 512)
        grows.append({"gguf": t, "size_mb": g.stat().st_size / 1e6, "bits_per_weight": g.stat().st_size * 8 / src.n_params,
                      "llama_cpp_ppl": lc["ppl"],
                      "llama_cpp_prompt_tok_s": lc["tokens_per_s"]})
        print(json.dumps(grows[-1]), flush=True)
    (args.out / "export.json").write_text(json.dumps({"mlx": rows, "gguf": grows}, indent=2))
    base = rows[0]["ppl"]
    print(f"\n| variant | size | bits/weight | held-out ppl ({len(ids):,} tokens) | vs fp32 | generation tok/s | export |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['size_mb']:.1f} MB | {r['bits_per_weight']:.2f} | {r['ppl']:.2f} | "
              f"{(r['ppl'] - base) / base:+.1%} | {r['gen_tok_s']:.1f} | {r['export_s']:.1f} s |")
    if grows:
        print("\n| GGUF | size | bits/weight | llama.cpp ppl | ours (fp32) | vs ours | llama.cpp prompt tok/s |")
        print("|---|---|---|---|---|---|---|")
        for g in grows:
            print(f"| {g['gguf']} | {g['size_mb']:.1f} MB | {g['bits_per_weight']:.2f} | {g['llama_cpp_ppl']:.2f} | {base:.2f} | "
                  f"{g['llama_cpp_ppl'] / base - 1:+.1%} | {g['llama_cpp_prompt_tok_s']:.0f} |")


if __name__ == "__main__":
    main()
