"""The one MLX training loop behind distill, recover, bridge and the scratch
baseline, shaped like mlx-lm's trainer: it takes the loss as a function
(``losses.py``) and knows none of them.

Packed sequences from a memory-mapped token cache, gradient accumulation,
AdamW with warmup + cosine decay (a compiled update, clipping through
``optim.clip_grad_norm``, or its rule with a numpy norm on the CPU),
held-out loss at intervals, checkpoints with exact resume, guards against
divergence, a metrics log, a loss-curve PNG, and data parallelism through
mx.distributed (``nn.average_gradients``; ``mlx.launch`` runs the same
command on several processes or machines).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from . import cpu_memory, losses
from .arch.anchor import build_model
from .data import PackedSequences
from .errors import CBDError, check_fits
from .losses import LOSSES, Batch, LossFn
from .save import atomic_dir

CHECKPOINT = "checkpoint"
EXPLODE_FACTOR = 3.0  # a step's loss above this many times the recent median is an explosion
EXPLODE_WINDOW = 16  # steps in that median (checked once 8 are known)
DIVERGE_FACTOR = 1.2  # a held-out loss above this many times the best so far is a divergence
MAX_ROLLBACKS = 3  # rollbacks (each halving the lr) before a run stops
# options a resumed run must share with the checkpoint it resumes
RESUME_KEYS = ("tokens", "batch_size", "seq_len", "grad_accum", "lr", "min_lr_ratio", "warmup_fraction",
               "weight_decay", "loss", "temperature", "ce_weight", "xvocab_weight", "freeze_embeddings", "seed")


@dataclass
class TrainConfig:
    tokens: int
    batch_size: int = 4
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 2.5e-4
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    min_warmup_steps: int = 10
    loss: str = "forward_kl"
    temperature: float = 1.0
    ce_weight: float = 0.0
    xvocab_weight: float = 0.0  # ULD cross-tokenizer loss (bridge), with targets passed to train()
    freeze_embeddings: bool = False  # token embeddings (and an untied output head) stay as they are
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    seed: int = 0

    def __post_init__(self):
        def bad(name, value, want):
            raise CBDError(f"{name} {value!r} is invalid: {want}")

        for name in ("tokens", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (2 if name == "seq_len" else 1):
                bad(f"--{name.replace('_', '-')}", v, "give a positive whole number")
        for name, lo, open_lo in (("lr", 0.0, True), ("temperature", 0.0, True), ("weight_decay", 0.0, False),
                                  ("ce_weight", 0.0, False), ("xvocab_weight", 0.0, False),
                                  ("max_grad_norm", 0.0, False), ("min_lr_ratio", 0.0, False),
                                  ("warmup_fraction", 0.0, False)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or (open_lo and v == lo):
                bad(f"--{name.replace('_', '-')}", v, f"give a finite number {'>' if open_lo else '>='} {lo:g}")
        if self.loss not in LOSSES:
            bad("--loss", self.loss, f"choose one of {', '.join(LOSSES)}")

    def steps(self, world: int) -> int:
        per_step = self.batch_size * self.seq_len * self.grad_accum * world
        return max(1, self.tokens // per_step)


def schedule(cfg: TrainConfig, steps: int):
    warmup = min(max(1, int(steps * cfg.warmup_fraction), cfg.min_warmup_steps), max(1, steps // 2))
    decay = optim.cosine_decay(cfg.lr, max(1, steps - warmup), cfg.lr * cfg.min_lr_ratio)
    return optim.join_schedules([optim.linear_schedule(cfg.lr * 0.01, cfg.lr, warmup), decay], [warmup])


@dataclass
class TrainResult:
    """What a run did: its metrics, the held-out loss before it, and the step
    whose weights it kept (the best by held-out loss; 0 = the start)."""

    metrics: list[dict]
    heldout_before: float | None = None
    best_step: int = 0
    best_loss: float | None = None
    rollbacks: int = 0
    finished: bool = True

    @property
    def last(self) -> dict:
        return self.metrics[-1] if self.metrics else {}

    @property
    def tokens_per_s(self) -> float | None:
        rates = [m["tokens_per_s"] for m in self.metrics if "tokens_per_s" in m]
        return statistics.median(rates) if rates else None


def _resume_record(cfg: TrainConfig) -> dict:
    c = asdict(cfg)
    return {k: c[k] for k in RESUME_KEYS}


def _save_checkpoint(work: Path, model: nn.Module, opt, state: dict, best) -> None:
    """Atomically replace work/checkpoint (weights, optimizer state, the run's
    state and the best weights so far when they are neither the start's nor
    the current ones)."""
    prev_best = work / CHECKPOINT / "best.safetensors"
    prev_state = _read_state(work)
    with atomic_dir(work / CHECKPOINT, force=True) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
        if best.step not in (0, state["step"]):
            if prev_state and prev_state["best_step"] == best.step and prev_best.is_file():
                os.link(prev_best, tmp / "best.safetensors")
            else:
                mx.save_safetensors(str(tmp / "best.safetensors"), dict(tree_flatten(best.params)))
        (tmp / "state.json").write_text(json.dumps(state))


def _read_state(work: Path) -> dict | None:
    f = work / CHECKPOINT / "state.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _load_checkpoint(work: Path, model: nn.Module, opt, cfg: TrainConfig):
    """(state, best params or None) of work/checkpoint, loaded into model and
    optimizer; None when there is none. Refuses a checkpoint of other options."""
    ck = work / CHECKPOINT
    if not (ck / "state.json").is_file():
        return None
    try:
        state = json.loads((ck / "state.json").read_text())
        if state.get("config") != _resume_record(cfg):
            old = state.get("config") or {}
            diff = ", ".join(f"--{k.replace('_', '-')} {old.get(k)}" for k in RESUME_KEYS
                             if old.get(k) != getattr(cfg, k))
            raise CBDError(f"{work} holds an interrupted run made with {diff or 'other options'}; rerun with "
                           f"those options to resume it, or delete {work} to start over")
        _check_state(state, cfg.steps(mx.distributed.init().size()))
        model.load_weights(list(mx.load(str(ck / "model.safetensors")).items()), strict=True)
        saved = mx.load(str(ck / "optimizer.safetensors"))
        want = dict(tree_flatten(opt.state))
        if set(saved) != set(want) or any(saved[k].shape != want[k].shape for k in want):
            raise ValueError("its optimizer state does not fit this model")
        opt.state = tree_unflatten(list(saved.items()))
        best = None
        if (ck / "best.safetensors").is_file():
            best = tree_unflatten(list(mx.load(str(ck / "best.safetensors")).items()))
        mx.eval(model.parameters(), opt.state)
        if not all(mx.isfinite(v).all().item() for _, v in tree_flatten([model.parameters(), opt.state])
                   if mx.issubdtype(v.dtype, mx.floating)):
            raise ValueError("it holds NaN or Inf weights")
    except (ValueError, RuntimeError, KeyError, TypeError, json.JSONDecodeError, RecursionError) as e:
        raise CBDError(f"checkpoint {ck} is damaged ({e}); delete it to start over") from None
    return state, best


def _check_state(state, steps: int) -> None:
    """The types and ranges of a checkpoint's state.json (ValueError if not)."""
    def whole(v, lo, hi):
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    def num(v, none=False):
        return (none and v is None) or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))

    ok = (isinstance(state, dict) and whole(state.get("step"), 0, steps) and isinstance(state.get("metrics"), list)
          and num(state.get("lr_scale")) and 0 < state["lr_scale"] <= 1 and whole(state.get("rollbacks"), 0, 10**6)
          and num(state.get("heldout_before"), True) and whole(state.get("best_step"), 0, state["step"])
          and num(state.get("best_loss"), True))
    if not ok:
        raise ValueError("its state.json has wrong types or out-of-range values")


def heldout_loss(model: nn.Module, data: PackedSequences | None, cfg: TrainConfig) -> float | None:
    """Mean next-token CE over the first ``cfg.eval_batches`` held-out batches."""
    if data is None:
        return None
    batches = (data.batch(i, cfg.batch_size) for i in range(min(cfg.eval_batches, max(1, data.n // cfg.batch_size))))
    total, n = losses.windows_nll(model, batches)
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


@dataclass
class _Point:
    """Parameters (and optimizer state) at a step: MLX arrays are immutable,
    so holding the trees costs no copy."""

    step: int
    params: dict
    opt_state: dict | None = None
    n_metrics: int = 0
    loss: float | None = None


INIT_STD = 0.02


def random_model(config: dict, seed: int = 0, std: float = INIT_STD) -> nn.Module:
    """A model of ``config`` initialized for training from scratch (GPT-2
    style): N(0, ``std``) matrices and embeddings, unit norm gains, zero biases."""

    mx.random.seed(seed)
    model = build_model(config)
    params = []
    for k, v in tree_flatten(model.parameters()):
        if v.ndim >= 2:
            params.append((k, mx.random.normal(v.shape) * std))
        else:
            params.append((k, mx.zeros(v.shape) if k.endswith("bias") else mx.ones(v.shape)))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def freeze_embeddings(model: nn.Module) -> None:
    """Freeze every token embedding and an untied output head (a tied head is
    the embedding itself)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) or (isinstance(m, nn.Linear) and name.split(".")[-1] == "lm_head"):
            m.freeze()


def _copy_tree(t):
    return tree_map(lambda x: x, t)


def _flat_np(a: mx.array) -> np.ndarray:
    """An evaluated MLX array as a flat numpy array (a view where MLX's buffer allows)."""
    return np.asarray(a).reshape(-1)


class _ScaledAdamW(optim.AdamW):
    """mlx's AdamW, with the gradients' scale (micro-batch mean, clipping)
    folded into its moment updates: ``grad_scale`` set (an array), the
    update is AdamW's on ``grad_scale * gradient`` without a pass that forms
    that product (a compiled step materializes it, as both moments read it:
    measured 0.45 -> 0.35 s per step on 60M parameters). The state is
    AdamW's own, so checkpoints are unchanged."""

    grad_scale: mx.array | None = None

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        if self.grad_scale is None:
            return super().apply_single(gradient, parameter, state)
        if self.bias_correction:
            return super().apply_single(gradient * self.grad_scale.astype(gradient.dtype), parameter, state)
        lr = self.learning_rate.astype(gradient.dtype)
        f = self.grad_scale.astype(gradient.dtype)
        b1, b2 = self.betas
        state["m"] = m = b1 * state["m"] + ((1 - b1) * f) * gradient
        state["v"] = v = b2 * state["v"] + ((1 - b2) * f * f) * mx.square(gradient)
        return parameter * (1 - lr * self.weight_decay) - lr * m / (mx.sqrt(v) + self.eps)


class _Updater:
    """AdamW with the run's schedule, its step compiled (mean over
    micro-batches, global-norm clipping, the update) with the model's and
    the optimizer's state as inputs and outputs, as mlx-lm compiles its step.
    ``lr_scale`` (halved by each rollback) is an array input, not a constant.

    On the CPU fast path the gradients' global norm is taken in numpy (one
    BLAS dot per array; MLX's CPU reduction is ~10x slower) and clipping
    becomes one factor that the compiled update folds into its pass."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, steps: int):
        base_lr = schedule(cfg, steps)
        self.model, self.max_norm = model, cfg.max_grad_norm
        self.held = {"lr_scale": mx.array(1.0), "model": model.state, "opt": None}
        self.opt = _ScaledAdamW(learning_rate=lambda s: self.held["lr_scale"] * base_lr(s),
                               weight_decay=cfg.weight_decay)
        self.opt.init(model.trainable_parameters())
        self.held["opt"] = self.opt.state
        self._step = mx.compile(self._apply, inputs=self.held, outputs=self.held)
        self._step_factor = mx.compile(self._apply_factor, inputs=self.held, outputs=self.held)

    def _apply(self, grads: dict, scale: mx.array) -> mx.array:
        grads = tree_map(lambda g: g * scale, grads)
        if self.max_norm > 0:
            grads, _ = optim.clip_grad_norm(grads, self.max_norm)
        return self._apply_factor(grads, None)

    def _apply_factor(self, grads: dict, factor: mx.array | None) -> mx.array:
        self.opt.grad_scale = factor
        try:
            self.opt.update(self.model, grads)
        finally:
            self.opt.grad_scale = None
        return self.opt.learning_rate

    def apply(self, grads: dict, scale: float) -> None:
        leaves = [g for _, g in tree_flatten(grads)]
        if losses.fast_cpu() and all(g.dtype == mx.float32 for g in leaves):
            factor = scale
            if self.max_norm > 0:
                norm = scale * math.sqrt(sum(float(np.dot(v, v)) for v in map(_flat_np, leaves)))
                factor *= min(self.max_norm / (norm + 1e-6), 1.0)  # optim.clip_grad_norm's rule
            mx.eval(self._step_factor(grads, mx.array(factor, mx.float32)), self.held)
            return
        mx.eval(self._step(grads, mx.array(scale, mx.float32)), self.held)

    @property
    def state(self) -> dict:
        return self.opt.state

    @state.setter
    def state(self, state: dict) -> None:
        self.opt.state = state
        self.opt.init(self.model.trainable_parameters())
        self.held["opt"] = self.opt.state

    @property
    def lr_scale(self) -> float:
        return float(self.held["lr_scale"])

    @lr_scale.setter
    def lr_scale(self, value: float) -> None:
        self.held["lr_scale"] = mx.array(value)

    @property
    def learning_rate(self) -> float:
        return float(self.opt.learning_rate)


class _Signals:
    """What each batch carries beside its tokens: the teacher's head output
    (or its cached top-k) and the bridge's ULD targets."""

    def __init__(self, teacher, teacher_cache, xvocab, train_data: PackedSequences, cfg: TrainConfig):
        self.teacher, self.cache, self.xvocab = teacher, teacher_cache, xvocab
        self.data, self.cfg = train_data, cfg

    def batch(self, index: int) -> Batch:
        b = mx.array(self.data.batch(index, self.cfg.batch_size))
        x, y = b[:, :-1], b[:, 1:]
        if self.cache is not None:
            t = self.cache.topk(index, x)
        else:
            t = losses.teacher_out(self.teacher, x) if self.teacher is not None else None
        u = self.xvocab.window(self.data.starts(index, self.cfg.batch_size), self.cfg.seq_len) if self.xvocab else None
        return Batch(x, y, t, u)


def _check_batch_memory(model: nn.Module, cfg: TrainConfig) -> None:
    """Refuse a batch whose logits alone would not fit in memory (a native crash otherwise)."""
    vocab = max((v.shape[0] for k, v in tree_flatten(model.parameters()) if k.endswith("embed_tokens.weight")
                 or k.endswith("wte.weight") or k.endswith("embed_in.weight")), default=0)
    check_fits(f"a batch of {cfg.batch_size} x {cfg.seq_len} tokens", 3 * 4 * cfg.batch_size * cfg.seq_len * vocab,
               "lower --batch-size or --seq-len (use --grad-accum for a bigger effective batch)")


class _Run:
    """One training run's state: step, metrics, the best and the last good
    points, rollbacks; the guards and checkpoints of ``train`` act on it.

    A non-finite step loss, or a held-out loss ``DIVERGE_FACTOR`` above the
    best so far, rolls back to the last good point and halves the lr
    (``MAX_ROLLBACKS`` times, then the run stops with one clear line); a step
    loss ``EXPLODE_FACTOR`` above the recent median is checked on the
    held-out split at once: rollback when that diverged too, else the batch
    is an outlier and its update is skipped. The model ends holding its best
    weights by held-out loss (the start's when training never improved on them)."""

    def __init__(self, model: nn.Module, heldout: PackedSequences | None, cfg: TrainConfig, work: Path, log,
                 teacher_cache):
        group = mx.distributed.init()
        self.rank, self.world = group.rank(), group.size()
        self.model, self.heldout, self.cfg, self.work, self.log, self.cache = model, heldout, cfg, work, log, \
            teacher_cache
        self.steps = cfg.steps(self.world)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.world
        self.opt = _Updater(model, cfg, self.steps)
        for d in (work, work / CHECKPOINT):
            if d.is_symlink():  # a run deletes and replaces files there: never in a directory it points to
                raise CBDError(f"{d} is a symbolic link; remove it (runs keep their checkpoints in a real directory)")
        work.mkdir(parents=True, exist_ok=True)
        initial = model.parameters()
        loaded = _load_checkpoint(work, model, self.opt, cfg)
        if loaded:
            state, best_params = loaded
            self.step, self.metrics = state["step"], state["metrics"]
            self.opt.lr_scale, self.rollbacks, self.before = state["lr_scale"], state["rollbacks"], \
                state["heldout_before"]
            best_params = {0: initial, self.step: model.parameters()}.get(state["best_step"], best_params)
            self.best = _Point(state["best_step"], best_params, loss=state["best_loss"])
            log(f"resuming from step {self.step}/{self.steps} ({work / CHECKPOINT})")
        else:
            self.step, self.metrics, self.rollbacks = 0, [], 0
            self.before = heldout_loss(model, heldout, cfg)
            self.best = _Point(0, initial, loss=self.before)
        self.good = _Point(self.step, model.parameters(), _copy_tree(self.opt.state), len(self.metrics))

    def rollback(self, why: str) -> None:
        """Back to the last good point at half the lr (or stop, after MAX_ROLLBACKS)."""
        self.rollbacks += 1
        lr = self.cfg.lr * self.opt.lr_scale
        if self.rollbacks > MAX_ROLLBACKS:
            if self.cache is not None:
                self.cache.flush()
            raise CBDError(f"training diverged {self.rollbacks} times ({why}), the last at lr {lr:.2e}; lower --lr "
                           f"(try {lr / 4:.1e}) or check the data")
        self.opt.lr_scale = self.opt.lr_scale * 0.5
        self.model.update(self.good.params)
        self.opt.state = _copy_tree(self.good.opt_state)
        del self.metrics[self.good.n_metrics:]
        self.metrics.append({"step": self.good.step, "tokens": self.good.step * self.tokens_per_step,
                             "event": "rollback", "why": why, "lr_scale": self.opt.lr_scale})
        self.log(f"{why}: rolled back to step {self.good.step}, lr x{self.opt.lr_scale:g} "
                 f"({self.rollbacks}/{MAX_ROLLBACKS})")
        self.step = self.good.step

    def gradients(self, loss_and_grad, signals: _Signals):
        """(mean loss, summed gradients) of this step's micro-batches, averaged over processes."""
        acc, loss_sum = None, 0.0
        for micro in range(self.cfg.grad_accum):
            index = (self.step * self.cfg.grad_accum + micro) * self.world + self.rank
            loss, grads = loss_and_grad(self.model, signals.batch(index))
            acc = grads if acc is None else tree_map(mx.add, acc, grads)
            mx.eval(acc, loss)
            loss_sum += float(loss)
        loss_val = loss_sum / self.cfg.grad_accum
        if self.world > 1:
            acc = nn.average_gradients(acc)
            loss_val = float(mx.distributed.all_sum(mx.array(loss_val))) / self.world
        return loss_val, acc

    def guard_step(self, loss_val: float) -> str:
        """'ok', 'skip' (an outlier batch: the model is fine) or 'rollback' (done)."""
        recent = [m["loss"] for m in self.metrics[-EXPLODE_WINDOW:] if "loss" in m]
        if not math.isfinite(loss_val):
            self.rollback(f"the loss became {loss_val} at step {self.step + 1}")
            return "rollback"
        if len(recent) < 8 or loss_val <= EXPLODE_FACTOR * statistics.median(recent):
            return "ok"
        why = (f"the loss jumped to {loss_val:.3g} at step {self.step + 1} "
               f"(median of the last {len(recent)}: {statistics.median(recent):.3g})")
        h = heldout_loss(self.model, self.heldout, self.cfg)
        if h is None or not math.isfinite(h) or (self.best.loss is not None and h > DIVERGE_FACTOR * self.best.loss):
            self.rollback(why)
            return "rollback"
        self.log(f"{why}; the held-out loss is fine ({h:.3f}): skipping that batch's update")
        return "skip"

    def evaluate(self, rec: dict) -> bool:
        """Held-out loss into ``rec``; False when it diverged (rolled back)."""
        h = heldout_loss(self.model, self.heldout, self.cfg)
        rec["heldout_loss"] = h
        if h is not None and not math.isfinite(h):
            self.rollback(f"the held-out loss became {h} at step {self.step}")
            return False
        if h is not None and self.best.loss is not None and h > DIVERGE_FACTOR * self.best.loss:
            self.rollback(f"the held-out loss rose to {h:.3f} at step {self.step} (best {self.best.loss:.3f})")
            return False
        if h is not None and (self.best.loss is None or h < self.best.loss):
            self.best = _Point(self.step, self.model.parameters(), loss=h)
        return True

    def checkpoint(self) -> None:
        self.good = _Point(self.step, self.model.parameters(), _copy_tree(self.opt.state), len(self.metrics))
        if self.rank != 0:
            return
        if self.cache is not None:
            self.cache.flush()
        state = {"step": self.step, "metrics": self.metrics, "lr_scale": self.opt.lr_scale,
                 "rollbacks": self.rollbacks, "heldout_before": self.before, "best_step": self.best.step,
                 "best_loss": self.best.loss, "config": _resume_record(self.cfg)}
        _save_checkpoint(self.work, self.model, self.opt, state, self.best)

    def finish(self) -> TrainResult:
        """The result; a finished run's model holds its best weights by held-out loss."""
        if self.cache is not None:
            self.cache.flush()
        finished = self.step == self.steps
        best = self.best
        if finished and best.step != self.step and best.loss is not None:
            self.model.update(best.params)
            mx.eval(self.model.parameters())
            if best.step == 0:
                self.log(f"warning: the held-out loss never went below the start's ({best.loss:.3f}); the model "
                         "keeps its starting weights (try a lower --lr or more --tokens)")
            else:
                self.log(f"keeping the best weights by held-out loss: step {best.step} ({best.loss:.3f}; "
                         f"the last step had {self.metrics[-1].get('heldout_loss', float('nan')):.3f})")
        return TrainResult(self.metrics, self.before, best.step, best.loss, self.rollbacks, finished)


def train(model: nn.Module, train_data: PackedSequences, heldout: PackedSequences | None, cfg: TrainConfig,
          work: Path, teacher: nn.Module | None = None, log=print, stop_after: int | None = None,
          teacher_cache=None, xvocab=None, loss_fn: LossFn | None = None) -> TrainResult:
    """Train ``model`` in place with ``loss_fn(model, batch)`` (default: the
    loss ``cfg`` names, ``losses.from_config``); checkpoints go to ``work``
    (resumed if present).

    Guarded (``_Run``): a diverging run rolls back to its last good point at
    half the lr; the model ends holding its best weights by held-out loss.

    Each process of an ``mlx.launch`` group reads its own slice of every
    global batch; gradients are averaged with ``nn.average_gradients``.
    ``stop_after`` ends the run after that many steps (tests use it).
    Batches carry ``teacher``'s head output, or its top-k from
    ``teacher_cache`` (a TeacherCache, computed once per batch), and the
    window of ``xvocab`` (uld.XVocabTargets) when given."""
    _check_batch_memory(model, cfg)
    if losses.fast_cpu():
        cpu_memory.keep_large_blocks()
    loss_fn = loss_fn or losses.from_config(cfg)
    needs_teacher = losses.reads_teacher(loss_fn)  # else the teacher's forward would be paid for nothing
    if cfg.freeze_embeddings:
        freeze_embeddings(model)
    run = _Run(model, heldout, cfg, work, log, teacher_cache)
    if teacher is not None:
        teacher.freeze()
    signals = _Signals(teacher if needs_teacher else None, teacher_cache if needs_teacher else None, xvocab,
                       train_data, cfg)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    bar = tqdm(total=run.steps, initial=run.step, desc="train", unit="step", disable=run.rank != 0)
    t_last, tok_since, done = time.time(), 0, 0
    while run.step < run.steps:
        loss_val, acc = run.gradients(loss_and_grad, signals)
        verdict = run.guard_step(loss_val)
        if verdict != "rollback":
            if verdict == "ok":
                run.opt.apply(acc, 1.0 / cfg.grad_accum)
            run.step += 1
            done += 1
            tok_since += run.tokens_per_step
            rec = {"step": run.step, "tokens": run.step * run.tokens_per_step, "loss": loss_val,
                   "lr": run.opt.learning_rate, **({"event": "skipped"} if verdict == "skip" else {})}
            last = run.step == run.steps
            if not ((run.step % cfg.eval_every == 0 or last) and not run.evaluate(rec)):
                now = time.time()
                rec["tokens_per_s"], t_last, tok_since = tok_since / max(now - t_last, 1e-9), now, 0
                run.metrics.append(rec)
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
                if run.step % cfg.save_every == 0 and not last:
                    run.checkpoint()
                if stop_after is not None and done >= stop_after:
                    break
                continue
        bar.reset(run.steps)  # rolled back
        bar.update(run.step)
    bar.close()
    return run.finish()


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

