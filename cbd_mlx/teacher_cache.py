"""A top-k teacher cache: run the teacher once over the batches a run will
read, keep each position's top-k log-probabilities on disk, and distill from
them (the teacher is then not needed in memory or time)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .data import PackedSequences
from .errors import CBDError
from .models import atomic_dir

META = "teacher_cache.json"


def build_cache(teacher, data: PackedSequences, batch_size: int, n_batches: int, k: int, out: Path,
                teacher_sha256: str, force: bool = False) -> Path:
    """Write indices (uint32) and log-probs (float16) of the teacher's top-k
    for batches 0..n_batches-1 of ``data`` (the order train() reads them)."""
    L = data.seq_len
    with atomic_dir(out, force) as tmp:
        idx = np.lib.format.open_memmap(tmp / "topk_idx.npy", "w+", np.uint32, (n_batches, batch_size, L, k))
        lp = np.lib.format.open_memmap(tmp / "topk_logprob.npy", "w+", np.float16, (n_batches, batch_size, L, k))
        for b in tqdm(range(n_batches), desc="teacher cache", unit="batch"):
            x = mx.array(data.batch(b, batch_size))[:, :-1]
            logits = teacher(x).astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            top = mx.argpartition(-logp, k - 1, axis=-1)[..., :k]
            vals = mx.take_along_axis(logp, top, axis=-1)
            idx[b], lp[b] = np.array(top, dtype=np.uint32), np.array(vals, dtype=np.float16)
        idx.flush()
        lp.flush()
        (tmp / META).write_text(json.dumps({
            "k": k, "batches": n_batches, "batch_size": batch_size, "seq_len": L, "seed": data.seed,
            "vocab": int(logits.shape[-1]), "teacher_sha256": teacher_sha256,
        }))
    return out


class TeacherCache:
    """Reads a cache back as full-vocabulary teacher log-probabilities: the
    top-k entries as stored, the remaining mass spread evenly over the rest."""

    def __init__(self, path: Path):
        path = Path(path)
        if not (path / META).is_file():
            raise CBDError(f"{path} is not a teacher cache (no {META})")
        self.meta = json.loads((path / META).read_text())
        self.idx = np.load(path / "topk_idx.npy", mmap_mode="r")
        self.logp = np.load(path / "topk_logprob.npy", mmap_mode="r")

    def check(self, batch_size: int, seq_len: int, seed: int, batches: int, teacher_sha256: str | None) -> None:
        m = self.meta
        if (m["batch_size"], m["seq_len"], m["seed"]) != (batch_size, seq_len, seed):
            raise CBDError("the teacher cache was made for another --batch-size/--seq-len/--seed; rebuild it")
        if m["batches"] < batches:
            raise CBDError(f"the teacher cache holds {m['batches']} batches, the run needs {batches}; rebuild it")
        if teacher_sha256 and m["teacher_sha256"] != teacher_sha256:
            raise CBDError("the teacher cache was made by another teacher; rebuild it")

    def logits(self, index: int) -> mx.array:
        idx = mx.array(np.asarray(self.idx[index], dtype=np.int32))
        lp = mx.array(np.asarray(self.logp[index], dtype=np.float32))
        k, vocab = lp.shape[-1], self.meta["vocab"]
        rest = mx.maximum(1.0 - mx.exp(lp).sum(-1, keepdims=True), 1e-6)
        fill = mx.log(rest / max(vocab - k, 1))
        full = mx.broadcast_to(fill, (*lp.shape[:-1], vocab))
        return mx.put_along_axis(full, idx, lp, axis=-1)
