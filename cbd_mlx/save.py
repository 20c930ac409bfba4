"""Models out: the one writer. Every output (model directories, caches,
checkpoints, packages) is built in a temp directory beside its destination and
moved into place at the end, so a crash or a bad input never leaves a
half-written output where a good one is expected."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .errors import CBDError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


LOW_SPACE = 1 << 20  # free bytes below which a failed write is reported as a full disk


MEMO_MIN_BYTES = 1 << 20  # files this big have their sha256 remembered
MEMO_FILE = "sha256-memo.json"


DELTA_FILE = "delta.safetensors"  # the weights file of a delta-stored chain anchor (delta_store)


def cache_dir() -> Path:
    """The user cache (converted GGUF files, token caches, hashes): CBD_MLX_CACHE or ~/.cache/cbd-mlx."""
    return Path(os.environ.get("CBD_MLX_CACHE") or Path.home() / ".cache" / "cbd-mlx")


def _stamp(st: os.stat_result) -> list[int]:
    # ctime cannot be set back by a user: any write or metadata change shows
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, always computed from them; for big files
    remembered in the user cache by (size, mtime, ctime, inode, device) and
    recomputed whenever any of them changes."""
    path = Path(path)
    st = os.stat(path)
    key, stamp = str(path.resolve()), _stamp(st)
    memo_file = cache_dir() / MEMO_FILE
    memo = {}
    if st.st_size >= MEMO_MIN_BYTES:
        try:
            memo = json.loads(memo_file.read_text())
            hit = memo.get(key) if isinstance(memo, dict) else None
            if isinstance(hit, list) and hit[:-1] == stamp:
                return hit[-1]
        except (OSError, ValueError):
            memo = {}
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if st.st_size >= MEMO_MIN_BYTES and _stamp(os.stat(path)) == stamp:
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            memo = {k: v for k, v in (memo if isinstance(memo, dict) else {}).items() if os.path.exists(k)}
            memo[key] = stamp + [digest]
            tmp = memo_file.with_name(f".{MEMO_FILE}.{os.getpid()}")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_file)
        except OSError:
            pass  # a read-only cache only costs the recomputation
    return digest


def dir_digest(path: Path, skip: tuple[str, ...] = ()) -> str:
    """sha256 over every regular file of a directory (names and contents), in name order."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.name not in skip and f.is_file():
            h.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return h.hexdigest()


def weights_sha256(path: Path) -> str:
    """sha256 over the model's safetensors files (sorted by name)."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def remove_stale(out: Path) -> None:
    """Clean up after writers of ``out`` that were killed (their pid is gone):
    their temp dirs/files are removed, and a set-aside previous ``out`` is put
    back when the kill came between the two renames (no ``out`` now), else
    removed. A kill at any point leaves the old output or the new one."""
    for d in [*out.parent.glob(f".{out.name}.tmp-*-*"), *out.parent.glob(f".{out.name}.old-*")]:
        tag = d.name.rsplit(".tmp-", 1)[1].split("-", 1)[0] if ".tmp-" in d.name else d.name.rsplit(".old-", 1)[1]
        if not (tag.isdigit() and 0 < int(tag) < 1 << 31):
            continue  # not a name this writer gives: not ours to touch
        if d.is_symlink():  # no writer sets a link aside: never followed, never restored
            continue
        try:
            os.kill(int(tag), 0)
        except ProcessLookupError:
            if ".old-" in d.name and not os.path.lexists(out):
                try:
                    os.rename(d, out)
                except OSError:
                    continue
            else:
                _remove(d)
        except PermissionError:  # alive, another user's
            continue


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _libc():
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` atomically, failing with FileExistsError when
    ``dst`` exists (renameat2 RENAME_NOREPLACE on Linux, renamex_np RENAME_EXCL
    on macOS): the last step of a write never replaces what it did not check."""
    import ctypes
    import sys

    try:
        libc = _libc()
        if sys.platform == "linux" and hasattr(libc, "renameat2"):
            rc = libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 1)  # AT_FDCWD, RENAME_NOREPLACE
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            rc = libc.renamex_np(os.fsencode(src), os.fsencode(dst), 0x4)  # RENAME_EXCL
        else:
            rc = None
    except OSError:
        rc = None
    if rc is None:  # no atomic primitive: check, then rename (a small window remains)
        if os.path.lexists(dst):
            raise FileExistsError(17, "File exists", str(dst))
        os.rename(src, dst)
        return
    if rc != 0:
        err = ctypes.get_errno()
        if err in (22, 38, 95):  # EINVAL/ENOSYS/EOPNOTSUPP: the file system lacks the flag
            if os.path.lexists(dst):
                raise FileExistsError(17, "File exists", str(dst))
            os.rename(src, dst)
            return
        raise OSError(err, os.strerror(err), str(dst))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_out_path(out) -> Path:
    """``out`` as a Path that names an entry of its own: not '', '.', '..' or
    a path ending in them, and not the folder this process works in, one
    above it or the home folder (replacing one would delete where the user
    works)."""
    p = Path(out)
    if str(out) == "" or p.name in ("", ".", ".."):
        raise CBDError(f"--out {str(out)!r} does not name a new file or folder; give a path such as models/my-model")
    where = p.resolve()
    if any(where == d or where in d.parents for d in (Path.cwd().resolve(), Path.home().resolve())):
        raise CBDError(f"--out {out} is the current folder, the home folder or one above them; replacing it would "
                       "delete where you work: give a new path")
    return p


def refuse_existing(out, force: bool) -> None:
    """Refuse an existing output before any work is done (unless ``force``)."""
    if out is not None:
        check_out_path(out)
    if out is not None and Path(out).exists() and not force:
        raise CBDError(f"{out} already exists; choose another --out or pass --force to replace it")


class atomic_dir:
    """Write a directory (or, with ``file=True``, one file) atomically: build
    it in a sibling temp path, then move it into place.

    ``with atomic_dir(out, force) as tmp: ...`` - on error the temp path is
    removed and any existing ``out`` is left untouched. The final move never
    replaces anything it did not check: without ``force`` an ``out`` that
    appeared meanwhile (another writer) makes this write fail, with ``force``
    the old ``out`` is set aside first and removed only after the move. The
    result gets the permissions the umask gives a new directory/file.
    """

    def __init__(self, out: Path, force: bool = False, file: bool = False):
        self.out = check_out_path(out)
        self.force = force
        self.file = file

    def __enter__(self) -> Path:
        remove_stale(self.out)  # first: a previous output set aside by a killed writer is restored
        if self.out.is_symlink():
            raise CBDError(f"{self.out} is a symbolic link; give a real path as --out (nothing was written)")
        refuse_existing(self.out, self.force)
        if self.out.exists() and self.out.is_dir() == self.file:
            kind = "a directory" if self.file else "a file"
            raise CBDError(f"{self.out} is {kind}; give another --out")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(self.out)
            prefix = f".{self.out.name}.tmp-{os.getpid()}-"
            if self.file:
                fd, name = tempfile.mkstemp(prefix=prefix, dir=self.out.parent)
                os.close(fd)
                self.tmp = Path(name)
            else:
                self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.out.parent))
        except OSError as e:
            raise CBDError(f"cannot write to {self.out.parent}: {e.strerror}") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            # MLX's own writers (mx.save_safetensors) raise RuntimeError on I/O errors
            io_error = isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "write" in str(exc).lower())
            full = io_error and shutil.disk_usage(self.tmp.parent).free < LOW_SPACE
            _remove(self.tmp)
            if io_error and not isinstance(exc, CBDError):
                reason = "no space left on device" if full else getattr(exc, "strerror", None) or str(exc)
                raise CBDError(
                    f"writing {self.out} failed: {reason}; nothing was changed "
                    "(free some space or choose another --out)"
                ) from None
            return False
        os.chmod(self.tmp, (0o666 if self.file else 0o777) & ~_umask())
        if os.environ.get("CBD_TEST_WRITE_DELAY"):  # tests: hold writers at the final move to race them
            import time

            time.sleep(float(os.environ["CBD_TEST_WRITE_DELAY"]))
        old = None
        if self.force and os.path.lexists(self.out):
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.rename(self.out, old)
        try:
            rename_noreplace(self.tmp, self.out)
        except FileExistsError:
            _remove(self.tmp)
            if old is not None:
                _remove(old)
            raise CBDError(f"{self.out} was created by another writer while this one ran; nothing of this run "
                           "was written (choose another --out, or pass --force to replace it)") from None
        except OSError as e:
            _remove(self.tmp)
            if old is not None and not os.path.lexists(self.out):
                os.rename(old, self.out)
            raise CBDError(f"writing {self.out} failed: {e.strerror}; nothing was changed") from None
        if old is not None:
            _remove(old)
        return False


ENTRY_DIGEST = "contents.sha256"  # a cache entry's digest of its own files


def valid_entry(out: Path, check=None) -> bool:
    """Whether a cache entry's files match the digest written with them (and
    ``check(out)``, when given, holds)."""
    try:
        ok = (out / ENTRY_DIGEST).read_text().strip() == dir_digest(out, skip=(ENTRY_DIGEST,))
        return ok and (check is None or bool(check(out)))
    except (OSError, CBDError):
        return False


@contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (a lock file) while the block runs."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_entry(out: Path, build, check=None) -> Path:
    """A content-keyed entry of the user cache (a converted GGUF, a token
    cache, a materialized anchor). ``build(dest)`` creates the folder
    ``dest``. Built once, by whichever process comes first: the others wait
    for it and reuse what it made. The entry carries a digest of its own files
    and is built again when they no longer match (edited, truncated, files
    added or removed), so an entry is used only as it was written."""
    out = Path(out)
    if valid_entry(out, check):
        return out
    try:
        with _locked(out.with_name(f".{out.name}.lock")):
            if valid_entry(out, check):  # finished by another process while this one waited
                return out
            try:
                with atomic_dir(out, force=True) as tmp:  # under the lock: only an invalid entry is replaced
                    staging = tmp / "entry"
                    build(staging)
                    for f in staging.iterdir():
                        f.rename(tmp / f.name)
                    staging.rmdir()
                    (tmp / ENTRY_DIGEST).write_text(dir_digest(tmp) + "\n")
            except CBDError:
                if not valid_entry(out, check):  # else a writer that does not lock finished it first: use it
                    raise
    except OSError as e:
        raise CBDError(f"cannot write the cache entry {out}: {e.strerror or e}") from None
    return out


SYNC_EVERY = 64 << 20  # bytes written between background fdatasync calls


SAFETENSORS_DTYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16), "bfloat16": ("BF16", np.uint16)}


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def save_weights(path: Path, tensors, dtype: str = "float32", shapes: dict | None = None) -> str:
    """Write one safetensors file (mlx format) straight from numpy.

    ``tensors`` is a dict or an iterable of (name, array) in sorted name
    order; with ``shapes`` given the file is streamed, so only one tensor
    needs to exist at a time. Returns the file's sha256."""
    code, np_dtype = SAFETENSORS_DTYPES[dtype]
    items = sorted(tensors.items()) if isinstance(tensors, dict) else tensors
    if shapes is None:
        items = list(items)
        shapes = {k: v.shape for k, v in items}
    size = np.dtype(np_dtype).itemsize
    header, offset = {"__metadata__": {"format": "mlx"}}, 0
    for name in sorted(shapes):
        n = int(np.prod(shapes[name], dtype=np.int64)) * size
        header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (len(blob).to_bytes(8, "little"), blob):
            f.write(chunk)
            digest.update(chunk)

        unsynced = [0]

        def write(view) -> None:  # runs in a thread: file I/O and hashing drop the GIL
            f.write(view)
            digest.update(view)
            unsynced[0] += len(view)
            if unsynced[0] >= SYNC_EVERY:  # flush to disk while the next tensors are computed
                f.flush()
                os.fdatasync(f.fileno())
                unsynced[0] = 0

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for name, arr in items:  # the next tensor is computed while the last is written
                if tuple(arr.shape) != tuple(shapes[name]):
                    raise CBDError(f"internal error: {name} has shape {arr.shape}, expected {shapes[name]}")
                data = _to_bf16_bits(arr) if dtype == "bfloat16" else np.ascontiguousarray(arr, dtype=np_dtype)
                if dtype != "float32" and not _finite_as(data, dtype):
                    raise CBDError(f"{name} holds values beyond what {dtype} can store (they would become Inf); "
                                   "write float32 (--dtype float32) or check the model")
                if pending is not None:
                    pending.result()
                pending = pool.submit(write, memoryview(data).cast("B"))
            if pending is not None:
                pending.result()
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def _finite_as(data: np.ndarray, dtype: str) -> bool:
    """Whether half-precision data (float16 values or bfloat16 bits) holds no NaN/Inf."""
    if dtype == "bfloat16":
        return not np.any((data & 0x7F80) == 0x7F80)  # exponent all ones: Inf or NaN
    return bool(np.isfinite(data).all())


def dump_json(obj) -> str:
    """Indented JSON with lists of numbers kept on one line (lineage maps)."""
    flat: list[str] = []

    def mark(o):
        if isinstance(o, dict):
            return {k: mark(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in o):
                flat.append(json.dumps(list(o), separators=(", ", ": ")))
                return f"\0{len(flat) - 1}\0"
            return [mark(v) for v in o]
        return o

    text = json.dumps(mark(obj), indent=2)
    return re.sub(r'"\\u0000(\d+)\\u0000"', lambda m: flat[int(m.group(1))], text)


def check_loadable(config: dict) -> None:
    """Refuse a config that ``mlx_lm.load`` cannot load: transformers validates
    it while mlx-lm looks for the tokenizer (e.g. hidden % heads for llama)."""
    try:
        from transformers import AutoConfig

        AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("quantization", "quantization_config")})
    except ImportError:
        return
    except Exception as e:  # noqa: BLE001 - transformers' validators raise their own kinds
        msg = str(e).strip().splitlines()[-1].strip()
        raise CBDError(f"this model's config would not load in mlx-lm ({msg}); nothing was written") from None


def copy_tokenizer(src_dir: Path, dst_dir: Path) -> None:
    """The tokenizer files of one model directory into another."""
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy(Path(src_dir) / name, Path(dst_dir) / name)


def write_model(
    out: Path,
    config: dict,
    weights,
    tokenizer_dir: Path,
    provenance: dict,
    force: bool = False,
    dtype: str = "float32",
    shapes: dict | None = None,
    extra=None,
) -> Path:
    """Write an mlx-lm model directory (config, safetensors, tokenizer,
    cbd.json) atomically. ``weights``: a dict, or with ``shapes`` a sorted
    stream of (name, array). ``extra(tmp_dir)`` may add files before the swap.
    A config that mlx-lm (through transformers) would refuse is refused first."""
    check_loadable(config)
    with atomic_dir(out, force) as tmp:
        file_hash = save_weights(tmp / "model.safetensors", weights, dtype, shapes)
        cfg = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
        cfg["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=4))
        copy_tokenizer(tokenizer_dir, tmp)
        prov = dict(provenance)
        prov["weights_sha256"] = hashlib.sha256(file_hash.encode()).hexdigest()  # = weights_sha256(tmp)
        (tmp / "cbd.json").write_text(dump_json(prov))
        if extra is not None:
            extra(tmp)
    return out


def write_quantized(out: Path, model: nn.Module, config: dict, tokenizer_dir: Path, provenance: dict,
                    force: bool = False, extra=None, shared: tuple[set, Path] | None = None) -> Path:
    """An mlx-lm quantized model directory, written atomically (with cbd.json).
    ``shared`` = (tensor names, relative link): those tensors are not written
    here but linked in from a file that several models share."""
    from mlx_lm.utils import save_config

    check_loadable(config)
    with atomic_dir(out, force) as tmp:
        weights = dict(tree_flatten(model.parameters()))
        if shared:
            names, link = shared
            weights = {k: v for k, v in weights.items() if k not in names}
            (tmp / link.name).symlink_to(link)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        save_config(dict(config), tmp / "config.json")
        copy_tokenizer(tokenizer_dir, tmp)
        prov = dict(provenance)
        prov["weights_sha256"] = weights_sha256(tmp)
        (tmp / "cbd.json").write_text(dump_json(prov))
        if extra is not None:
            extra(tmp)
    return out


MAX_JSON = 256 << 20  # bytes of a JSON file we read (tokenizer.json of a big vocabulary: tens of MB)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a file the user gave us (a regular file of bounded
    size: never a pipe or a device); one clear error otherwise."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise CBDError(f"{path} is not a regular file (a pipe, a device or a folder?); restore the {what}")
    try:
        if path.stat().st_size > MAX_JSON:
            raise CBDError(f"{path} is {path.stat().st_size / 2**20:,.0f} MB, too big for a {what}; restore it")
        obj = json.loads(path.read_text())
        where = _nonfinite_at(obj)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, numbers too long
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise CBDError(f"{path} is not valid JSON ({why}); restore or re-download the {what}") from None
    except FileNotFoundError:
        raise CBDError(f"{path} does not exist; restore or re-download the {what}") from None
    except OSError as e:
        raise CBDError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(obj, dict):
        raise CBDError(f"{path} is not a JSON object; restore or re-download the {what}")
    if where:
        raise CBDError(f"{path}: {where} is NaN or Infinity, which JSON does not allow; restore or re-download the "
                       f"{what}")
    return obj


def _nonfinite_at(obj, at: str = "") -> str | None:
    """The key path of the first NaN/Infinity in a parsed JSON value (Python's json reads them), else None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return at or "a value"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        found = _nonfinite_at(v, f"{at}.{k}" if at else str(k))
        if found:
            return found
    return None


def summarize_inputs(inputs):
    """A token cache's input paths as {folder: files}: a file (a name with a
    suffix) counts toward its folder, a folder given whole is its own entry.
    The cache's meta.json keeps the full list; its content id names it."""
    if not isinstance(inputs, list):
        return inputs
    out: dict[str, int] = {}
    for p in map(Path, map(str, inputs)):
        key = str(p.parent if p.suffix else p)
        out[key] = out.get(key, 0) + 1
    return out


def compact_records(prov: dict) -> dict:
    """A copy of ``prov`` whose training records (its history and the histories
    of the anchors it went through) name their inputs by folder, so a record
    stays small however often an anchor is polished."""
    def compact(history):
        if not isinstance(history, list):
            return history
        return [{**h, "data": {**h["data"], "inputs": summarize_inputs(h["data"].get("inputs"))}}
                if isinstance(h, dict) and isinstance(h.get("data"), dict) else h for h in history]

    out = {**prov, "history": compact(prov["history"])} if "history" in prov else dict(prov)
    if isinstance(prov.get("left_out"), list):
        out["left_out"] = [{**a, "history": compact(a.get("history"))} if isinstance(a, dict) else a
                           for a in prov["left_out"]]
    return out


def append_history(prov: dict, record: dict) -> dict:
    """``prov`` (a cbd.json record) with ``record`` appended to its history."""
    return compact_records({**prov, "history": list(prov.get("history") or []) + [record]})
