"""Delta-stored chain anchors on disk: writing one (``chain pack --delta-bits``)
and materializing it on first use into the content-keyed cache, where it is
checked by the sha256 of its full weights and from then on is an ordinary
mlx-lm directory.

A delta anchor's folder holds config.json, cbd.json (its lineage in its
parent) and ``delta.safetensors``: ``delta.encode`` of its weights against
the Subset of its parent, the parent being the chain's previous anchor as
materialized (so errors do not add up along the chain)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from .arch.anchor import Anchor
from .errors import CBDError
from .loader import anchor_sha256, check_safetensors, read_provenance
from .method import delta
from .method.operators import Selection, subset
from .save import DELTA_FILE, cache_dir, cache_entry, dump_json, read_json, weights_sha256, write_model

META_KEY = "cbd_delta"


def parent_subset(parent: Anchor, lineage: dict) -> dict[str, np.ndarray]:
    """The Subset of ``parent`` a child's lineage names: the delta's base."""
    return subset(parent.family, parent.weights, parent.shape, Selection.from_json(lineage, parent.shape))


def write_delta_dir(dest: Path, config: dict, provenance: dict, arrays: dict, meta: dict) -> None:
    """A delta anchor's folder (inside a pack's temporary tree)."""
    dest.mkdir(parents=True)
    cfg = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    (dest / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=4))
    (dest / "cbd.json").write_text(dump_json(provenance))
    mx.save_safetensors(str(dest / DELTA_FILE), {k: mx.array(v) for k, v in arrays.items()},
                        metadata={META_KEY: json.dumps(meta)})


def read_delta(path: Path) -> tuple[dict, dict, dict, dict]:
    """(config, provenance, arrays, meta) of a delta anchor's folder."""
    path = Path(path)
    config = read_json(path / "config.json", "delta anchor's config.json")
    prov = read_provenance(path)
    check_safetensors(path / DELTA_FILE)  # its header and offsets, before MLX reads it
    try:
        loaded, md = mx.load(str(path / DELTA_FILE), return_metadata=True)
        meta = json.loads(md[META_KEY])
        if not isinstance(meta, dict):
            raise ValueError("its record is not an object")
    except (OSError, ValueError, KeyError, RuntimeError, RecursionError) as e:
        raise CBDError(f"{path} is not a readable delta anchor ({e}); re-download or re-pack the chain") from None
    if not isinstance(prov.get("lineage"), dict):
        raise CBDError(f"{path}/cbd.json has no lineage; a delta anchor needs its parent's Subset")
    return config, prov, {k: np.array(v) for k, v in loaded.items()}, meta


def materialize(path: Path, load_parent: Callable[[], Anchor], sha256: str | None) -> Path:
    """The full anchor of the delta folder ``path`` on its parent (the
    chain's previous anchor, loaded by ``load_parent`` only when needed):
    built once into cache_dir()/anchors/SHA (``save.cache_entry``: its files
    checked against the digest written with them, its weights against
    ``sha256``, the manifest's, on every use), then reused."""
    root = cache_dir() / "anchors"

    def build(dest: Path) -> None:
        config, prov, arrays, meta = read_delta(path)
        parent = load_parent()
        lin = prov["lineage"]
        if lin.get("parent_sha256") and lin["parent_sha256"] != anchor_sha256(parent):
            raise CBDError(f"{path} was coded on another parent than {parent.path}; the chain's files do not belong "
                           "together: re-download the chain")
        weights = delta.decode(parent_subset(parent, lin), arrays, meta)
        write_model(dest, config, weights, parent.path, prov, force=True)
        if sha256 and weights_sha256(dest) != sha256:  # what anchor_sha256 of the loaded copy gives, unloaded
            raise CBDError(f"{path} rebuilds to weights that do not match the chain's sha256; its delta file is "
                           "damaged or was replaced: re-download the chain")

    if sha256:
        return cache_entry(root / sha256, build, check=lambda d: weights_sha256(d) == sha256)
    # unpinned (a chain being packed): built first, then kept under the hash of what it holds
    tmp = root / f".{Path(path).name}.build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    build(tmp)
    got = weights_sha256(tmp)
    try:
        return cache_entry(root / got, lambda dest: os.rename(tmp, dest), check=lambda d: weights_sha256(d) == got)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
