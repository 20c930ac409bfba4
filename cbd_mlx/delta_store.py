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

from . import delta
from .errors import CBDError
from .loader import Anchor, anchor_sha256
from .operators import Selection, subset
from .save import DELTA_FILE, cache_dir, dump_json, weights_sha256, write_model

META_KEY = "cbd_delta"


def parent_subset(parent: Anchor, lineage: dict) -> dict[str, np.ndarray]:
    """The Subset of ``parent`` a child's lineage names: the delta's base."""
    return subset(parent.family, parent.weights, parent.shape, Selection.from_json(lineage))


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
    try:
        config = json.loads((path / "config.json").read_text())
        prov = json.loads((path / "cbd.json").read_text())
        loaded, md = mx.load(str(path / DELTA_FILE), return_metadata=True)
        meta = json.loads(md[META_KEY])
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CBDError(f"{path} is not a readable delta anchor ({e}); re-download or re-pack the chain") from None
    if not isinstance(prov.get("lineage"), dict):
        raise CBDError(f"{path}/cbd.json has no lineage; a delta anchor needs its parent's Subset")
    return config, prov, {k: np.array(v) for k, v in loaded.items()}, meta


def materialize(path: Path, load_parent: Callable[[], Anchor], sha256: str | None) -> Path:
    """The full anchor of the delta folder ``path`` on its parent (the
    chain's previous anchor, loaded by ``load_parent`` only when needed):
    built once into cache_dir()/anchors/SHA and verified there against
    ``sha256`` (the manifest's), then reused."""
    root = cache_dir() / "anchors"
    if sha256:
        dest = root / sha256
        if (dest / "cbd.json").is_file():
            try:
                if weights_sha256(dest) == sha256:  # from the files (memoized by size, times, inode)
                    return dest
            except OSError:
                pass
            shutil.rmtree(dest, ignore_errors=True)  # damaged or replaced: rebuilt below
    config, prov, arrays, meta = read_delta(path)
    parent = load_parent()
    lin = prov["lineage"]
    if lin.get("parent_sha256") and lin["parent_sha256"] != anchor_sha256(parent):
        raise CBDError(f"{path} was coded on another parent than {parent.path}; the chain's files do not belong "
                       "together: re-download the chain")
    weights = delta.decode(parent_subset(parent, lin), arrays, meta)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{Path(path).name}.build-{os.getpid()}"
    write_model(tmp, config, weights, parent.path, prov, force=True)
    got = weights_sha256(tmp)  # what anchor_sha256 of the loaded copy would give, without loading it
    if sha256 and got != sha256:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CBDError(f"{path} rebuilds to weights that do not match the chain's sha256; its delta file is "
                       "damaged or was replaced: re-download the chain")
    dest = root / got
    try:
        os.rename(tmp, dest)
    except OSError:  # another process materialized it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
