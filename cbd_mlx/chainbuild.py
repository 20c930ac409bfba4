"""`chain build`: prune + distill each anchor from the previous one and write
the chain's manifest (the expensive, once-per-chain part of CBD)."""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from .arch.anchor import Anchor, model_from_weights
from .arch.shapes import Shape, config_for, format_size, solve_shape
from .bridge import bridge as run_bridge
from .calibration import cache_calibration
from .chain import MANIFEST_NAME, SHARED_DIR, SHARED_FILE, Chain, ChainAnchor, dump_chain, load_chain, load_chain_anchor
from .distill import distill
from .errors import CBDError
from .evaluate import perplexity
from .loader import anchor_sha256, load_anchor, read_provenance
from .method.lineage import MAX_STEP, check_steps, lineage_of, ranks_within
from .method.operators import subset
from .method.pruning import child_shape, prune_weights
from .method.ranking import placement, select
from .save import compact_records, read_json, write_model
from .train import TrainConfig

ANCHOR_MULTIPLE = 64  # anchor widths: multiples of 64 (mlx quantizes them in groups of 64)
CACHE_K = 32  # top-k of each step's teacher cache
STEP_METRICS = "metrics.chain.jsonl"  # a polished anchor's chain-step curve


def _entry(name: str, a: Anchor, parent: str | None) -> ChainAnchor:
    return ChainAnchor(name, f"anchors/{name}", a.n_params, a.shape, None, anchor_sha256(a), parent, True)


def _child_shape(parent: Anchor, n: int, keep_hidden: bool, log) -> Shape:
    """The child's shape, widths multiples of 64 when the parent allows (else
    32, else 8). With ``keep_hidden`` the residual width stays when some shape
    allows it: pruning it costs far more than layers or FFN channels (25% off
    SmolLM2-135M: held-out ppl 45.7 keeping hidden, 269 shrinking every width)."""
    for keep in (True, False) if keep_hidden else (False,):
        for multiple in (ANCHOR_MULTIPLE, 32, 8):
            try:
                return child_shape(parent, n, {"hidden": parent.shape.hidden} if keep else None, multiple=multiple)
            except CBDError:
                continue
        if keep:
            log(f"[chain] {format_size(n)} cannot keep hidden {parent.shape.hidden}; the hidden width shrinks too")
    return child_shape(parent, n, multiple=8)


def plot_chain(out: Path, entries: list[ChainAnchor], anchors_dir: Path,
               name: str | None = None) -> Path | None:
    """OUT/curves.png: every distilled anchor's held-out loss over its tokens
    (its chain step, then its polish from A0, dashed, when it had one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn, polish = 0, False
    for e in entries:
        d = anchors_dir / e.name
        polished = (d / STEP_METRICS).is_file()
        step = curve_points(d / (STEP_METRICS if polished else "metrics.jsonl"))
        if not step:
            continue
        line, = ax.plot(*zip(*step), "o-", ms=3, label=f"{e.name} (from {e.parent})")
        if polished and (more := curve_points(d / "metrics.jsonl")):
            t0 = step[-1][0]
            ax.plot([t0 + t for t, _ in more], [h for _, h in more], "o--", ms=3, color=line.get_color(),
                    label=f"{e.name}: polish from {entries[0].name}")
            polish = True
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    return save_curves(fig, ax, out / "curves.png", "distillation tokens",
                       f"chain {name or out.name}: each anchor distilled from the previous"
                       + ("\n(dashed: then from A0, held out on other windows)" if polish else ""))


def curve_points(f: Path) -> list[tuple[int, float]]:
    """(tokens, held-out loss) of a run's metrics.jsonl (none when it is missing)."""
    if not f.is_file():
        return []
    return [(m["tokens"], m["heldout_loss"]) for m in map(json.loads, f.read_text().splitlines())
            if m.get("heldout_loss") is not None and "event" not in m]


def save_curves(fig, ax, path: Path, xlabel: str, title: str) -> Path:
    """Label, save and close a held-out-loss plot."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out CE (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _rewrite_provenance(d: Path, update) -> None:
    """Apply ``update`` to d/cbd.json (atomically; the weights are untouched)."""
    prov = read_provenance(d)
    update(prov)
    tmp = d / "cbd.json.tmp"
    tmp.write_text(json.dumps(prov, indent=2))
    os.replace(tmp, d / "cbd.json")


def polish_anchors(out: Path, cache: Path, cfg: TrainConfig, names: list[str] | None = None, log=print,
                   teacher_cache: bool = True, suite: dict[str, np.ndarray] | None = None) -> list[str]:
    """Distill the chain's anchors once more, each from the source A0 (the
    best teacher there is) on other windows of the cache (seed + 1), for
    ``cfg.tokens`` tokens, in the order of ``names``. Every anchor shares one teacher cache, so A0's
    forward pass is paid once per token for the whole chain. The anchors keep
    their shapes and lineage; a polished anchor's children are re-pointed to
    its new weights hash. ``names``: the anchors to polish (default: all but
    A0). Resumable; anchors already polished are skipped. With ``suite``
    (token ids by text name), each polished anchor is scored on those texts
    beside A0 (`suite_scores`, recorded under ``suite`` in its cbd.json).
    Returns the names polished by this call."""
    out = Path(out)
    anchors_dir = out / "anchors"
    chain = load_chain(out / MANIFEST_NAME).anchors
    a0 = chain[0].name
    known = [e.name for e in chain[1:]]
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise CBDError(f"--polish: the chain has no anchor {', '.join(unknown)}; its anchors: {', '.join(known)}")
    cfg_p = replace(cfg, seed=cfg.seed + 1)
    tc = out / ".work" / "teacher-cache-polish" if teacher_cache else None
    done = []
    order = [e for e in chain[1:] if names is None or e.name in names]
    if names is not None:  # in the order given
        order.sort(key=lambda e: names.index(e.name))
    for e in order:
        d, new, old = _finish_swap(anchors_dir, e.name)
        a = load_anchor(str(d))
        if _polished_on(a.provenance.get("polished"), cache, cfg_p):
            continue
        sha = anchor_sha256(a)
        if not _finished_polish(new, anchors_dir / a0, d, cfg_p):  # else: written before an interruption
            log(f"[chain] {e.name}: polish from {a0} on {cfg_p.tokens:,} tokens")
            distill(str(anchors_dir / a0), str(d), cache, new, cfg_p, force=True, log=log, teacher_cache=tc,
                    cache_k=CACHE_K)
        rec = {"teacher": a0, "tokens": cfg_p.tokens, "seed": cfg_p.seed, "from_sha256": sha,
               "data": str(Path(cache).resolve())}
        _rewrite_provenance(new, lambda p: p.update(polished=rec))
        if (d / "metrics.jsonl").is_file():
            shutil.copy2(d / "metrics.jsonl", new / STEP_METRICS)
        os.rename(d, old)
        os.rename(new, d)
        shutil.rmtree(old, ignore_errors=True)
        _repoint_children(anchors_dir, chain)  # the manifest and the lineage follow each swap at once
        _refresh_manifest(out)
        rec = read_provenance(d)["history"][-1]
        log(f"[chain] {e.name}: held-out ppl {rec['heldout_ppl_before']:.1f} -> {rec['heldout_ppl_after']:.1f} "
            f"after polishing")
        record_suite(out, e.name, a0, suite, log)
        done.append(e.name)
    _repoint_children(anchors_dir, chain)
    if tc is not None:  # every named anchor is polished now
        shutil.rmtree(tc, ignore_errors=True)
    return done


def suite_scores(model_dir: Path, suite: dict[str, np.ndarray], ref: dict[str, float] | None = None) -> dict:
    """Perplexity of a model on each text of ``suite``; with ``ref`` (the
    source's), the ratio per text and their mean."""
    a = load_anchor(str(model_dir))
    m = model_from_weights(a.config, a.weights)
    ppl = {k: perplexity(m, t, progress=False)["ppl"] for k, t in suite.items()}
    if not ref:
        return {"ppl": ppl}
    ratio = {k: ppl[k] / ref[k] for k in ppl}
    return {"ppl": ppl, "ratio": ratio, "mean_ratio": float(np.mean(list(ratio.values())))}


def record_suite(out: Path, name: str, a0: str, suite: dict[str, np.ndarray] | None, log) -> None:
    """Score anchor ``name`` of the chain at ``out`` on ``suite`` beside its
    source ``a0`` (whose scores are kept in OUT/.work/suite-a0.json) and record it."""
    if not suite:
        return
    ref_file = out / ".work" / "suite-a0.json"
    ref = json.loads(ref_file.read_text()) if ref_file.is_file() else {}
    if set(ref) != set(suite):
        ref = suite_scores(out / "anchors" / a0, suite)["ppl"]
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(json.dumps(ref))
    scores = suite_scores(out / "anchors" / name, suite, ref) | {"source": a0, "source_ppl": ref}
    _rewrite_provenance(out / "anchors" / name, lambda p: p.update(suite=scores))
    log(f"[chain] {name}: suite ppl " + ", ".join(f"{k} {v:.1f} ({scores['ratio'][k]:.2f}x)"
                                                  for k, v in scores["ppl"].items())
        + f"; mean {scores['mean_ratio']:.2f}x {a0}")


def _polished_on(rec: dict | None, cache: Path, cfg: TrainConfig) -> bool:
    """Whether a polish record says this polish (this data, tokens, seed) is done;
    a chain can be polished again on other data."""
    if not rec:
        return False
    data = rec.get("data")
    return (data is None or data == str(Path(cache).resolve())) and rec.get("tokens") == cfg.tokens \
        and rec.get("seed") == cfg.seed


def unpack_chain(chain: Chain, out: Path, force: bool = False, log=print) -> Chain:
    """A full-precision working copy of a (packed) chain under ``out``, to
    polish, densify and pack again: every anchor an ordinary fp32 mlx-lm
    directory (the source copied), records and lineage kept, lineage re-pointed
    at the copies' hashes. Tensors the packed chain shares (a frozen embedding)
    are taken from the source at full precision when it has them."""
    out = Path(out)
    if (out / MANIFEST_NAME).exists() and not force:
        raise CBDError(f"{out} already holds a chain; choose another --out or pass --force")
    shared = chain.path.parent / SHARED_DIR / SHARED_FILE
    shared_names = set(mx.load(str(shared)).keys()) if shared.is_file() else set()
    entries, sha_of, src = [], {}, None
    for e in chain.anchors:
        a = load_chain_anchor(chain, e)
        prov = copy.deepcopy(a.provenance)
        if e.parent is None:
            src = a
            prov = {"kind": "source", "source": chain.source_of(e)}
        weights = dict(a.weights)
        for k in shared_names & set(weights):
            if src is not None and k in src.weights and src.weights[k].shape == weights[k].shape:
                weights[k] = src.weights[k]
        lin = prov.get("lineage")
        if lin and e.parent in sha_of:
            lin["parent_sha256"] = sha_of[e.parent]
        prov.pop("packed", None)
        d = out / "anchors" / e.name
        write_model(d, a.config, weights, a.path, prov, force=True)
        b = load_anchor(str(d))
        sha_of[e.name] = anchor_sha256(b)
        entries.append(_entry(e.name, b, e.parent))
        log(f"[unpack] {e.name}: {format_size(b.n_params)} written to {d}")
    c = replace(chain, path=out / MANIFEST_NAME, anchors=entries,
                description=chain.description + " (unpacked to fp32 for polishing)")
    _write_manifest(out, c)
    return load_chain(out / MANIFEST_NAME)


def insert_anchor(out: Path, big: str, small: str, size: int, name: str, log=print) -> Chain:
    """Densify a chain: a new anchor ``name`` of about ``size`` parameters
    between adjacent anchors ``big`` > ``small``, born as the Subset of ``big``
    that holds everything ``small`` was pruned to (so ``small`` is its child,
    lineage re-pointed). Distill it afterwards (``polish_anchors``)."""
    out = Path(out)
    chain = load_chain(out / MANIFEST_NAME)
    names = [e.name for e in chain.anchors]
    if name in names:
        raise CBDError(f"chain {chain.name} already has an anchor {name}")
    by = {e.name: e for e in chain.anchors}
    if big not in by or small not in by or by[small].parent != big:
        raise CBDError(f"{small} is not a child of {big} in chain {chain.name}; name two adjacent anchors")
    b, s = load_chain_anchor(chain, by[big]), load_chain_anchor(chain, by[small])
    if not s.n_params < size < b.n_params:
        raise CBDError(f"{format_size(size)} is not between {small} and {big}")
    sel_s, ranks, _ = lineage_of(s, b, None)
    fixed = {"hidden": b.shape.hidden} if s.shape.hidden == b.shape.hidden else None
    target = None
    for multiple in (ANCHOR_MULTIPLE, 32, 8):  # widths that quantize in groups of 64 when a shape allows
        try:
            target = solve_shape(b.family, b.template, s.shape, b.shape, size, fixed, multiple=multiple)
            break
        except CBDError:
            if multiple == 8:
                raise
    sel_t = select(b.shape, target, ranks, required=sel_s)
    lineage = sel_t.to_json() | {"method": "superset-of-child", "parent": b.source,
                                 "parent_sha256": anchor_sha256(b), "parent_shape": b.shape.as_dict(),
                                 "parent_ranking": ranks}
    d = out / "anchors" / name
    log(f"[chain] {name}: Subset of {big} -> {target}, holding {small}'s parts")
    write_model(d, config_for(b.family, b.config, target), subset(b.family, b.weights, b.shape, sel_t), b.path,
                {"kind": "pruned", "lineage": lineage, "parent": big, "inserted_between": [big, small]},
                force=True)
    mid = load_anchor(str(d))

    def repoint(p: dict) -> None:
        old = p["lineage"]
        p["lineage"] = {k: v for k, v in old.items() if k not in ("through",)} | \
            placement(sel_t, sel_s).to_json() | {"parent": mid.source, "parent_sha256": anchor_sha256(mid),
                                                 "parent_shape": target.as_dict(),
                                                 "parent_ranking": ranks_within(ranks, sel_t)}
        p["parent"] = name

    _rewrite_provenance(out / "anchors" / small, repoint)
    entries = []
    for e in chain.anchors:
        if e.name == small:
            entries.append(_entry(name, mid, big))
            e = replace(e, parent=name)
        entries.append(e)
    _write_manifest(out, replace(chain, anchors=entries))
    _refresh_manifest(out)
    return load_chain(out / MANIFEST_NAME)


def take_back_anchors(polished: Path, before: Path, keep: list[str], out: Path, log=print) -> Chain:
    """OUT: the working chain ``polished`` with the anchors named in ``keep``
    taken back from ``before`` (the same chain before a polish round, unpacked),
    for anchors whose polish did worse on the out-of-domain suite. Every
    child's lineage is re-pointed at its parent's weights as they are in OUT,
    and the manifest is rewritten; ``chain pack OUT`` ships it."""
    polished, before, out = Path(polished), Path(before), Path(out)
    names = [e.name for e in load_chain(polished / MANIFEST_NAME).anchors]
    missing = [n for n in keep if n not in names or not (before / "anchors" / n).is_dir()]
    if missing:
        raise CBDError(f"cannot take back {', '.join(missing)}: not an anchor of both {polished} and {before}")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(polished, out, ignore=shutil.ignore_patterns(".work", "*.new", "*.partial"))
    for name in keep:
        shutil.rmtree(out / "anchors" / name)
        shutil.copytree(before / "anchors" / name, out / "anchors" / name)
    for e in load_chain(out / MANIFEST_NAME).anchors[1:]:
        sha = anchor_sha256(load_anchor(str(out / "anchors" / e.parent)))
        if (read_provenance(out / "anchors" / e.name).get("lineage") or {}).get("parent_sha256") != sha:
            log(f"{e.name}: lineage re-pointed at {e.parent} {sha[:12]}")
            _rewrite_provenance(out / "anchors" / e.name, lambda p, sha=sha: p["lineage"].update(parent_sha256=sha))
    _refresh_manifest(out)
    return load_chain(out / MANIFEST_NAME)


def _finish_swap(anchors_dir: Path, name: str) -> tuple[Path, Path, Path]:
    """(anchor dir, its polish dir, its old dir), after finishing a polish swap
    that was interrupted between its two renames (or putting the old anchor
    back when the polish had not been written)."""
    d, new, old = anchors_dir / name, anchors_dir / f".{name}.polish", anchors_dir / f".{name}.old"
    if not d.exists() and old.exists():
        os.rename(new if (new / "cbd.json").exists() else old, d)
    if d.exists():
        shutil.rmtree(old, ignore_errors=True)
    return d, new, old


def _write_manifest(out: Path, chain: Chain) -> None:
    """OUT/chain.toml, written atomically."""
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(dump_chain(chain))
    os.replace(tmp, out / MANIFEST_NAME)


def _refresh_manifest(out: Path) -> None:
    """Rewrite OUT/chain.toml with the anchors' current hashes."""
    c = load_chain(out / MANIFEST_NAME)
    _write_manifest(out, replace(c, anchors=[_entry(e.name, load_anchor(str(out / "anchors" / e.name)), e.parent)
                                             for e in c.anchors]))


def _finished_polish(new: Path, teacher: Path, student: Path, cfg: TrainConfig) -> bool:
    """Whether ``new`` holds a finished polish of ``student`` from ``teacher``."""
    try:
        history = read_provenance(new)["history"]
        base = compact_records(read_provenance(student)).get("history", [])
        rec = history[-1]
    except (OSError, ValueError, KeyError, IndexError):
        return False
    same = lambda a, b: a is not None and Path(a).resolve() == Path(b).resolve()  # noqa: E731
    return (history[:-1] == base and same(rec.get("teacher"), teacher) and same(rec.get("student"), student)
            and rec.get("config", {}).get("tokens") == cfg.tokens and rec.get("config", {}).get("seed") == cfg.seed)


def _repoint_children(anchors_dir: Path, chain: list[ChainAnchor]) -> None:
    """A child pruned from an anchor that was polished afterwards names its
    parent's old weights hash; point it at the new one (same shapes, same
    channels: the lineage holds)."""
    for e in chain[1:]:
        pol = read_provenance(anchors_dir / e.parent).get("polished")
        child = anchors_dir / e.name
        lin = read_provenance(child).get("lineage") or {}
        if pol and lin.get("parent_sha256") == pol["from_sha256"]:
            new_sha = anchor_sha256(load_anchor(str(anchors_dir / e.parent)))
            _rewrite_provenance(child, lambda p: p["lineage"].update(parent_sha256=new_sha, parent_polished=True))


def build_chain(source: str, sizes: list[int], cache: Path, out: Path, cfg: TrainConfig,
                name: str | None = None, log=print, bridge: dict | None = None, keep_hidden: bool = True,
                max_step: float = MAX_STEP, teacher_cache: bool = True,
                step_tokens: list[int] | None = None, polish_tokens: int = 0,
                polish: list[str] | None = None, suite: dict[str, np.ndarray] | None = None) -> Chain:
    """Build (or resume building) a chain under ``out``; returns its manifest.

    Each anchor is pruned from the previous one (importance on calibration
    windows spread over the cache; lineage recorded) and distilled from it,
    the teacher's top-k log-probs cached under OUT/.work so that a resumed step
    does not pay the teacher again. With ``bridge`` (keys: source, prompts,
    size, max_new_tokens), A0 is a bridge anchor shaped after ``source`` and
    trained from ``bridge['source']``. ``step_tokens`` gives each step its own
    distillation budget (one per size) instead of ``cfg.tokens``. With
    ``polish_tokens``, the anchors named in ``polish`` (default: all) are then
    distilled from A0 for that many more tokens (`polish_anchors`). With
    ``suite`` (token ids by text name: held-out texts of other domains), every
    anchor is scored on it beside A0 after its step and its polish."""
    out, cache = Path(out), Path(cache)
    out.mkdir(parents=True, exist_ok=True)
    anchors_dir = out / "anchors"
    src, a0_name = _source_anchor(source, anchors_dir, cfg, bridge, log)
    check_steps(src.n_params, sizes, max_step)
    names = [f"a{i}-{format_size(n)}" for i, n in enumerate(sizes, start=1)]
    if polish and (unknown := sorted(set(polish) - set(names))):
        if any(u.startswith("a0-") for u in unknown):
            raise CBDError("--polish: A0 is the polish's teacher; name the anchors below it")
        raise CBDError(f"--polish: the chain will have no anchor {', '.join(unknown)}; its anchors: {', '.join(names)}")
    if step_tokens is not None and len(step_tokens) != len(sizes):
        raise CBDError(f"give one token budget per size ({len(sizes)}), or one for every step; got {len(step_tokens)}")
    if not (anchors_dir / a0_name / "cbd.json").exists():
        log(f"[chain] copying the source into {anchors_dir / a0_name}")
        write_model(anchors_dir / a0_name, src.config, src.weights, src.path, {"kind": "source", "source": source},
                    force=True)
    prev, prev_name = load_anchor(str(anchors_dir / a0_name)), a0_name
    entries = [_entry(a0_name, prev, None)]
    calib = []  # calibration windows, read once on the first prune
    for n in names:
        _finish_swap(anchors_dir, n)
    for i, (n, name_i) in enumerate(zip(sizes, names), start=1):
        cfg_i = replace(cfg, tokens=step_tokens[i - 1]) if step_tokens else cfg
        cur = _chain_step(out, prev, prev_name, name_i, n, cache, cfg_i, keep_hidden, teacher_cache, calib, log)
        if suite and "suite" not in cur.provenance:
            record_suite(out, name_i, a0_name, suite, log)
            cur = load_anchor(str(anchors_dir / name_i))
        entries.append(_entry(name_i, cur, prev_name))
        plot_chain(out, entries, anchors_dir, name)
        prev, prev_name = cur, name_i
    _repoint_children(anchors_dir, entries)
    meta = read_json(Path(cache) / "meta.json", "token cache")
    chain = Chain(name or out.name, src.family.name, meta.get("tokenizer", source), out / MANIFEST_NAME, entries,
                  f"built by cbd-mlx chain build from {source}")
    _write_manifest(out, chain)
    if polish_tokens:  # rewrites the manifest after each anchor it polishes
        polish_anchors(out, cache, replace(cfg, tokens=polish_tokens), polish, log, teacher_cache, suite)
        chain = load_chain(out / MANIFEST_NAME)
        plot_chain(out, chain.anchors, anchors_dir, chain.name)
    return chain


def _source_anchor(source: str, anchors_dir: Path, cfg: TrainConfig, bridge: dict | None, log) -> tuple[Anchor, str]:
    """(A0, its name in the chain): the source (copied in later), or a bridge
    anchor trained from ``bridge['source']`` into the source's family."""
    if bridge:
        a0_dir = anchors_dir / "a0-bridge"
        if not (a0_dir / "cbd.json").exists():
            log(f"[chain] a0-bridge: bridge distillation from {bridge['source']} into {source}'s family")
            run_bridge(bridge["source"], source, a0_dir, replace(cfg, loss="ce"), bridge["prompts"],
                       bridge.get("max_new_tokens", 128), size=bridge.get("size"), force=True, log=log)
        return load_anchor(str(a0_dir)), a0_dir.name
    src = load_anchor(source)
    return src, f"a0-{format_size(src.n_params)}"


def _chain_step(out: Path, prev: Anchor, prev_name: str, name: str, n: int, cache: Path, cfg: TrainConfig,
                keep_hidden: bool, teacher_cache: bool, calib: list, log) -> Anchor:
    """One chain step (resumable): ``name`` pruned from ``prev`` and distilled from it."""
    anchors_dir = out / "anchors"
    final = anchors_dir / name
    if not (final / "cbd.json").exists():
        pruned = anchors_dir / f".{name}.pruned"
        if not (pruned / "cbd.json").exists():
            shape = _child_shape(prev, n, keep_hidden, log)
            if not calib:
                calib.append(cache_calibration(cache))
            log(f"[chain] {name}: prune {prev_name} -> {shape} (calibration: {calib[0].size:,} tokens)")
            w, lineage = prune_weights(prev, shape, calib[0])
            prov = {"kind": "pruned", "lineage": lineage, "parent": prev_name}
            write_model(pruned, config_for(prev.family, prev.config, shape), w, prev.path, prov, force=True)
        log(f"[chain] {name}: distill from {prev_name} on {cfg.tokens:,} tokens")
        tc = out / ".work" / f"teacher-cache-{name}" if teacher_cache else None
        distill(str(anchors_dir / prev_name), str(pruned), cache, final, cfg, force=True, log=log,
                teacher_cache=tc, cache_k=CACHE_K)
        shutil.rmtree(pruned, ignore_errors=True)
        if tc is not None:
            shutil.rmtree(tc, ignore_errors=True)
    cur = load_anchor(str(final))
    teacher = str(anchors_dir / prev_name)  # this step's record (the first from its teacher), not a polish's
    rec = next((h for h in cur.provenance.get("history") or [] if h.get("teacher") == teacher), {})
    if rec.get("heldout_ppl_after"):
        log(f"[chain] {name}: held-out ppl {rec['heldout_ppl_before']:.1f} -> {rec['heldout_ppl_after']:.1f} "
            f"({rec.get('tokens_seen', 0):,} tokens, {rec.get('tokens_per_s') or 0:.0f} tokens/s)")
    return cur
