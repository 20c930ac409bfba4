#!/usr/bin/env python3
"""A chain made of two working copies of one chain: the polished one
(`densify_chain.py`'s WORK/chain), with the anchors named by --keep taken
back from the other (the chain before that round, unpacked to fp32), for
anchors whose polish did worse on the out-of-domain suite
(`chainbuild.take_back_anchors`); then `chain pack OUT` ships it.

    python scripts/mix_chain.py --polished WORK/chain --before WORK/orig --keep a1-101M --out WORK/mixed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cbd_mlx  # noqa: E402,F401  (OpenBLAS before MLX)
from cbd_mlx.chain import MANIFEST_NAME, find_chain  # noqa: E402
from cbd_mlx.chainbuild import take_back_anchors, unpack_chain  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--polished", type=Path, required=True, help="the polished working chain")
    ap.add_argument("--before", type=Path, required=True,
                    help="the chain before the round, unpacked (made from --chain when it does not exist)")
    ap.add_argument("--chain", default="smollm2-mini", help="the shipped chain to unpack into --before")
    ap.add_argument("--keep", action="append", default=[], help="an anchor to take from --before (repeatable)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not (args.before / MANIFEST_NAME).exists():
        unpack_chain(find_chain(args.chain), args.before, force=True)
    take_back_anchors(args.polished, args.before, args.keep, args.out)
    print(f"wrote {args.out}  (next: cbd-mlx chain pack {args.out} --out DIR --delta-bits auto --eval-data SUITE)")


if __name__ == "__main__":
    main()
