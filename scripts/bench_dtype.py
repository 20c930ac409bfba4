#!/usr/bin/env python3
"""Which dtype should models be written in? One init of the embedded chain
written as float32, bfloat16 and float16 (`init --dtype`), each measured
side by side: size on disk, perplexity on the out-of-domain suite computed by
the model as `mlx_lm.load` gives it (in its stored dtype), and generation
speed on this machine in `cbd-mlx generate` (mlx-lm's generator with the fast
CPU setup), REPS times alternately. Prints a table and writes OUT (JSON).

    python scripts/bench_dtype.py --size 80M --suite ~/.cache/cbd-mlx/eval-suite
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cbd_mlx  # noqa: E402  (OpenBLAS before MLX)
import mlx_lm  # noqa: E402
import numpy as np  # noqa: E402

from cbd_mlx.evaluate import perplexity, read_suite  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
STAT = re.compile(r"(Prompt|Generation): (\d+) tokens, ([\d.]+) tokens-per-sec")


def gen_speed(model: Path, prompt: str, max_tokens: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "cbd_mlx", "generate", "--model", str(model), "--prompt", prompt,
           "--max-tokens", str(max_tokens), "--temp", "0", "--ignore-chat-template"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True)
    return {m.group(1).lower(): float(m.group(3)) for m in STAT.finditer(r.stdout + r.stderr)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="80M")
    ap.add_argument("--suite", type=Path, required=True, help="out-of-domain suite directory (`cbd-mlx data suite`)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "cbd-mlx" / "bench-dtype")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=1024, help="tokens of each suite text scored (MLX's CPU "
                    "half-precision matmuls are slow)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "export" / "dtype.json")
    args = ap.parse_args()
    dirs = {}
    for dt in DTYPES:
        d = dirs[dt] = args.work / f"init-{args.size}-{dt}"
        if not (d / "config.json").is_file():
            cbd_mlx.init(args.size, out=str(d), force=True, dtype=dt)
    suite = read_suite(dirs["float32"], [args.suite], args.eval_tokens)
    prompt = (ROOT / "tests" / "data" / "heldout.txt").read_text()[:600]
    rows = {}
    for dt, d in dirs.items():
        model, _ = mlx_lm.load(str(d))
        ppl = {k: perplexity(model, t, seq_len=256, progress=False)["ppl"] for k, t in suite.items()}
        size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        rows[dt] = {"size_mb": size / 1e6, "ppl": ppl, "runs": []}
    for _ in range(args.reps):
        for dt, d in dirs.items():
            rows[dt]["runs"].append(gen_speed(d, prompt, args.max_tokens))
    ref = rows["float32"]["ppl"]
    print(f"\n{args.size} init | size | suite ppl vs float32 | prompt tok/s | generation tok/s (this CPU)")
    print("|---|---|---|---|---|")
    for dt, r in rows.items():
        r["mean_ratio_to_fp32"] = float(np.mean([r["ppl"][k] / ref[k] for k in ref]))
        r["prompt_tok_s"] = statistics.median(x["prompt"] for x in r["runs"])
        r["generation_tok_s"] = statistics.median(x["generation"] for x in r["runs"])
        print(f"| {dt} | {r['size_mb']:.1f} MB | {r['mean_ratio_to_fp32'] - 1:+.2%} | {r['prompt_tok_s']:.0f} | "
              f"{r['generation_tok_s']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": args.size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
