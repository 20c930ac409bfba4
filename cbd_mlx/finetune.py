"""`finetune`: a quick local fine-tune through mlx-lm's tuner (LoRA, DoRA or
full) on its jsonl formats, optionally fused into a standalone model."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .errors import CBDError, check_fits, translated
from .loader import check_model_files, read_provenance, resolve
from .save import append_history, atomic_dir, dump_json, refuse_existing, weights_sha256

FORMATS = {"text": ("text",), "chat": ("messages",), "completions": ("prompt", "completion")}


SPLIT_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl")  # what mlx-lm's tuner reads from the folder


def data_format(data_dir: Path) -> str:
    """The mlx-lm jsonl format of ``data_dir``/train.jsonl (text, chat or
    completions), every line of every split checked to be a record of it
    before mlx-lm reads them."""
    f = Path(data_dir) / "train.jsonl"
    if not f.is_file():
        raise CBDError(f"{data_dir} has no train.jsonl (mlx-lm format: one JSON object per line)")
    fmt = None
    for name in SPLIT_FILES:
        path = Path(data_dir) / name
        if name != "train.jsonl" and not os.path.lexists(path):
            continue
        if not path.is_file():
            raise CBDError(f"{path} is not a regular file (a pipe, a device, a folder or a broken link?)")
        for i, rec in enumerate(_records(path)):
            if fmt is None:
                fmt = next((n for n, keys in FORMATS.items() if isinstance(rec, dict) and all(k in rec for k in keys)),
                           None)
                if fmt is None:
                    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                    raise CBDError(f"{path}:{i + 1}: unknown format (keys {keys}); use 'text', 'messages', or "
                                   "'prompt' + 'completion'")
            why = _bad_record(rec, fmt)
            if why:
                raise CBDError(f"{path}:{i + 1}: {why} (a {fmt} record, like line 1 of train.jsonl); fix that line "
                               "or drop it")
    if fmt is None:
        raise CBDError(f"{f} holds no records")
    return fmt


def _records(path: Path):
    """The JSON values of a jsonl file's lines (an empty line, invalid UTF-8 or JSON: one clear error)."""
    with open(path, encoding="utf-8", errors="strict") as fh:
        try:
            for i, line in enumerate(fh):
                if not line.strip():
                    raise CBDError(f"{path}:{i + 1}: empty line (mlx-lm reads one JSON object per line)")
                try:
                    yield json.loads(line)
                except (ValueError, RecursionError) as e:
                    why = "nested too deeply" if isinstance(e, RecursionError) else e
                    raise CBDError(f"{path}:{i + 1}: not JSON ({why})") from None
        except UnicodeDecodeError:
            raise CBDError(f"{path} is not UTF-8 text") from None


def _bad_record(rec, fmt: str) -> str | None:
    """Why ``rec`` is not a record of ``fmt`` (None when it is one)."""
    if not isinstance(rec, dict):
        return f"a {type(rec).__name__}, not an object"
    if fmt == "text":
        return None if isinstance(rec.get("text"), str) and rec["text"].strip() else "'text' is not a non-empty string"
    if fmt == "completions":
        return None if all(isinstance(rec.get(k), str) for k in ("prompt", "completion")) else \
            "'prompt' and 'completion' must be strings"
    msgs = rec.get("messages")
    if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                    and isinstance(m.get("content"), str) for m in msgs)):
        return "'messages' must be a list of {'role': ..., 'content': ...} with string values"
    return None


def _split_valid(data_dir: Path, tmp: Path) -> Path:
    """mlx-lm needs valid.jsonl: without one, the last 10% of train.jsonl."""
    if (Path(data_dir) / "valid.jsonl").is_file():
        return Path(data_dir)
    lines = (Path(data_dir) / "train.jsonl").read_text().splitlines()
    if len(lines) < 2:
        raise CBDError(f"{data_dir}/train.jsonl needs at least 2 lines (or add valid.jsonl)")
    n = max(1, len(lines) // 10)
    d = tmp / "data"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(lines[:-n]) + "\n")
    (d / "valid.jsonl").write_text("\n".join(lines[-n:]) + "\n")
    return d


EVALS = 5  # validation points during a run (each a candidate for the weights kept)


class _Points:
    """mlx-lm training callback: the trainable weights at each validation
    report (MLX arrays are immutable: holding them copies nothing)."""

    def __init__(self, model):
        self.model, self.points = model, []

    def on_train_loss_report(self, info: dict) -> None:
        pass

    def on_val_loss_report(self, info: dict) -> None:
        self.points.append((info["val_loss"], info["iteration"], self.model.trainable_parameters()))


def keep_best(model, points: _Points, val_loss, before: float, iters: int, log) -> tuple[float, int]:
    """Leave ``model`` holding its best weights by validation loss: the end of
    the run, the best reported point of it, or the start (a fine-tune never
    ends worse than where it began). Returns (its loss, its iteration)."""
    final = model.trainable_parameters()
    after, kept = val_loss(), iters
    mid = [p for p in points.points if 0 < p[1] < iters]
    if mid:
        _, it, params = min(mid, key=lambda p: p[0])
        model.update(params)
        loss = val_loss()
        if loss < after:
            after, kept, final = loss, it, params
        else:
            model.update(final)
    if before <= after:
        start = next((p for p in points.points if p[1] == 0), None)
        if start is not None:
            model.update(start[2])
            log(f"warning: the validation loss never went below the start's ({before:.3f}; best {after:.3f}); "
                "the output keeps the start (try a lower --lr, fewer --iters or more data)")
            after, kept = before, 0
    return after, kept


@dataclass
class FinetuneConfig:
    """How ``finetune`` trains (mlx-lm's tuner)."""

    mode: str = "lora"  # lora | dora | full
    rank: int = 8
    iters: int = 100
    batch_size: int = 4
    lr: float = 1e-4
    max_seq_length: int = 512
    num_layers: int = -1  # layers to adapt, from the top (-1: all)
    fuse: bool = False  # write a standalone model instead of adapters

    def __post_init__(self):
        import math

        if self.mode not in ("lora", "dora", "full"):
            raise CBDError(f"mode {self.mode!r} is invalid: choose lora, dora or full")
        for name in ("rank", "iters", "batch_size", "max_seq_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise CBDError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is invalid: give a positive "
                               "whole number")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise CBDError(f"--lr {self.lr!r} is invalid: give a finite number > 0")
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) or (
                self.num_layers != -1 and self.num_layers < 1):
            raise CBDError(f"--num-layers {self.num_layers!r} is invalid: give a positive count, or -1 for all layers")


def finetune(model_src: str, data_dir: Path, out: Path, cfg: FinetuneConfig | None = None, force: bool = False,
             log=None) -> dict:
    """Fine-tune with mlx-lm on a folder of jsonl (text, chat or completions);
    ``out`` holds adapters (loadable with ``--adapter-path``) or, with
    ``fuse`` / full mode, a standalone model. Returns the training record."""
    from mlx_lm.lora import train_model
    from mlx_lm.utils import load

    cfg = cfg or FinetuneConfig()
    log = log or (lambda *_: None)
    fmt = data_format(data_dir)
    out = Path(out)
    refuse_existing(out, force)
    path = resolve(model_src)
    check_model_files(path)  # what mlx-lm would read unchecked: config fields, weights headers, tokenizer files
    prov = read_provenance(path) or {"kind": "external", "source": model_src}  # read before hours of training
    with translated("mlx-lm's loader"):
        model, tokenizer, config = load(str(path), return_config=True)
    if fmt != "text" and not getattr(tokenizer, "chat_template", None):
        raise CBDError(f"{fmt} data goes through the tokenizer's chat template, and {model_src} has none: give "
                       "'text' records ({\"text\": ...}) or a model with a chat template")
    _check_sizes(cfg, config)
    standalone = cfg.fuse or cfg.mode == "full"
    with atomic_dir(out, force) as tmp:
        args = _tuner_args(cfg, path, _split_valid(data_dir, tmp), tmp, len(model.layers))
        with translated("mlx-lm's tuner"):
            train_set, valid_set, val_loss = _datasets(args, model, tokenizer, cfg, data_dir)
            before = val_loss()
            points = _Points(model)
            train_model(args, model, train_set, valid_set, training_callback=points)
            after, best_iter = keep_best(model, points, val_loss, before, cfg.iters, log)
        if not (math.isfinite(before) and math.isfinite(after)):
            raise CBDError(f"the validation loss is {before} before and {after} after the fine-tune (not a number): "
                           f"{model_src} overflows on this data, or --lr is too high; nothing was written")
        record = {"kind": "finetune", "mode": cfg.mode, "format": fmt, "data": str(data_dir), "iters": cfg.iters,
                  "rank": cfg.rank if cfg.mode != "full" else None, "lr": cfg.lr, "valid_loss_before": before,
                  "valid_loss_after": after, "kept_iteration": best_iter, "fused": standalone}
        log(f"valid loss {before:.3f} -> {after:.3f} ({fmt} data, {cfg.mode}, {cfg.iters} iters; kept iteration "
            f"{best_iter})")
        prov = append_history({k: v for k, v in prov.items() if k != "weights_sha256"}, record)
        if standalone:
            _write_fused(tmp, model, tokenizer, config, path)
            prov["weights_sha256"] = weights_sha256(tmp)
        else:
            _write_adapters(tmp, model)
            record["base"] = str(path)
        (tmp / "cbd.json").write_text(dump_json(prov))
    return record


def _check_sizes(cfg: FinetuneConfig, config: dict) -> None:
    """A LoRA rank within the hidden size and a batch within memory."""
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    if cfg.mode != "full" and hidden and cfg.rank > hidden:
        raise CBDError(f"--lora-rank {cfg.rank} is above the model's hidden size {hidden}; a LoRA rank is small "
                       "(8-64): lower it")
    vocab = int(config.get("vocab_size") or 0)
    check_fits(f"a batch of {cfg.batch_size} x {cfg.max_seq_length} tokens",
               3 * 4 * cfg.batch_size * cfg.max_seq_length * vocab, "lower --batch-size or --max-seq-length")


def _tuner_args(cfg: FinetuneConfig, path: Path, data: Path, tmp: Path, layers: int) -> SimpleNamespace:
    """mlx-lm's lora arguments for this fine-tune."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    args = SimpleNamespace(**{**CONFIG_DEFAULTS, "optimizer_config": {"adam": {}}})
    args.__dict__.update(
        model=str(path), data=str(data), train=True, fine_tune_type=cfg.mode,
        num_layers=layers if cfg.num_layers < 0 else min(cfg.num_layers, layers), batch_size=cfg.batch_size,
        iters=cfg.iters, learning_rate=cfg.lr, max_seq_length=cfg.max_seq_length,
        steps_per_eval=max(1, cfg.iters // EVALS), steps_per_report=max(1, cfg.iters // 10),
        save_every=max(cfg.iters, 1), val_batches=-1, adapter_path=str(tmp / "adapters"),
        lora_parameters={"rank": cfg.rank, "dropout": 0.0, "scale": 20.0},
    )
    return args


def _datasets(args, model, tokenizer, cfg: FinetuneConfig, data_dir: Path):
    """(train set, valid set, valid-loss function), each split checked."""
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
    from mlx_lm.tuner.trainer import evaluate

    train_set, valid_set, _ = load_local_dataset(Path(args.data), tokenizer, args)
    if len(train_set) == 0 or len(valid_set) == 0:
        raise CBDError(f"{data_dir}: empty train or valid split")
    for split, n in (("training", len(train_set)), ("validation", len(valid_set))):
        if n < cfg.batch_size:
            raise CBDError(f"{data_dir}: {n} {split} examples, fewer than --batch-size {cfg.batch_size}; add "
                           "examples or lower --batch-size")

    def val_loss() -> float:
        return float(evaluate(model, CacheDataset(valid_set), batch_size=min(cfg.batch_size, len(valid_set)),
                              num_batches=-1, max_seq_length=cfg.max_seq_length))

    return train_set, valid_set, val_loss


def _write_fused(tmp: Path, model, tokenizer, config: dict, path: Path) -> None:
    """The adapters fused into a standalone mlx-lm model at ``tmp``."""
    from mlx_lm.utils import save

    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    mx.eval(model.parameters())
    final = tmp / "model"
    save(final, str(path), model, tokenizer, config, donate_model=False)
    shutil.rmtree(tmp / "adapters", ignore_errors=True)
    shutil.rmtree(tmp / "data", ignore_errors=True)
    for f in final.iterdir():
        f.rename(tmp / f.name)
    final.rmdir()


def _write_adapters(tmp: Path, model) -> None:
    """The kept adapters (not the tuner's last ones) at ``tmp``."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(tmp / "adapters" / "adapters.safetensors"), weights)
    for f in (tmp / "adapters").iterdir():
        f.rename(tmp / f.name)
    (tmp / "adapters").rmdir()
    shutil.rmtree(tmp / "data", ignore_errors=True)
