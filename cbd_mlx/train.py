"""The one MLX training loop behind distill, recover and bridge.

Packed sequences from a memory-mapped token cache, gradient accumulation,
AdamW with warmup + cosine decay, distillation losses (reverse/forward KL,
JSD, CE), held-out loss at intervals, checkpoints with exact resume, a
metrics log, a loss-curve PNG, and data parallelism through mx.distributed
(``mlx.launch`` runs the same command on several processes or machines).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from .data import PackedSequences
from .errors import CBDError
from .models import atomic_dir

LOSSES = ("reverse_kl", "forward_kl", "jsd", "ce")
CHECKPOINT = "checkpoint"


@dataclass
class TrainConfig:
    tokens: int
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    min_warmup_steps: int = 10
    loss: str = "reverse_kl"
    temperature: float = 1.0
    ce_weight: float = 0.0
    xvocab_weight: float = 0.0  # ULD cross-tokenizer loss (bridge), with targets passed to train()
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    seed: int = 0

    def steps(self, world: int) -> int:
        per_step = self.batch_size * self.seq_len * self.grad_accum * world
        return max(1, self.tokens // per_step)


def _softmax_lse(z: mx.array) -> tuple[mx.array, mx.array]:
    """(softmax, logsumexp) with a single exp pass over the vocabulary."""
    m = mx.stop_gradient(z.max(-1, keepdims=True))
    e = mx.exp(z - m)
    s = e.sum(-1, keepdims=True)
    return e / s, m + mx.log(s)


def _fused_kd(mode: str, ce_weight: float):
    """Per-token KL(student || teacher) (reverse) or KL(teacher || student)
    (forward), plus ``ce_weight`` * CE, with a hand-written gradient: two exp
    passes over the vocabulary for forward and backward together (autodiff
    needs about five; on CPU these passes dominate a distillation step)."""

    @mx.custom_function
    def rows(zs, zt, y):
        ps, lse_s = _softmax_lse(zs)
        if mode == "reverse_kl":  # only the teacher's normalizer is needed
            pt, lse_t = mx.zeros((1,)), mx.logsumexp(zt, axis=-1, keepdims=True)
        else:
            pt, lse_t = _softmax_lse(zt)
        d = (zs - zt) - (lse_s - lse_t)  # log p_s - log p_t
        kl = (ps * d).sum(-1) if mode == "reverse_kl" else -(pt * d).sum(-1)
        loss = kl
        if ce_weight:
            loss = loss + ce_weight * (lse_s[..., 0] - mx.take_along_axis(zs, y[..., None], -1)[..., 0])
        return loss, ps, pt, d, kl

    @rows.vjp
    def rows_vjp(primals, cotangents, outputs):
        zs, zt, y = primals
        _, ps, pt, d, kl = outputs
        g = ps * (d - kl[..., None]) if mode == "reverse_kl" else ps - pt
        if ce_weight:
            onehot = mx.arange(zs.shape[-1]) == y[..., None]
            g = g + ce_weight * (ps - onehot)
        return g * cotangents[0][..., None], mx.zeros_like(zt), mx.zeros_like(y)

    return rows


def distill_loss(logits: mx.array, targets: mx.array, teacher: mx.array | None, cfg: TrainConfig) -> mx.array:
    """Mean per-token loss: a KL-type distance to the teacher (times T^2) plus
    ``ce_weight`` * cross-entropy; plain CE without a teacher or with loss=ce."""
    if teacher is None or cfg.loss == "ce":
        return nn.losses.cross_entropy(logits, targets).mean()
    t = cfg.temperature
    if cfg.loss in ("reverse_kl", "forward_kl"):
        if t == 1.0:
            return _fused_kd(cfg.loss, cfg.ce_weight)(logits, teacher, targets)[0].mean()
        kl = _fused_kd(cfg.loss, 0.0)(logits / t, teacher / t, targets)[0].mean() * t * t
        return kl + cfg.ce_weight * nn.losses.cross_entropy(logits, targets).mean() if cfg.ce_weight else kl
    if cfg.loss != "jsd":
        raise CBDError(f"unknown loss '{cfg.loss}'; choose one of {', '.join(LOSSES)}")
    log_s = nn.log_softmax(logits / t, axis=-1)
    log_t = nn.log_softmax(teacher / t, axis=-1)
    p_s, p_t = mx.exp(log_s), mx.exp(log_t)
    log_m = mx.log(0.5 * (p_s + p_t) + 1e-20)
    kl = 0.5 * (p_t * (log_t - log_m)).sum(-1) + 0.5 * (p_s * (log_s - log_m)).sum(-1)
    loss = kl.mean() * t * t
    return loss + cfg.ce_weight * nn.losses.cross_entropy(logits, targets).mean() if cfg.ce_weight else loss


def schedule(cfg: TrainConfig, steps: int):
    warmup = min(max(1, int(steps * cfg.warmup_fraction), cfg.min_warmup_steps), max(1, steps // 2))
    decay = optim.cosine_decay(cfg.lr, max(1, steps - warmup), cfg.lr * cfg.min_lr_ratio)
    return optim.join_schedules([optim.linear_schedule(cfg.lr * 0.01, cfg.lr, warmup), decay], [warmup])


def _save_checkpoint(work: Path, model: nn.Module, opt: optim.Optimizer, step: int, metrics: list) -> None:
    """Atomically replace work/checkpoint (weights, optimizer state, step)."""
    with atomic_dir(work / CHECKPOINT, force=True) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
        (tmp / "state.json").write_text(json.dumps({"step": step, "metrics": metrics}))


def _load_checkpoint(work: Path, model: nn.Module, opt: optim.Optimizer) -> tuple[int, list]:
    ck = work / CHECKPOINT
    if not (ck / "state.json").is_file():
        return 0, []
    try:
        state = json.loads((ck / "state.json").read_text())
        model.load_weights(list(mx.load(str(ck / "model.safetensors")).items()), strict=True)
        opt.state = tree_unflatten(list(mx.load(str(ck / "optimizer.safetensors")).items()))
    except (ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise CBDError(f"checkpoint {ck} is damaged ({e}); delete it to start over") from None
    mx.eval(model.parameters(), opt.state)
    return state["step"], state["metrics"]


def heldout_loss(model: nn.Module, data: PackedSequences | None, cfg: TrainConfig) -> float | None:
    if data is None:
        return None
    total, n = 0.0, 0
    for i in range(min(cfg.eval_batches, max(1, data.n // cfg.batch_size))):
        b = mx.array(data.batch(i, cfg.batch_size))
        logits = model(b[:, :-1])
        total += float(nn.losses.cross_entropy(logits, b[:, 1:], reduction="sum"))
        n += b[:, 1:].size
    return total / n


def plot_metrics(metrics: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    tr = [(m["tokens"], m["loss"]) for m in metrics if "loss" in m]
    ev = [(m["tokens"], m["heldout_loss"]) for m in metrics if m.get("heldout_loss") is not None]
    if tr:
        ax.plot(*zip(*tr), label="train loss", alpha=0.7)
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out CE")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(
    model: nn.Module,
    train_data: PackedSequences,
    heldout: PackedSequences | None,
    cfg: TrainConfig,
    work: Path,
    teacher: nn.Module | None = None,
    log=print,
    stop_after: int | None = None,
    teacher_cache=None,
    xvocab=None,
) -> list[dict]:
    """Train ``model`` in place; checkpoints go to ``work`` (resumed if present).

    Each process of an ``mlx.launch`` group reads its own slice of every
    global batch; gradients are averaged with ``mx.distributed.all_sum``.
    ``stop_after`` ends the run after that many steps (tests use it).
    ``teacher_cache`` (a TeacherCache) replaces the teacher's forward pass.
    ``xvocab`` (uld.XVocabTargets) adds ``cfg.xvocab_weight`` x the ULD loss."""
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    steps = cfg.steps(world)
    opt = optim.AdamW(learning_rate=schedule(cfg, steps), weight_decay=cfg.weight_decay)
    opt.init(model.trainable_parameters())
    work.mkdir(parents=True, exist_ok=True)
    start, metrics = _load_checkpoint(work, model, opt)
    if start:
        log(f"resuming from step {start}/{steps} ({work / CHECKPOINT})")
    if teacher is not None:
        teacher.freeze()

    def loss_fn(m, x, y, t, u):
        logits = m(x)
        loss = distill_loss(logits, y, t, cfg)
        if u is not None:
            from .uld import uld_loss

            loss = loss + cfg.xvocab_weight * uld_loss(logits, *u)
        return loss

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=rank != 0)
    t_last, tok_since = time.time(), 0
    for step in range(start, steps):
        acc, loss_sum = None, 0.0
        for micro in range(cfg.grad_accum):
            index = (step * cfg.grad_accum + micro) * world + rank
            b = mx.array(train_data.batch(index, cfg.batch_size))
            x, y = b[:, :-1], b[:, 1:]
            if teacher_cache is not None:
                t_logits = teacher_cache.logits(index)
            else:
                t_logits = mx.stop_gradient(teacher(x)) if teacher is not None else None
            u = xvocab.window(train_data.starts(index, cfg.batch_size), cfg.seq_len) if xvocab else None
            loss, grads = loss_and_grad(model, x, y, t_logits, u)
            acc = grads if acc is None else tree_map(mx.add, acc, grads)
            mx.eval(acc, loss)
            loss_sum += float(loss)
        loss_val = loss_sum / cfg.grad_accum
        if world > 1:
            acc = tree_map(mx.distributed.all_sum, acc)
            loss_val = float(mx.distributed.all_sum(mx.array(loss_val))) / world
        # mean over micro-batches and processes, and global-norm clipping, in one pass
        scale = 1.0 / (cfg.grad_accum * world)
        if cfg.max_grad_norm > 0:
            sq = sum(mx.sum(mx.square(g)) for _, g in tree_flatten(acc))
            scale = mx.minimum(scale, cfg.max_grad_norm / (mx.sqrt(sq) + 1e-6))
        grads = tree_map(lambda g: g * scale, acc)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        if not math.isfinite(loss_val):
            raise CBDError(f"the loss became {loss_val} at step {step + 1}; lower --lr and resume")
        tok_since += tokens_per_step
        rec = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": loss_val,
               "lr": float(opt.learning_rate)}
        last = step + 1 == steps
        if (step + 1) % cfg.eval_every == 0 or last:
            rec["heldout_loss"] = heldout_loss(model, heldout, cfg)
        now = time.time()
        rec["tokens_per_s"] = tok_since / max(now - t_last, 1e-9)
        t_last, tok_since = now, 0
        metrics.append(rec)
        bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        bar.update(1)
        if rank == 0 and ((step + 1) % cfg.save_every == 0 and not last):
            _save_checkpoint(work, model, opt, step + 1, metrics)
        if stop_after is not None and step + 1 - start >= stop_after:
            break
    bar.close()
    return metrics


def write_training_outputs(out_tmp: Path, metrics: list[dict], title: str, heldout_before: float | None = None) -> None:
    """metrics.jsonl and loss.png beside the trained model (the held-out loss
    before training, when known, is the curve's first point)."""
    if heldout_before is not None:
        metrics = [{"step": 0, "tokens": 0, "heldout_loss": heldout_before}] + metrics
    with open(out_tmp / "metrics.jsonl", "w") as f:
        for m in metrics:
            f.write(json.dumps(m) + "\n")
    if metrics:
        plot_metrics(metrics, out_tmp / "loss.png", title)


def config_record(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def remove_work(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)

