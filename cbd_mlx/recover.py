"""`recover`: short full-parameter training of an init (embeddings and norms
included), optionally with KD from the nearest larger anchor of its chain."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from .chain import find_chain
from .data import tokenize_into
from .distill import distill
from .errors import CBDError
from .loader import cache_dir, read_provenance, resolve, tokenizer_fingerprint
from .save import cache_entry, refuse_existing
from .train import TrainConfig

# recover's learning rate by the model's size, chosen by measurement (scripts/recover_defaults.py, README
# "Recovery"): 16,384 tokens of a novel the chain never saw, scored on the rest of it. Best: 1e-4 at 45M
# (-26% ppl) and 80M (-22%), 3e-5 at 138M (-17%, where 1e-4 gave -7%); 3e-4, the earlier default, -4% to -14%.
RECOVER_LR = ((80e6, 1e-4), (135e6, 3e-5))  # (params, lr): log-linear between, constant outside


def recover_lr(n_params: int) -> float:
    """recover's default learning rate for a model of ``n_params`` parameters."""
    (n0, lr0), (n1, lr1) = RECOVER_LR
    t = min(1.0, max(0.0, (math.log(n_params) - math.log(n0)) / (math.log(n1) - math.log(n0))))
    return float(math.exp(math.log(lr0) + t * (math.log(lr1) - math.log(lr0))))


def data_cache(data: list[Path], model: str, log=print) -> Path:
    """A token cache: ``data`` itself when it is one, else the text files
    tokenized once with ``model``'s tokenizer into the user cache."""
    if len(data) == 1 and (Path(data[0]) / "meta.json").is_file():
        return Path(data[0])
    for p in data:
        if not Path(p).exists():
            raise CBDError(f"--data {p} does not exist; give a token cache or text/jsonl files")

    key = hashlib.sha256("|".join(
        [tokenizer_fingerprint(resolve(model))]
        + [f"{Path(p).resolve()}:{Path(p).stat().st_size}:{Path(p).stat().st_mtime_ns}" for p in data]
    ).encode()).hexdigest()[:16]
    out = cache_dir() / "data" / key

    def build(dest: Path) -> None:
        log(f"tokenizing {len(data)} input(s) into {out}")
        tokenize_into(dest, [Path(p) for p in data], model, heldout_fraction=0.1)

    return cache_entry(out, build)  # checked against its own digest; shared with a concurrent run


def kd_teacher(model: str, kd_from: str | None) -> str | None:
    """The teacher for --kd-from: a model, or 'auto' = the bigger anchor the
    init was blended from (recorded in its cbd.json)."""
    if kd_from != "auto":
        return kd_from
    prov = read_provenance(resolve(model))  # the record only: the weights are not needed here
    anchors = prov.get("anchors") or {}
    big = anchors.get("big") or anchors.get("edge")
    chain = prov.get("chain") or {}
    if chain.get("manifest") and chain.get("anchors"):

        c = find_chain(chain["manifest"])
        entry = next((e for e in c.anchors if e.name == chain["anchors"][0]), None)
        if entry is not None:
            return c.source_of(entry)
    if big and big.get("source"):
        return big["source"]
    raise CBDError(f"{model} records no anchors in its cbd.json; pass --kd-from MODEL instead of auto")


def recover(model: str, data: list[Path], out: Path, cfg: TrainConfig, kd_from: str | None = None,
            force: bool = False, log=print) -> dict:
    """Train every parameter of ``model`` on ``data`` (CE, plus KD when a
    teacher is given) and write it to ``out``; returns the training record."""
    out = Path(out)
    refuse_existing(out, force)
    teacher = kd_teacher(model, kd_from)
    if teacher:
        log(f"KD from {teacher}")
    cache = data_cache(data, model, log)
    return distill(teacher, model, cache, out, cfg, force, log=log)
