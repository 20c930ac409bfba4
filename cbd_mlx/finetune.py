"""`finetune`: a quick local fine-tune through mlx-lm's tuner (LoRA, DoRA or
full) on its jsonl formats, optionally fused into a standalone model."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from .errors import CBDError, check_fits
from .loader import read_provenance, resolve
from .save import append_history, atomic_dir, dump_json, refuse_existing, weights_sha256

FORMATS = {"text": ("text",), "chat": ("messages",), "completions": ("prompt", "completion")}


def data_format(data_dir: Path) -> str:
    """The mlx-lm jsonl format of ``data_dir``/train.jsonl (text, chat or completions)."""
    f = Path(data_dir) / "train.jsonl"
    if not f.is_file():
        raise CBDError(f"{data_dir} has no train.jsonl (mlx-lm format: one JSON object per line)")
    try:
        first = json.loads(f.open().readline())
    except json.JSONDecodeError as e:
        raise CBDError(f"{f}: the first line is not JSON ({e.msg})") from None
    for name, keys in FORMATS.items():
        if isinstance(first, dict) and all(k in first for k in keys):
            return name
    keys = sorted(first) if isinstance(first, dict) else type(first).__name__
    raise CBDError(f"{f}: unknown format (keys {keys}); use 'text', 'messages', or 'prompt' + 'completion'")


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
        if self.num_layers != -1 and self.num_layers < 1:
            raise CBDError(f"--num-layers {self.num_layers} is invalid: give a positive count, or -1 for all layers")


def finetune(model_src: str, data_dir: Path, out: Path, cfg: FinetuneConfig | None = None, force: bool = False,
             log=None) -> dict:
    """Fine-tune with mlx-lm on a folder of jsonl (text, chat or completions);
    ``out`` holds adapters (loadable with ``--adapter-path``) or, with
    ``fuse`` / full mode, a standalone model. Returns the training record."""
    cfg = cfg or FinetuneConfig()
    log = log or (lambda *_: None)
    mode, rank, iters, batch_size, lr = cfg.mode, cfg.rank, cfg.iters, cfg.batch_size, cfg.lr
    max_seq_length, num_layers, fuse = cfg.max_seq_length, cfg.num_layers, cfg.fuse
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.lora import CONFIG_DEFAULTS, train_model
    from mlx_lm.tuner.datasets import load_local_dataset
    from mlx_lm.tuner.trainer import evaluate
    from mlx_lm.utils import load, save

    fmt = data_format(data_dir)
    out = Path(out)
    refuse_existing(out, force)
    path = resolve(model_src)
    prov = read_provenance(path) or {"kind": "external", "source": model_src}  # read before hours of training
    model, tokenizer, config = load(str(path), return_config=True)
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    if mode != "full" and hidden and rank > hidden:
        raise CBDError(f"--lora-rank {rank} is above the model's hidden size {hidden}; a LoRA rank is small "
                       "(8-64): lower it")
    vocab = int(config.get("vocab_size") or 0)
    check_fits(f"a batch of {batch_size} x {max_seq_length} tokens", 3 * 4 * batch_size * max_seq_length * vocab,
               "lower --batch-size or --max-seq-length")
    n_layers = len(model.layers) if num_layers < 0 else min(num_layers, len(model.layers))
    with atomic_dir(out, force) as tmp:
        args = SimpleNamespace(**{**CONFIG_DEFAULTS, "optimizer_config": {"adam": {}}})
        args.__dict__.update(
            model=str(path), data=str(_split_valid(data_dir, tmp)), train=True, fine_tune_type=mode,
            num_layers=n_layers, batch_size=batch_size, iters=iters, learning_rate=lr,
            max_seq_length=max_seq_length, steps_per_eval=max(1, iters // EVALS), steps_per_report=max(1, iters // 10),
            save_every=max(iters, 1), val_batches=-1, adapter_path=str(tmp / "adapters"),
            lora_parameters={"rank": rank, "dropout": 0.0, "scale": 20.0},
        )
        train_set, valid_set, _ = load_local_dataset(Path(args.data), tokenizer, args)
        if len(train_set) == 0 or len(valid_set) == 0:
            raise CBDError(f"{data_dir}: empty train or valid split")
        for split, n in (("training", len(train_set)), ("validation", len(valid_set))):
            if n < batch_size:
                raise CBDError(f"{data_dir}: {n} {split} examples, fewer than --batch-size {batch_size}; add "
                               "examples or lower --batch-size")
        from mlx_lm.tuner.datasets import CacheDataset

        def val_loss() -> float:
            return float(evaluate(model, CacheDataset(valid_set), batch_size=min(batch_size, len(valid_set)),
                                  num_batches=-1, max_seq_length=max_seq_length))

        before = val_loss()
        points = _Points(model)
        train_model(args, model, train_set, valid_set, training_callback=points)
        after, best_iter = keep_best(model, points, val_loss, before, iters, log)
        if not (fuse or mode == "full"):  # the adapters on disk are the kept ones
            mx.save_safetensors(str(tmp / "adapters" / "adapters.safetensors"),
                                dict(tree_flatten(model.trainable_parameters())))
        record = {"kind": "finetune", "mode": mode, "format": fmt, "data": str(data_dir), "iters": iters,
                  "rank": rank if mode != "full" else None, "lr": lr, "valid_loss_before": before,
                  "valid_loss_after": after, "kept_iteration": best_iter, "fused": bool(fuse or mode == "full")}
        log(f"valid loss {before:.3f} -> {after:.3f} ({fmt} data, {mode}, {iters} iters; kept iteration {best_iter})")
        prov.pop("weights_sha256", None)
        prov = append_history(prov, record)
        if fuse or mode == "full":
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
            prov["weights_sha256"] = weights_sha256(tmp)
        else:
            for f in (tmp / "adapters").iterdir():
                f.rename(tmp / f.name)
            (tmp / "adapters").rmdir()
            shutil.rmtree(tmp / "data", ignore_errors=True)
            record["base"] = str(path)
        (tmp / "cbd.json").write_text(dump_json(prov))
    return record
