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

from . import cpu_head
from .errors import CBDError
from .losses import HeadOut, TopK, fast_cpu, head_out, numpy_ready

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
        self.path, self.teacher, self.k, self.vocab = Path(path), teacher, k, vocab
        want = {"k": k, "batch_size": batch_size, "seq_len": seq_len, "seed": seed, "vocab": vocab,
                "teacher_sha256": teacher_sha256, "data": data}
        meta_file = self.path / META
        if meta_file.is_file():
            try:
                for f in (META, *FILES):
                    if (self.path / f).exists() and not (self.path / f).is_file():
                        raise ValueError(f"{f} is not a regular file")
                self.meta = json.loads(meta_file.read_text())
                # read-only first: mode r+ would silently extend a truncated file with zeros
                arrays = [np.load(self.path / f, mmap_mode="r") for f in FILES]
                m = self.meta if isinstance(self.meta, dict) else {}
                shape = (m.get("batches"), m.get("batch_size"), m.get("seq_len"), m.get("k"))
                if (not all(isinstance(v, int) for v in shape) or arrays[0].shape != shape
                        or arrays[1].shape != arrays[0].shape or arrays[2].shape != shape[:1]):
                    raise ValueError("its arrays do not have the shapes its record gives")
                arrays = [np.load(self.path / f, mmap_mode="r+") for f in FILES]
            except (OSError, ValueError, KeyError, RecursionError) as e:
                why = "nested too deeply" if isinstance(e, RecursionError) else e
                raise CBDError(f"teacher cache {self.path} is damaged ({why}); delete it to rebuild") from None
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

    def topk(self, index: int, x: mx.array) -> TopK:
        """(indices int32, log-probs float32), each (batch, seq_len, k), of
        batch ``index`` whose inputs are ``x``."""
        if not self.filled[index]:
            if self.teacher is None:
                raise CBDError(f"the teacher cache {self.path} lacks batch {index}; give --teacher to fill it")
            top, vals = teacher_topk(self.teacher, x, self.k)
            self.idx[index] = top.reshape(self.idx.shape[1:]).astype(self.idx.dtype)
            self.logp[index] = vals.reshape(self.logp.shape[1:]).astype(np.float16)
            self.filled[index] = True
        idx = np.asarray(self.idx[index], dtype=np.int32)
        logp = np.asarray(self.logp[index], dtype=np.float32)
        # what a file says is checked before any kernel indexes with it (an index past the vocabulary
        # reads out of bounds; positive or NaN log-probs would train on nonsense)
        if idx.size and (idx.min() < 0 or idx.max() >= self.vocab):
            raise CBDError(f"the teacher cache {self.path} holds token ids outside the vocabulary "
                           f"({self.vocab}) at batch {index}; it is damaged: delete it to rebuild")
        if not np.all(logp <= 1e-3):  # also False for NaN
            raise CBDError(f"the teacher cache {self.path} holds invalid log-probabilities (positive or NaN) at "
                           f"batch {index}; it is damaged: delete it to rebuild")
        return TopK(mx.array(idx), mx.array(logp))

    def flush(self) -> None:
        for a in (self.idx, self.logp, self.filled):
            a.flush()


def teacher_topk(teacher, x: mx.array, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-``k`` log-probs (indices, values) at each position of
    ``x``, as (batch * seq, k) arrays; the vocabulary passes in numpy on the CPU."""
    out = head_out(teacher, x)
    if fast_cpu() and numpy_ready(out):
        h = np.asarray(out.h)
        return cpu_head.topk_logprobs(h.reshape(-1, h.shape[-1]), np.asarray(out.w), k)
    logits = (out.logits() if isinstance(out, HeadOut) else out).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    top = mx.argpartition(-logp, k - 1, axis=-1)[..., :k]
    vals = mx.take_along_axis(logp, top, axis=-1)
    return np.array(top).reshape(-1, k), np.array(vals).reshape(-1, k)
