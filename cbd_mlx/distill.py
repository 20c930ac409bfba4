"""Stepwise distillation of one anchor: a student (usually a child born by
``prune``) learns from its teacher on a token cache."""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from .data import PackedSequences, open_cache
from .errors import CBDError
from .models import Anchor, load_anchor, model_from_weights, same_tokenizer, tokenizer_fingerprint, write_model
from .train import TrainConfig, config_record, heldout_loss, remove_work, train, write_training_outputs
from mlx.utils import tree_flatten

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


def distill(
    teacher_src: str | None,
    student_src: str,
    cache: Path,
    out: Path,
    cfg: TrainConfig,
    force: bool = False,
    log=print,
    stop_after: int | None = None,
    teacher_cache: Path | None = None,
    cache_k: int = 32,
    xvocab=None,
) -> dict:
    """Train the student on the cache (with KD from the teacher when given)
    and write it to ``out`` with its training record in cbd.json.

    With ``teacher_cache`` the teacher's top-``cache_k`` log-probs are read
    from that directory (built there first when missing)."""
    if out.exists() and not force:
        raise CBDError(f"{out} already exists; choose another --out or pass --force to replace it")
    student = load_anchor(student_src)
    teacher = load_anchor(teacher_src) if teacher_src else None
    if teacher is not None:
        if teacher.shape.vocab != student.shape.vocab or not same_tokenizer(teacher.path, student.path):
            raise CBDError("teacher and student use different tokenizers; distill within one chain (or use `bridge`)")
    meta, splits = open_cache(cache)
    check_data(meta, student)
    train_data = PackedSequences(splits["train"], cfg.seq_len, cfg.seed)
    heldout = PackedSequences(splits["heldout"], cfg.seq_len, cfg.seed + 1) if len(splits["heldout"]) > cfg.seq_len else None
    model = model_from_weights(student.config, student.weights)
    t_model = model_from_weights(teacher.config, teacher.weights) if teacher else None
    before = heldout_loss(model, heldout, cfg)
    work = work_dir(out)
    t0 = time.time()
    tc = None
    if teacher_cache is not None:
        if teacher is None:
            raise CBDError("--teacher-cache needs --teacher")
        from .models import anchor_sha256
        from .teacher_cache import TeacherCache, build_cache

        world = mx.distributed.init().size()
        if world > 1:
            raise CBDError("--teacher-cache is single-process for now; drop it under mlx.launch")
        n_batches = cfg.steps(1) * cfg.grad_accum
        if not Path(teacher_cache, "teacher_cache.json").exists():
            build_cache(t_model, train_data, cfg.batch_size, n_batches, cache_k, Path(teacher_cache),
                        anchor_sha256(teacher))
        tc = TeacherCache(teacher_cache)
        tc.check(cfg.batch_size, cfg.seq_len, cfg.seed, n_batches, anchor_sha256(teacher))
    metrics = train(model, train_data, heldout, cfg, work, t_model, log=log, stop_after=stop_after,
                    teacher_cache=tc, xvocab=xvocab)
    rank = mx.distributed.init().rank()
    if rank != 0:  # one writer per mlx.launch group
        return {"rank": rank}
    if stop_after is not None and metrics and metrics[-1]["step"] < cfg.steps(1):
        return {"stopped_at": metrics[-1]["step"]}
    after = metrics[-1].get("heldout_loss") if metrics else None
    record = {
        "kind": "distill" if teacher else "train",
        "teacher": teacher_src,
        "teacher_cache": {"path": str(teacher_cache), "k": cache_k} if teacher_cache else None,
        "student": student_src,
        "data": {"cache": str(cache), "tokens": meta["tokens"], "inputs": meta.get("inputs")},
        "config": config_record(cfg),
        "steps": metrics[-1]["step"] if metrics else 0,
        "tokens_seen": metrics[-1]["tokens"] if metrics else 0,
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "heldout_ppl_before": float(np.exp(before)) if before is not None else None,
        "heldout_ppl_after": float(np.exp(after)) if after is not None else None,
        "seconds": round(time.time() - t0, 1),
    }
    prov = dict(student.provenance)
    prov.pop("weights_sha256", None)
    prov["history"] = list(prov.get("history", [])) + [record]
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    title = f"{record['kind']}: {Path(student_src).name}"
    write_model(out, student.config, weights, student.path, prov, force,
                extra=lambda tmp: write_training_outputs(tmp, metrics, title, before))
    remove_work(work)
    return record
