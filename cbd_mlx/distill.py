"""Stepwise distillation of one anchor: a student (usually a child born by
``prune``) learns from its teacher on a token cache."""

from __future__ import annotations

import math
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .arch.anchor import Anchor, model_from_weights
from .data import cache_id, check_ids, open_cache, run_splits
from .errors import CBDError
from .evaluate import MAX_NLL
from .loader import anchor_sha256, check_checkpoint, load_anchor, same_tokenizer, tokenizer_fingerprint
from .losses import LossFn, heldout_sum
from .save import append_history, refuse_existing, write_model
from .teacher_cache import TeacherCache
from .train import CHECKPOINT, TrainConfig, config_record, remove_work, train, write_training_outputs

WORK_SUFFIX = ".partial"


def work_dir(out: Path) -> Path:
    """Where checkpoints live until the run ends (the same command resumes)."""
    return out.with_name(out.name + WORK_SUFFIX)


def check_data(cache_meta: dict, student: Anchor) -> None:
    if cache_meta.get("tokenizer_sha256") != tokenizer_fingerprint(student.path):
        raise CBDError(
            f"the token cache was made with another tokenizer ({cache_meta.get('tokenizer')}); "
            "rebuild it with `cbd-mlx data prepare --tokenizer STUDENT`"
        )


def check_run_size(cfg: TrainConfig) -> None:
    """A run has at least one step: with --grad-accum G one step is G micro-batches, and a step bigger than
    --tokens would run far past what was asked (a --grad-accum of 2**31 never ends)."""
    per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * mx.distributed.init().size()
    if cfg.grad_accum > 1 and per_step > cfg.tokens:
        raise CBDError(f"one step of --batch-size {cfg.batch_size} x --seq-len {cfg.seq_len} x --grad-accum "
                       f"{cfg.grad_accum} is {per_step:,} tokens, more than --tokens {cfg.tokens:,}: lower "
                       "--grad-accum")


def check_finite_loss(model, src: str | None, heldout, cfg: TrainConfig) -> None:
    """A model whose held-out loss is NaN/Inf (or so big its perplexity is) before any training is named as the
    cause (its weights overflow), not reported later as a diverging run that a lower --lr would fix, nor written
    into a record as ppl inf. A few held-out windows (a batch's size at most: no memory check has run yet)."""
    if model is None:
        return
    x = mx.array(heldout.batch(0, min(cfg.batch_size, 4)))
    loss = heldout_sum(model, x[:, :-1], x[:, 1:]) / x[:, 1:].size
    if not (math.isfinite(loss) and loss <= MAX_NLL):
        raise CBDError(f"{src} gives a loss of {loss} per token on the held-out text before any training (not a "
                       "number, or a perplexity beyond what a float holds): its weights overflow; check it with "
                       "`cbd-mlx eval` or use another checkpoint")


def distill(teacher_src: str | None, student_src: str, cache: Path, out: Path, cfg: TrainConfig, force: bool = False,
            log=print, stop_after: int | None = None, teacher_cache: Path | None = None, cache_k: int = 32,
            xvocab=None, loss_fn: LossFn | None = None) -> dict:
    """Train the student on the cache (with KD from the teacher when given)
    and write it to ``out`` with its training record in cbd.json.

    With ``teacher_cache`` the teacher's top-``cache_k`` log-probs are read
    from that directory (built there first when missing). ``loss_fn``
    (default: the loss ``cfg`` names) scores each batch (``losses.py``)."""
    out = Path(out)
    refuse_existing(out, force)
    student = load_anchor(student_src)
    teacher = load_anchor(teacher_src) if teacher_src else None
    if teacher is not None and (teacher.shape.vocab != student.shape.vocab
                                or not same_tokenizer(teacher.path, student.path)):
        raise CBDError("teacher and student use different tokenizers; distill within one chain (or use `bridge`)")
    meta, splits = open_cache(cache)
    check_data(meta, student)
    check_ids(meta, splits, student.shape.vocab, student_src)
    train_data, heldout, carved = run_splits(splits, cfg.seq_len, cfg.seed)
    if carved:
        log(f"the cache's held-out split is too small; holding out the last {len(heldout.tokens):,} training "
            "tokens instead")
    check_run_size(cfg)
    model = model_from_weights(student.config, student.weights)
    t_model = model_from_weights(teacher.config, teacher.weights) if teacher else None
    check_finite_loss(model, student_src, heldout, cfg)
    check_finite_loss(t_model, teacher_src, heldout, cfg)
    work = work_dir(out)
    check_checkpoint(work / CHECKPOINT)
    t0 = time.time()
    tc = _open_teacher_cache(teacher_cache, teacher, t_model, cfg, cache_k, meta, log)
    res = train(model, train_data, heldout, cfg, work, t_model, log=log, stop_after=stop_after,
                teacher_cache=tc, xvocab=xvocab, loss_fn=loss_fn)
    rank = mx.distributed.init().rank()
    if rank != 0:  # one writer per mlx.launch group
        return {"rank": rank}
    if not res.finished:
        return {"stopped_at": res.last.get("step", 0)}
    record = {
        "kind": "distill" if teacher else "train", "teacher": teacher_src,
        "teacher_cache": {"path": str(teacher_cache), "k": cache_k} if teacher_cache else None,
        "student": student_src, "data": {"cache": str(cache), "id": cache_id(meta), "tokens": meta["tokens"],
                                        "inputs": meta.get("inputs")},  # by folder: append_history compacts
        **_run_record(res, cfg, carved), "seconds": round(time.time() - t0, 1),
    }
    prov = dict(student.provenance)
    prov.pop("weights_sha256", None)
    prov = append_history(prov, record)
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    title = f"{record['kind']}: {Path(student_src).name}"
    write_model(out, student.config, weights, student.path, prov, force,
                extra=lambda tmp: write_training_outputs(tmp, res.metrics, title, res.heldout_before))
    remove_work(work)
    return record


def _open_teacher_cache(path: Path | None, teacher, t_model, cfg: TrainConfig, k: int, meta: dict, log):
    """The teacher's top-k cache at ``path`` (None without one)."""
    if path is None:
        return None
    if teacher is None:
        raise CBDError("--teacher-cache needs --teacher")
    if mx.distributed.init().size() > 1:
        raise CBDError("--teacher-cache is single-process for now; drop it under mlx.launch")
    tc = TeacherCache(path, t_model, k=k, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                      n_batches=cfg.steps(1) * cfg.grad_accum, vocab=teacher.shape.vocab,
                      teacher_sha256=anchor_sha256(teacher), data=cache_id(meta))
    if tc.n_filled:
        log(f"teacher cache {path}: {tc.n_filled} batches already computed")
    return tc


def _run_record(res, cfg: TrainConfig, carved: bool) -> dict:
    """What a training run's cbd.json record says about the run itself."""
    before, after = res.heldout_before, res.best_loss
    return {
        "config": config_record(cfg), "steps": res.last.get("step", 0), "tokens_seen": res.last.get("tokens", 0),
        "best_step": res.best_step, "rollbacks": res.rollbacks,
        "heldout": "carved from the end of train" if carved else "the cache's held-out split",
        "tokens_per_s": round(res.tokens_per_s, 1) if res.tokens_per_s else None,
        "heldout_loss_before": before, "heldout_loss_after": after, "heldout_loss_last": res.last.get("heldout_loss"),
        "heldout_ppl_before": float(np.exp(before)) if before is not None else None,
        "heldout_ppl_after": float(np.exp(after)) if after is not None else None,
    }
