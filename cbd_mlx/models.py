"""Anchors in and models out: load from a directory, the hub or a GGUF file;
write mlx-lm model directories atomically."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .errors import CBDError
from .families import Family, family_of
from .shapes import Shape, param_shapes, shape_of

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
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "*.jinja"]
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("CBD_MLX_CACHE", Path.home() / ".cache" / "cbd-mlx"))


@dataclass
class Anchor:
    """A loaded model: fp32 numpy weights in mlx-lm names, its config and files."""

    source: str
    path: Path  # the model directory (a converted cache for GGUF)
    config: dict
    weights: dict[str, np.ndarray]
    family: Family
    shape: Shape
    provenance: dict = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return int(sum(v.size for v in self.weights.values()))

    @property
    def template(self) -> dict[str, tuple]:
        return {k: v.shape for k, v in self.weights.items()}

    @property
    def lineage(self) -> dict | None:
        return self.provenance.get("lineage")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


def weights_sha256(path: Path) -> str:
    """sha256 over the model's safetensors files (sorted by name)."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def resolve(source: str, revision: str | None = None) -> Path:
    """A local model directory for ``source``: a directory, a GGUF file
    (converted once into the user cache) or a Hugging Face repo id."""
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if p.suffix == ".gguf":
        if not p.is_file():
            raise CBDError(f"GGUF file {p} does not exist")
        return _converted_gguf(p)
    if p.exists():
        raise CBDError(f"{p} is neither a model directory nor a .gguf file")
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise CBDError(f"model '{source}' not found: give a model directory, a .gguf file or a hub repo id")
    return _from_hub(source, revision)


def _converted_gguf(path: Path) -> Path:
    from .gguf import gguf_to_model_dir

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (out / "config.json").exists():
        return out
    with atomic_dir(out, force=True) as tmp:
        gguf_to_model_dir(path, tmp)
    return out


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


def build_model(config: dict) -> nn.Module:
    """An mlx-lm model object for ``config`` (weights uninitialised/lazy)."""
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
        return model_class(args_class.from_dict(config))
    except (ValueError, TypeError, KeyError) as e:
        raise CBDError(f"cannot build a model from config.json: {e}") from None


def param_template(config: dict) -> dict[str, tuple]:
    """Parameter names and shapes of ``config``'s model (nothing is computed)."""
    return {k: tuple(v.shape) for k, v in tree_flatten(build_model(config).parameters())}


def model_from_weights(config: dict, weights: dict[str, np.ndarray], dtype=mx.float32) -> nn.Module:
    """An mlx-lm model holding ``weights`` (numpy) in ``dtype``."""
    model = build_model(config)
    try:
        model.load_weights([(k, mx.array(v, dtype=dtype)) for k, v in weights.items()], strict=True)
    except ValueError as e:
        raise CBDError(f"weights do not match config.json: {e}") from None
    mx.eval(model.parameters())
    model.eval()
    return model


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CBDError(f"{path} is not valid JSON ({e}); restore or re-download the {what}") from None


def _load_mlx_format(path: Path, config: dict) -> dict[str, np.ndarray] | None:
    """fp32 numpy weights of an unquantized mlx-format directory, without
    building a model (zero-copy for fp32). None: not mlx format, use mlx-lm."""
    weights = {}
    for f in sorted(path.glob("model*.safetensors")):
        try:
            arrays, meta = mx.load(str(f), return_metadata=True)
        except Exception as e:  # mlx raises RuntimeError/ValueError on bad files
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CBDError(f"cannot read {f}: {msg}; the file is truncated or corrupt, restore or re-download it") from None
        if meta.get("format") != "mlx":
            return None
        for k, v in arrays.items():
            weights[k] = np.asarray(v if v.dtype == mx.float32 else v.astype(mx.float32))
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


def load_anchor(source: str, revision: str | None = None) -> Anchor:
    """Load a model directory, GGUF file or hub repo as fp32 numpy weights."""
    path = resolve(source, revision)
    if not (path / "config.json").is_file():
        raise CBDError(f"{path} has no config.json; is it a model directory?")
    config = _read_json(path / "config.json", "model's config.json")
    family = family_of(config)
    if not list(path.glob("model*.safetensors")):
        raise CBDError(f"{path} has no model*.safetensors weights")
    weights = None if "quantization" in config else _load_mlx_format(path, config)
    if weights is None:
        weights, config = _load_with_mlx_lm(path)
    shape = shape_of(family, config)
    _check_weights(path, family, shape, weights)
    for k, v in weights.items():
        if not np.isfinite(v).all():
            raise CBDError(f"{path}: parameter {k} holds NaN or Inf; the checkpoint is damaged")
    prov = _read_json(path / "cbd.json", "cbd.json") if (path / "cbd.json").is_file() else {}
    return Anchor(source, path, config, weights, family, shape, prov)


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
    """The anchor's weights hash (from its cbd.json when recorded there)."""
    return anchor.provenance.get("weights_sha256") or weights_sha256(anchor.path)


def load_tokenizer(path: Path):
    """mlx-lm's TokenizerWrapper for a model directory."""
    from mlx_lm.utils import load_tokenizer as _load

    try:
        return _load(Path(path))
    except Exception as e:
        raise CBDError(f"cannot load the tokenizer in {path}: {str(e).splitlines()[0] if str(e) else e}") from None


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


class atomic_dir:
    """Write a directory atomically: build it in a sibling temp dir, then swap.

    ``with atomic_dir(out, force) as tmp: ...`` - on error the temp dir is
    removed and any existing ``out`` is left untouched.
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out)
        self.force = force

    def __enter__(self) -> Path:
        if self.out.exists() and not self.force:
            raise CBDError(f"{self.out} already exists; choose another --out or pass --force to replace it")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        except OSError as e:
            raise CBDError(f"cannot write to {self.out.parent}: {e.strerror}") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and not isinstance(exc, CBDError):
                raise CBDError(
                    f"writing {self.out} failed: {exc.strerror or exc}; nothing was changed "
                    "(free some space or choose another --out)"
                ) from None
            return False
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def save_weights(path: Path, weights: dict[str, np.ndarray], dtype: str = "float32") -> None:
    """One safetensors file in mlx format, written straight from numpy
    (bfloat16, which numpy lacks, goes through MLX)."""
    if dtype == "bfloat16":
        arrays = {k: mx.array(v).astype(mx.bfloat16) for k, v in weights.items()}
        mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
        return
    from safetensors.numpy import save_file

    np_dtype = np.float32 if dtype == "float32" else np.float16
    save_file({k: np.ascontiguousarray(v, dtype=np_dtype) for k, v in weights.items()}, str(path),
              metadata={"format": "mlx"})


def dump_json(obj) -> str:
    """Indented JSON with lists of numbers kept on one line (lineage maps)."""
    text = json.dumps(obj, indent=2)
    return re.sub(r"\[\s+([-\d.,e\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)


def write_model(
    out: Path,
    config: dict,
    weights: dict[str, np.ndarray],
    tokenizer_dir: Path,
    provenance: dict,
    force: bool = False,
    dtype: str = "float32",
) -> Path:
    """Write an mlx-lm model directory (config, safetensors, tokenizer, cbd.json)."""
    from mlx_lm.utils import save_config

    with atomic_dir(out, force) as tmp:
        save_weights(tmp / "model.safetensors", weights, dtype)
        cfg = dict(config)
        cfg["torch_dtype"] = dtype
        save_config(cfg, tmp / "config.json")
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copy(src, tmp / name)
        prov = dict(provenance)
        prov["weights_sha256"] = weights_sha256(tmp)
        (tmp / "cbd.json").write_text(dump_json(prov))
    return out


def flat_params(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def set_params(model: nn.Module, params: dict[str, mx.array]) -> None:
    model.update(tree_unflatten(list(params.items())))
