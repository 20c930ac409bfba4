"""A top-k teacher cache: each position's top-k teacher log-probabilities,
written the first time train() reads a batch and read back on every later
visit (a resumed run, a second epoch, a rerun with another student or lr), so
the teacher's forward pass is paid once per token."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import CBDError

META = "teacher_cache.json"
FILES = ("topk_idx.npy", "topk_logprob.npy", "filled.npy")


def _fingerprint_mismatch(have: dict, want: dict) -> str | None:
    for key, hint in (("teacher_sha256", "another teacher"), ("data", "another token cache"),
                      ("batch_size", "another --batch-size"), ("seq_len", "another --seq-len"),
                      ("seed", "another --seed"), ("k", "another --cache-k")):
        if have.get(key) != want.get(key):
            return hint
    return None


class TeacherCache:
    """Top-k log-probs for batches 0..n_batches-1 of one run's batch order,
    filled lazily from ``teacher`` (None: every batch must already be cached)."""

    def __init__(self, path: Path, teacher, *, k: int, batch_size: int, seq_len: int, seed: int,
                 n_batches: int, vocab: int, teacher_sha256: str, data: str):
        self.path, self.teacher, self.k = Path(path), teacher, k
        want = {"k": k, "batch_size": batch_size, "seq_len": seq_len, "seed": seed, "vocab": vocab,
                "teacher_sha256": teacher_sha256, "data": data}
        meta_file = self.path / META
        if meta_file.is_file():
            try:
                self.meta = json.loads(meta_file.read_text())
                arrays = [np.load(self.path / f, mmap_mode="r+") for f in FILES]
            except (OSError, ValueError) as e:
                raise CBDError(f"teacher cache {self.path} is damaged ({e}); delete it to rebuild") from None
            why = _fingerprint_mismatch(self.meta, want)
            if why:
                raise CBDError(f"the teacher cache {self.path} was made for {why}; delete it or give another "
                               "--teacher-cache")
            if self.meta["batches"] < n_batches:
                arrays = self._grow(arrays, n_batches)
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise CBDError(f"{self.path} exists and is not a teacher cache; give an empty or new directory")
            self.path.mkdir(parents=True, exist_ok=True)
            idx_dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
            shape = (n_batches, batch_size, seq_len, k)
            arrays = [
                np.lib.format.open_memmap(self.path / FILES[0], "w+", idx_dtype, shape),
                np.lib.format.open_memmap(self.path / FILES[1], "w+", np.float16, shape),
                np.lib.format.open_memmap(self.path / FILES[2], "w+", np.bool_, (n_batches,)),
            ]
            self.meta = {**want, "batches": n_batches}
            self._write_meta()
        self.idx, self.logp, self.filled = arrays

    def _write_meta(self) -> None:
        tmp = self.path / (META + ".tmp")
        tmp.write_text(json.dumps(self.meta))
        os.replace(tmp, self.path / META)

    def _grow(self, arrays, n_batches: int):
        """Room for more batches (a longer run than the one that made the cache)."""
        old = self.meta["batches"]
        grown = []
        for f, a in zip(FILES, arrays):
            new = np.lib.format.open_memmap(self.path / (f + ".tmp"), "w+", a.dtype, (n_batches, *a.shape[1:]))
            new[:old] = a
            new.flush()
            del new
            os.replace(self.path / (f + ".tmp"), self.path / f)
            grown.append(np.load(self.path / f, mmap_mode="r+"))
        self.meta["batches"] = n_batches
        self._write_meta()
        return grown

    @property
    def n_filled(self) -> int:
        return int(np.count_nonzero(self.filled))

    def topk(self, index: int, x: mx.array) -> tuple[mx.array, mx.array]:
        """(indices int32, log-probs float32), each (batch, seq_len, k), of
        batch ``index`` whose inputs are ``x``."""
        if not self.filled[index]:
            if self.teacher is None:
                raise CBDError(f"the teacher cache {self.path} lacks batch {index}; give --teacher to fill it")
            logits = self.teacher(x).astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            top = mx.argpartition(-logp, self.k - 1, axis=-1)[..., : self.k]
            vals = mx.take_along_axis(logp, top, axis=-1)
            self.idx[index] = np.array(top).astype(self.idx.dtype)
            self.logp[index] = np.array(vals).astype(np.float16)
            self.filled[index] = True
        return (mx.array(np.asarray(self.idx[index], dtype=np.int32)),
                mx.array(np.asarray(self.logp[index], dtype=np.float32)))

    def flush(self) -> None:
        for a in (self.idx, self.logp, self.filled):
            a.flush()


def dense_logprobs(idx: mx.array, logp: mx.array, vocab: int) -> mx.array:
    """Full-vocabulary teacher log-probs from top-k: the k entries as stored,
    the remaining mass spread evenly over the rest of the vocabulary."""
    k = logp.shape[-1]
    rest = mx.maximum(1.0 - mx.exp(logp).sum(-1, keepdims=True), 1e-6)
    fill = mx.log(rest / max(vocab - k, 1))
    full = mx.broadcast_to(fill, (*logp.shape[:-1], vocab))
    return mx.put_along_axis(full, idx, logp, axis=-1)
