"""`convert`: any anchor (GGUF file, packaged model, hub repo, model
directory, or a delta-stored anchor of a packed chain) as an mlx-lm model
directory."""

from __future__ import annotations

from pathlib import Path

from .chain import materialized
from .loader import is_delta_dir, load_anchor, read_provenance
from .save import write_model


def convert(source: str, out: Path, force: bool = False, dtype: str = "float32") -> Path:
    """Write ``source`` as an mlx-lm model directory; returns ``out``. A
    delta-stored chain anchor is rebuilt on its chain first (checked by the
    chain's sha256)."""
    src = str(materialized(Path(source))) if is_delta_dir(Path(source)) else source
    a = load_anchor(src)
    prov = read_provenance(a.path) or {}
    prov = {**prov, "source": source, "shape": a.shape.as_dict()} if prov else {"source": source,
                                                                                "shape": a.shape.as_dict()}
    return write_model(Path(out), a.config, a.weights, a.path, prov, force, dtype)
