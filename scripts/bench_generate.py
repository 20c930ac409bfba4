#!/usr/bin/env python3
"""Generation speed on this machine, side by side: `mlx_lm.generate` as
installed vs `cbd-mlx generate` (the same mlx-lm command started with the fast
CPU setup: OpenBLAS on Linux). Runs each REPS times alternately on the same
prompt and prints the median prompt and generation tokens/s.

    python scripts/bench_generate.py MODEL --prompt-file tests/data/heldout.txt
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAT = re.compile(r"(Prompt|Generation): (\d+) tokens, ([\d.]+) tokens-per-sec")


def run(cmd: list[str]) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    return {m.group(1).lower(): float(m.group(3)) for m in STAT.finditer(r.stdout + r.stderr)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompt-file", type=Path, default=ROOT / "tests" / "data" / "heldout.txt")
    ap.add_argument("--prompt-chars", type=int, default=2500)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    prompt = args.prompt_file.read_text()[: args.prompt_chars]
    common = ["--model", args.model, "--prompt", prompt, "--max-tokens", str(args.max_tokens), "--temp", "0"]
    cmds = {"mlx_lm.generate": [sys.executable, "-m", "mlx_lm.generate", *common],
            "cbd-mlx generate": [sys.executable, "-m", "cbd_mlx", "generate", *common]}
    res = {k: [] for k in cmds}
    for _ in range(args.reps):
        for k, c in cmds.items():
            res[k].append(run(c))
    print("| command | prompt tokens/s | generation tokens/s |")
    print("|---|---|---|")
    for k, rs in res.items():
        print(f"| `{k}` | {statistics.median(r['prompt'] for r in rs):.0f} | "
              f"{statistics.median(r['generation'] for r in rs):.1f} |")


if __name__ == "__main__":
    main()
