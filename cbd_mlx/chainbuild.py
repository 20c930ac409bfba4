"""`chain build`: prune + distill each anchor from the previous one and write
the chain's manifest (the expensive, once-per-chain part of CBD)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .chain import MANIFEST_NAME, Chain, ChainAnchor, dump_chain
from .data import open_cache
from .distill import distill
from .errors import CBDError
from .importance import CALIB_SEQ_LEN, CALIB_TOKENS, calibration_batches
from .models import Anchor, anchor_sha256, load_anchor, write_model
from .prune import child_shape, prune
from .shapes import config_for, format_size
from .train import TrainConfig


def cache_calibration(cache: Path, tokens: int = CALIB_TOKENS, seq_len: int = CALIB_SEQ_LEN) -> np.ndarray:
    """Calibration batches from the start of a cache's training split."""
    _, splits = open_cache(cache)
    if len(splits["train"]) < seq_len:
        raise CBDError("the token cache is too small for calibration")
    return calibration_batches(np.asarray(splits["train"][:tokens]), seq_len, tokens)


def _entry(name: str, a: Anchor, parent: str | None) -> ChainAnchor:
    return ChainAnchor(name, f"anchors/{name}", a.n_params, a.shape, None, anchor_sha256(a), parent, True)


def build_chain(source: str, sizes: list[int], cache: Path, out: Path, cfg: TrainConfig,
                name: str | None = None, log=print) -> Chain:
    """Build (or resume building) a chain under ``out``; returns its manifest."""
    out.mkdir(parents=True, exist_ok=True)
    anchors_dir = out / "anchors"
    src = load_anchor(source)
    if sorted(sizes, reverse=True) != sizes or sizes[0] >= src.n_params:
        raise CBDError("--sizes must be decreasing and below the source's size")
    a0_name = f"a0-{format_size(src.n_params)}"
    a0_dir = anchors_dir / a0_name
    if not (a0_dir / "cbd.json").exists():
        log(f"[chain] copying the source into {a0_dir}")
        write_model(a0_dir, src.config, src.weights, src.path, {"kind": "source", "source": source}, force=True)
    prev, prev_name = load_anchor(str(a0_dir)), a0_name
    entries = [_entry(a0_name, prev, None)]
    batches = cache_calibration(cache)
    for i, n in enumerate(sizes, start=1):
        name_i = f"a{i}-{format_size(n)}"
        final = anchors_dir / name_i
        if not (final / "cbd.json").exists():
            pruned = anchors_dir / f".{name_i}.pruned"
            if not (pruned / "cbd.json").exists():
                shape = child_shape(prev, n)
                log(f"[chain] {name_i}: prune {prev_name} -> {shape}")
                w, lineage = prune(prev, shape, batches)
                prov = {"kind": "pruned", "lineage": lineage, "parent": prev_name}
                write_model(pruned, config_for(prev.family, prev.config, shape), w, prev.path, prov, force=True)
            log(f"[chain] {name_i}: distill from {prev_name} on {cfg.tokens:,} tokens")
            distill(str(anchors_dir / prev_name), str(pruned), cache, final, cfg, force=True, log=log)
            shutil.rmtree(pruned, ignore_errors=True)
        cur = load_anchor(str(final))
        entries.append(_entry(name_i, cur, prev_name))
        prev, prev_name = cur, name_i
    meta = json.loads((Path(cache) / "meta.json").read_text())
    chain = Chain(name or out.name, src.family.name, meta.get("tokenizer", source), out / MANIFEST_NAME, entries,
                  f"built by cbd-mlx chain build from {source}")
    (out / MANIFEST_NAME).write_text(dump_chain(chain))
    return chain
