"""`export`: a quantized mlx-lm model directory, optionally a llama.cpp GGUF
and a release tarball (files + sha256 manifest + model card)."""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .arch.anchor import model_from_weights
from .calibration import DEFAULT_CALIB, calibration_from
from .errors import CBDError
from .evaluate import perplexity, tokenize_file
from .gguf import GGUF_ARCH, GGUF_TYPES, pre_tokenizer_type, write_gguf
from .loader import load_anchor, load_tokenizer, resolve
from .quantize import (BITS, CALIB_SEQ_LEN, CALIB_SEQS, GROUP_SIZES, METHODS, RECIPES, auto_group_size,
                       bits_per_weight, default_precision, is_quantized, quantize_anchor)
from .save import append_history, atomic_dir, file_sha256, refuse_existing, write_quantized

CARD_NAME = "README.md"
MANIFEST_NAME = "MANIFEST.json"


def eval_ppl(model, tokens: np.ndarray | None) -> float | None:
    """Held-out perplexity; a quantized model is scored through a dequantized
    copy (the same function: MLX's CPU quantized matmul is ~20x slower)."""
    import copy

    from mlx_lm.utils import dequantize_model

    if tokens is None:
        return None
    if any(hasattr(m, "bits") for _, m in model.named_modules()):
        model = dequantize_model(copy.deepcopy(model))
        model.set_dtype(mx.float32)  # CPU half-precision matmuls are slow
    return perplexity(model, tokens, seq_len=512, batch_size=4, progress=False)["ppl"]


def model_card(info: dict) -> str:
    """A short Markdown model card from the export record."""
    q = info["quantization"]
    ppl = info.get("heldout_ppl") or {}
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in ppl.items() if v is not None)
    chain = info.get("chain") or {}
    lines = [
        f"# {info['name']}",
        "",
        "Exported by cbd-mlx (Chain-based Distillation on MLX).",
        "",
        f"- parameters: {info['params']:,}",
        f"- quantization: {q['bits']}-bit, group {q['group_size']}, method {q['method']}"
        + (f", recipe {q['recipe']}" if q.get("recipe") else "")
        + (f", {q['embed_bits']}-bit embeddings" if q.get("embed_bits") else ""),
        f"- bits per weight: {info['bits_per_weight']:.3f}",
        f"- size on disk: {info['size_bytes'] / 1e6:.1f} MB",
        f"- chain: {chain.get('name', 'n/a')}" + (f" (anchors {', '.join(chain['anchors'])})" if chain.get("anchors")
                                                 else ""),
        f"- origin: {info['origin']}",
    ]
    if rows:
        lines += ["", f"Held-out perplexity on `{info.get('eval_data')}` ({info.get('eval_tokens'):,} tokens):", "",
                  "| model | ppl |", "|---|---|", rows]
    lines += ["", "Use: on a Mac (Apple silicon), `mlx_lm.generate --model . --prompt 'Hello'`; on other machines "
              "MLX has no fast quantized matmul (a 4-bit model generates under 1 token/s on a Linux CPU): "
              + (f"run `{info['gguf']}` in llama.cpp (`cbd-mlx generate --model {info['gguf']}`, or "
                 f"`llama-cli -m {info['gguf']}`)." if info.get("gguf") else
                 "export with `--gguf Q4_K_M` and run that file in llama.cpp."), ""]
    return "\n".join(lines)


def _manifest(folder: Path) -> dict:
    return {str(f.relative_to(folder)): file_sha256(f) for f in sorted(folder.rglob("*")) if f.is_file()}


def write_tarball(folder: Path, dest: Path, force: bool) -> Path:
    """``folder`` as a .tar.gz, written through the one atomic writer."""
    with atomic_dir(dest, force, file=True) as tmp:
        with tarfile.open(tmp, "w:gz", compresslevel=1) as tar:  # quantized weights barely compress
            tar.add(folder, arcname=dest.name.removesuffix(".tar.gz"))
    return dest


@dataclass
class ExportConfig:
    """How ``export`` quantizes and packages a model."""

    bits: int = 4
    group_size: int | None = None  # None: quantize.auto_group_size (32 at 2-4 bits)
    method: str = "rtn"  # rtn | awq | gptq
    recipe: str | None = "auto"  # auto (quantize.default_precision) | uniform | mixed_2_6 .. mixed_4_6 (rtn)
    gguf: str | None = None  # also a llama.cpp GGUF of this type
    package: bool = False  # also OUT.tar.gz with a sha256 manifest and the model card
    embed_bits: int | None = None  # the embeddings' bits [default: quantize.default_precision]

    def __post_init__(self):
        if self.recipe not in (None, "auto", "uniform", *RECIPES):
            raise CBDError(f"--recipe {self.recipe!r} is invalid: choose one of auto, uniform, {', '.join(RECIPES)}")
        if self.embed_bits is not None and self.embed_bits not in BITS:
            raise CBDError(f"--embed-bits {self.embed_bits!r} is invalid: choose one of "
                           f"{', '.join(map(str, BITS))} or auto")
        if self.gguf is not None and self.gguf not in GGUF_TYPES:
            raise CBDError(f"--gguf {self.gguf!r} is invalid: choose one of {', '.join(GGUF_TYPES)}")
        if self.bits not in BITS:
            raise CBDError(f"--bits {self.bits!r} is invalid: choose one of {', '.join(map(str, BITS))}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise CBDError(f"--group-size {self.group_size!r} is invalid: choose one of "
                           f"{', '.join(map(str, GROUP_SIZES))} or auto")
        if self.method not in METHODS:
            raise CBDError(f"--method {self.method!r} is invalid: choose one of {', '.join(METHODS)}")


EVAL_TOKENS = 8192


def export(src: str, out: Path, cfg: ExportConfig | None = None, *, calib: Path | None = None,
           eval_data: Path | None = None, eval_tokens: int = EVAL_TOKENS, force: bool = False, log=None) -> dict:
    """Quantize ``src`` into ``out`` (mlx-lm format, cbd.json, model card,
    sha256 manifest); optionally a GGUF inside it and ``out``.tar.gz beside it.
    awq/gptq calibrate on ``calib`` [default: the built-in English excerpt];
    ``eval_data`` (a text file): held-out perplexity before and after goes into
    the model card. Returns what the card reports."""

    if cfg is not None and not isinstance(cfg, ExportConfig):
        raise CBDError(f"export's cfg must be an ExportConfig (e.g. ExportConfig(bits=4)), not {cfg!r}")

    cfg = cfg or ExportConfig()
    log = log or (lambda *_: None)
    path = resolve(src)
    tok = load_tokenizer(path)
    batches = None
    if cfg.method != "rtn":
        batches = calibration_from(path, calib or DEFAULT_CALIB, CALIB_SEQS * CALIB_SEQ_LEN, CALIB_SEQ_LEN)
    ev = np.array(tokenize_file(tok, eval_data, eval_tokens), dtype=np.int32) if eval_data else None
    recipe, embed_bits = default_precision(cfg.bits, cfg.method, cfg.recipe, cfg.embed_bits)
    return _export(src, out, cfg.bits, cfg.group_size, cfg.method, recipe, embed_bits, batches, ev,
                   str(eval_data) if eval_data else None, cfg.gguf, cfg.package, force, log)


def _check_outputs(out: Path, package: bool, force: bool) -> Path:
    """Every output path checked before anything is replaced; returns the tarball's path."""
    tar_path = out.with_name(out.name + ".tar.gz")
    refuse_existing(out, force)
    if package:
        refuse_existing(tar_path, force)
    for p in (out, tar_path) if package else (out,):
        if p.is_symlink():
            raise CBDError(f"{p} is a symbolic link; give a real path as --out (nothing was written)")
    if out.exists() and not out.is_dir():
        raise CBDError(f"{out} is a file; give another --out")
    if package and tar_path.is_dir():
        raise CBDError(f"{tar_path} is a directory; the package would replace it: move it or give another --out")
    return tar_path


def _linux_note(out: Path, bits: int, gguf_name: str | None) -> str:
    return (f"note: the {bits}-bit mlx-lm model in {out} runs fast on Apple silicon (Metal); on this machine MLX has "
            "no fast quantized matmul (under 1 token/s): "
            + (f"run `cbd-mlx generate --model {out / gguf_name}` (llama.cpp) here" if gguf_name else
               "add --gguf Q4_K_M and run that file with `cbd-mlx generate --model FILE.gguf` (llama.cpp) here"))


def _export(src: str, out: Path, bits: int, group_size: int | None, method: str, recipe: str | None,
            embed_bits: int | None, calib: np.ndarray | None, eval_tokens: np.ndarray | None, eval_name: str | None,
            gguf_type: str | None, package: bool, force: bool, log) -> dict:
    path = resolve(src)
    q = is_quantized(path) if (path / "config.json").is_file() else None
    if q:
        raise CBDError(f"{src} is already quantized ({q.get('bits')}-bit); export from the full-precision model")
    out = Path(out)
    tar_path = _check_outputs(out, package, force)
    t0 = time.time()
    a = load_anchor(src)
    if gguf_type:
        if a.config.get("model_type") not in GGUF_ARCH:
            raise CBDError(f"--gguf supports {', '.join(sorted(GGUF_ARCH))}, not '{a.config.get('model_type')}'")
        pre_tokenizer_type(a.path)  # refuse a tokenizer llama.cpp would split differently, before any work
    ppl_fp = eval_ppl(model_from_weights(a.config, a.weights), eval_tokens) if eval_tokens is not None else None
    group_size = group_size or auto_group_size(a, bits)
    model, qconfig = quantize_anchor(a, bits, group_size, method, recipe, calib, fallback_bits=embed_bits)
    bpw = bits_per_weight(model)
    ppl_q = eval_ppl(model, eval_tokens)
    log(f"quantized: {bits}-bit {method}{' ' + recipe if recipe else ''}"
        f"{f', {embed_bits}-bit embeddings' if embed_bits else ''}, {bpw:.3f} bits/weight"
        + (f"; held-out ppl {ppl_fp:.3f} -> {ppl_q:.3f} ({(ppl_q - ppl_fp) / ppl_fp:+.2%})" if ppl_q else ""))
    gguf_name = f"{out.name}-{gguf_type}.gguf" if gguf_type else None
    info = {
        "name": out.name, "origin": str(src), "params": a.n_params, "bits_per_weight": bpw,
        "quantization": {"bits": bits, "group_size": group_size, "method": method, "recipe": recipe,
                         "embed_bits": embed_bits},
        "heldout_ppl": {"full precision (fp32)": ppl_fp, f"{bits}-bit {method}": ppl_q} if ppl_q else None,
        "eval_data": eval_name, "eval_tokens": int(eval_tokens.size) if eval_tokens is not None else None,
        "chain": a.provenance.get("chain"), "gguf": gguf_name,
    }
    prov = dict(a.provenance)
    prov.pop("weights_sha256", None)
    prov = append_history(prov, {"kind": "export", **{k: v for k, v in info.items() if k not in ("name", "chain")}})

    def extra(tmp: Path) -> None:
        if gguf_name:
            write_gguf(a.config, a.weights, a.path, tmp / gguf_name, gguf_type, name=out.name)
        info["size_bytes"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        (tmp / CARD_NAME).write_text(model_card(info))
        (tmp / MANIFEST_NAME).write_text(json.dumps({"sha256": _manifest(tmp)}, indent=2))

    write_quantized(out, model, qconfig, a.path, prov, force, extra=extra)
    if sys.platform != "darwin":
        log(_linux_note(out, bits, gguf_name))
    if package:
        write_tarball(out, tar_path, force)
        info["package"] = str(tar_path)
        info["package_sha256"] = hashlib.sha256(tar_path.read_bytes()).hexdigest()
    info["seconds"] = time.time() - t0
    return info
