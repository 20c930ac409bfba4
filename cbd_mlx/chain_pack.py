"""`chain pack`: a built chain made small enough to ship. The source is
referenced by name (a packaged model or hub id, checked by sha256); the
distilled anchors are either quantized (tensors every anchor shares stored
once) or coded as low-bit deltas on the Subset of their parent
(`delta_store`), rebuilt on first use."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .arch.anchor import Anchor, model_from_weights
from .calibration import calibration_from
from .chain import MANIFEST_NAME, SHARED_DIR, SHARED_FILE, Chain, ChainAnchor, dump_chain, load_chain_anchor, reference
from .delta_store import materialize, parent_subset, write_delta_dir
from .errors import CBDError
from .evaluate import perplexity
from .export import eval_ppl
from .loader import anchor_sha256, load_anchor, read_provenance
from .method import delta
from .method.interpolation import grow
from .method.operators import Selection
from .quantize import CALIB_SEQ_LEN, CALIB_SEQS, bits_per_weight, quantize_anchor
from .save import DELTA_FILE, atomic_dir, compact_records, write_model, write_quantized


def pad_widths(a: Anchor, multiple: int) -> tuple[Anchor, dict | None]:
    """``a`` grown function-preservingly (zero channels appended at the end,
    norm gains/epsilon rescaled) so that hidden and ffn are multiples of
    ``multiple`` (MLX quantizes groups of 32/64/128 along the input axis). The
    lineage names the parent channels the new ones stand for (next by the
    parent's importance ranking). Returns (anchor, {axis: [old, new]} or None)."""
    import math

    s = a.shape
    up = lambda n, m: -(-n // m) * m  # noqa: E731
    hidden_step = multiple if a.family.tied_attention_width else math.lcm(multiple, s.heads)  # HF: hidden % heads
    t = replace(s, hidden=up(s.hidden, hidden_step), ffn=up(s.ffn, multiple))
    if t == s:
        return a, None
    weights, cfg = grow(a, t)
    prov = copy.deepcopy(a.provenance)
    lin = prov.get("lineage")
    if lin:
        rank = lin["parent_ranking"]
        used = set(lin["hidden"])
        lin["hidden"] = lin["hidden"] + [c for c in rank["hidden"] if c not in used][: t.hidden - s.hidden]
        lin["ffn"] = [f + [c for c in rank["ffn"][p] if c not in set(f)][: t.ffn - s.ffn]
                      for f, p in zip(lin["ffn"], lin["layers"])]
        if len(lin["hidden"]) < t.hidden or any(len(f) < t.ffn for f in lin["ffn"]):
            raise CBDError(f"cannot pad {a.source} to multiples of {multiple}: its parent is too narrow")
    padded = {"hidden": [s.hidden, t.hidden], "ffn": [s.ffn, t.ffn]}
    prov["padded"] = padded
    return Anchor(a.source, a.path, cfg, weights, a.family, t, prov, a.sha256), padded


def _extend_parent_ranking(lin: dict, padded: dict) -> None:
    """A child's record of its parent's ranking after the parent was padded:
    the new (zero) channels rank last."""
    rank = lin.get("parent_ranking")
    if not rank:
        return
    (h0, h1), (f0, f1) = padded["hidden"], padded["ffn"]
    rank["hidden"] = list(rank["hidden"]) + list(range(h0, h1))
    rank["ffn"] = [list(r) + list(range(f0, f1)) for r in rank["ffn"]]


def _compose_lineage(parent_lin: dict, lin: dict, through: str) -> dict:
    """A child's lineage relative to its grandparent, through a parent that
    the packed chain leaves out (its rankings are the grandparent's)."""
    sel = Selection.from_json(parent_lin).then(Selection.from_json(lin))
    out = {**lin, **sel.to_json()}
    for k in ("parent", "parent_sha256", "parent_shape", "parent_ranking"):
        out[k] = parent_lin.get(k)
    out["through"] = list(parent_lin.get("through", [])) + [through]
    return out


def _shared_tensors(models: list) -> set[str]:
    """Names of the tensors that are byte-identical in every one of ``models``
    (the frozen token embedding of a chain that kept its hidden width)."""
    if len(models) < 2:
        return set()
    digests = [{k: hashlib.sha256(np.array(v).tobytes()).hexdigest() for k, v in tree_flatten(m.parameters())}
               for m in models]
    return {k for k, d in digests[0].items() if all(other.get(k) == d for other in digests[1:])}


def pack_chain(chain: Chain, out: Path, bits: int, group_size: int, recipe: str | None = None,
               force: bool = False, method: str = "rtn", calib_text: Path | None = None, log=print,
               ship: list[str] | None = None, embed_bits: int | None = None,
               embed_group_size: int | None = None, eval_tokens: np.ndarray | None = None) -> Chain:
    """A shippable copy of a built chain: the source anchor referenced by name
    (packaged model or hub id, checked by sha256) instead of copied, the other
    anchors quantized (embeddings with ``embed_bits``/``embed_group_size``,
    default: as the layers);
    lineage records follow their packed parents' hashes.

    ``ship`` names the anchors to keep (default: all); a left-out anchor's
    children get lineage composed through it. Tensors identical in every
    shipped anchor (a frozen embedding) are stored once under shared/ and
    linked into each anchor's directory, which mlx-lm loads as it is. With
    ``eval_tokens`` each packed anchor's perplexity is compared with its
    full-precision one (recorded under ``packed`` in its cbd.json)."""
    embed_bits, embed_group_size = embed_bits or bits, embed_group_size or group_size
    names = [e.name for e in chain.anchors]
    unknown = sorted(set(ship or []) - set(names))
    if unknown:
        raise CBDError(f"chain {chain.name} has no anchor {', '.join(unknown)}; its anchors: {', '.join(names)}")
    entries, padded_parents, dropped, parent_of = [], {}, {}, {}
    pending = []  # (entry, anchor, model, config, provenance, old sha) of the anchors to write
    for e in chain.anchors:
        a = load_chain_anchor(chain, e)
        old_sha = anchor_sha256(a)
        ref = reference(a.provenance.get("source", "")) if a.provenance.get("kind") == "source" else None
        if ref is not None:
            src = load_anchor(ref.split(":", 1)[1], e.revision)
            if anchor_sha256(src) != old_sha:
                raise CBDError(f"{e.name}: '{ref}' no longer matches the copy the chain was built from")
            log(f"[pack] {e.name}: referenced as {ref}")
            entries.append(replace(e, source=ref, local=False, sha256=old_sha))
            continue
        prov = compact_records(copy.deepcopy(a.provenance))
        lin = prov.get("lineage")
        parent = e.parent
        if lin and e.parent in dropped:
            lin = prov["lineage"] = _compose_lineage(dropped[e.parent][0], lin, e.parent)
            prov["left_out"] = dropped[e.parent][1]  # the training records of the anchors it went through
            parent = parent_of[e.parent]
        if ship is not None and e.name not in ship and e.parent is not None:
            if lin:
                dropped[e.name] = (lin, list(prov.get("left_out", []))
                                   + [{"name": e.name, "history": prov.get("history", [])}])
                parent_of[e.name] = parent
            log(f"[pack] {e.name}: left out (its children's lineage goes through it)")
            continue
        q = dict(bits=bits, group_size=group_size, recipe=recipe, method=method, embed_bits=embed_bits,
                 embed_group_size=embed_group_size)
        a, model, cfg, prov = _quantized(a, prov, old_sha, padded_parents, q, calib_text, eval_tokens, log)
        pending.append((replace(e, parent=parent), a, model, cfg, prov, old_sha))
    with atomic_dir(out, force) as tmp:
        entries += _write_quantized_anchors(tmp, pending, log)
        packed = Chain(chain.name, chain.family, chain.tokenizer, Path(out) / MANIFEST_NAME, entries,
                       chain.description + f" (packed: {bits}-bit, group {group_size}{', ' + recipe if recipe else ''})")
        (tmp / MANIFEST_NAME).write_text(dump_chain(packed))
    return packed


DELTA_TOLERANCE = 0.03  # a delta-stored anchor may score at most 3% above its fp32 perplexity


def _mean_ratio(fp, q, texts: list[np.ndarray]) -> tuple[float, float, float]:
    """(mean ppl of fp, mean ppl of q, mean per-text ratio q/fp)."""
    pf = [perplexity(fp, t, progress=False)["ppl"] for t in texts]
    pq = [perplexity(q, t, progress=False)["ppl"] for t in texts]
    return float(np.mean(pf)), float(np.mean(pq)), float(np.mean([b / a for a, b in zip(pf, pq)]))


def code_anchor(a: Anchor, base: dict, tries: list[int], group_size: int, texts: list[np.ndarray] | None,
                tolerance: float, log) -> tuple[dict, dict, dict]:
    """(arrays, meta, record) of ``a`` coded on ``base`` with the first of
    ``tries`` bits whose perplexity on ``texts`` is within ``tolerance`` of fp32
    (the last when none is; the first without texts)."""
    fp = model_from_weights(a.config, a.weights) if texts else None
    for bits in tries:
        arrays, meta = delta.encode(a.weights, base, bits, group_size)
        rec = {"delta_bits": bits, "group_size": group_size,
               "bits_per_weight": round(delta.bits_per_weight(arrays, meta), 3)}
        if not texts:
            return arrays, meta, rec
        q = model_from_weights(a.config, delta.decode(base, arrays, meta))
        p_fp, p_q, ratio = _mean_ratio(fp, q, texts)
        rec |= {"ppl_full_precision": p_fp, "ppl_packed": p_q, "ratio": ratio, "eval_texts": len(texts)}
        log(f"[pack] {Path(a.path).name}: {bits}-bit delta: ppl {p_q:.2f} vs {p_fp:.2f} in fp32 ({ratio - 1:+.1%})")
        if ratio <= 1 + tolerance:
            break
    return arrays, meta, rec


def pack_deltas(chain: Chain, out: Path, bits: int | str = "auto", group_size: int = 64, force: bool = False,
                eval_texts: list[np.ndarray] | None = None, tolerance: float = DELTA_TOLERANCE,
                log=print) -> Chain:
    """A shippable copy of a built chain whose distilled anchors are low-bit
    deltas on the Subset of their parent as rebuilt (`delta`); the source is
    referenced by name and sha256. ``bits="auto"``: per anchor, the fewest of
    2/3/4/8 bits within ``tolerance`` of its fp32 perplexity on
    ``eval_texts`` (mean per-text ratio). The manifest pins each anchor's full
    weights; `init` rebuilds them on first use."""
    if bits == "auto" and not eval_texts:
        raise CBDError("--delta-bits auto needs --eval-data to measure each anchor against its fp32 perplexity")
    tries = list(delta.DELTA_BITS) if bits == "auto" else [int(bits)]
    entries, rebuilt, sha_of = [], {}, {}  # sha_of: the chain's own (unpacked) anchors' hashes
    with atomic_dir(out, force) as tmp:
        for e in chain.anchors:
            a = load_chain_anchor(chain, e)
            sha_of[e.name] = anchor_sha256(a)
            if e.parent is None:
                entry, rebuilt[e.name] = _source_entry(e, a, tmp, log)
                entries.append(entry)
                continue
            parent = rebuilt[e.parent]
            if (a.lineage or {}).get("parent_sha256") != sha_of.get(e.parent):  # has_lineage, parent not reloaded
                raise CBDError(f"{e.name} has no lineage in its parent {e.parent}; only a chain built by "
                               "`chain build` (or densified) can be delta-stored")
            arrays, meta, rec = code_anchor(a, parent_subset(parent, a.lineage), tries, group_size, eval_texts,
                                            tolerance, log)
            prov = compact_records(copy.deepcopy(a.provenance))
            prov["lineage"]["parent_sha256"] = anchor_sha256(parent)
            prov["packed"] = rec | {"from_sha256": sha_of[e.name]}
            dest = tmp / "anchors" / e.name
            write_delta_dir(dest, a.config, prov, arrays, meta)
            rebuilt[e.name] = load_anchor(str(materialize(dest, lambda: parent, None)))
            log(f"[pack] {e.name}: {rec['delta_bits']}-bit delta, {rec['bits_per_weight']:.2f} bits/weight, "
                f"{(dest / DELTA_FILE).stat().st_size / 1e6:.1f} MB")
            entries.append(replace(e, source=f"anchors/{e.name}", local=True, sha256=anchor_sha256(rebuilt[e.name]),
                                   params=a.n_params, shape=a.shape))
        packed = replace(chain, path=Path(out) / MANIFEST_NAME, anchors=entries,
                         description=chain.description.split(" (")[0]
                         + f" (packed: deltas on each parent's Subset, {bits}-bit, group {group_size})")
        (tmp / MANIFEST_NAME).write_text(dump_chain(packed))
    return packed


def _source_entry(e: ChainAnchor, a: Anchor, tmp: Path, log) -> tuple[ChainAnchor, Anchor]:
    """The packed chain's entry for its source: referenced by name when it is
    a packaged model or hub id (and still matches), else copied in full."""
    ref = reference(a.provenance.get("source", "")) if a.provenance.get("kind") == "source" else None
    if ref is None:
        write_model(tmp / "anchors" / e.name, a.config, a.weights, a.path, a.provenance)
        log(f"[pack] {e.name}: copied in full (not a packaged model or hub id)")
        return replace(e, source=f"anchors/{e.name}", local=True, sha256=anchor_sha256(a)), a
    src = load_anchor(ref.split(":", 1)[1], e.revision)
    if anchor_sha256(src) != anchor_sha256(a):
        raise CBDError(f"{e.name}: '{ref}' no longer matches the copy the chain was built from")
    log(f"[pack] {e.name}: referenced as {ref}")
    return replace(e, source=ref, local=False, sha256=anchor_sha256(src)), src


def _quantized(a: Anchor, prov: dict, old_sha: str, padded_parents: dict, q: dict, calib_text: Path | None,
               eval_tokens: np.ndarray | None, log):
    """(padded anchor, quantized model, its config, record) of one shipped
    anchor; ``q``: bits, group_size, recipe, method, embed_bits, embed_group_size."""
    name = Path(a.path).name
    a, pad = pad_widths(replace(a, provenance=prov), q["group_size"])
    prov = copy.deepcopy(a.provenance)
    lin = prov.get("lineage")
    if pad:
        log(f"[pack] {name}: widths padded for {q['group_size']}-groups: "
            + ", ".join(f"{k} {o}->{n}" for k, (o, n) in pad.items() if o != n))
        padded_parents[old_sha] = pad
    if lin and lin.get("parent_sha256") in padded_parents:
        _extend_parent_ranking(lin, padded_parents[lin["parent_sha256"]])
    prov["packed"] = {**q, "from_sha256": old_sha}
    calib = calibration_from(a.path, calib_text, CALIB_SEQS * CALIB_SEQ_LEN, CALIB_SEQ_LEN) \
        if q["method"] != "rtn" else None
    log(f"[pack] {name}: quantizing ({q['method']}, {q['bits']}-bit, groups of {q['group_size']})")
    model, cfg = quantize_anchor(a, q["bits"], q["group_size"], q["method"], q["recipe"], calib,
                                 fallback_bits=q["embed_bits"], fallback_group_size=q["embed_group_size"])
    if eval_tokens is not None:
        fp, qp = eval_ppl(model_from_weights(a.config, a.weights), eval_tokens), eval_ppl(model, eval_tokens)
        prov["packed"].update(ppl_full_precision=fp, ppl_packed=qp, eval_tokens=int(eval_tokens.size))
        log(f"[pack] {name}: held-out ppl {fp:.2f} in fp32, {qp:.2f} packed ({qp / fp - 1:+.1%})")
    return a, model, cfg, prov


def _write_quantized_anchors(tmp: Path, pending: list, log) -> list[ChainAnchor]:
    """Write the quantized anchors under ``tmp`` (tensors identical in all of
    them stored once in shared/, linked into each); their manifest entries."""
    shared = _shared_tensors([p[2] for p in pending])
    link = None
    if shared:
        first = dict(tree_flatten(pending[0][2].parameters()))
        (tmp / SHARED_DIR).mkdir()
        mx.save_safetensors(str(tmp / SHARED_DIR / SHARED_FILE), {k: first[k] for k in sorted(shared)},
                            metadata={"format": "mlx"})
        link = Path("..") / ".." / SHARED_DIR / SHARED_FILE
        size = (tmp / SHARED_DIR / SHARED_FILE).stat().st_size
        log(f"[pack] {len(shared)} tensors identical in every anchor ({', '.join(sorted(shared)[:3])}"
            f"{', ...' if len(shared) > 3 else ''}) stored once: {size / 1e6:.1f} MB")
    entries, renamed = [], {}
    for e, a, model, cfg, prov, old_sha in pending:
        lin = prov.get("lineage")
        if lin and lin.get("parent_sha256") in renamed:
            lin["parent_sha256"] = renamed[lin["parent_sha256"]]
        dest = tmp / "anchors" / e.name
        write_quantized(dest, model, cfg, a.path, prov, shared=(shared, link) if shared else None)
        renamed[old_sha] = read_provenance(dest)["weights_sha256"]
        size = sum(f.stat().st_size for f in dest.glob("*.safetensors") if not f.is_symlink())
        log(f"[pack] {e.name}: {bits_per_weight(model):.2f} bits/weight, {size / 1e6:.1f} MB of its own")
        entries.append(replace(e, source=f"anchors/{e.name}", local=True, sha256=renamed[old_sha],
                               params=a.n_params, shape=a.shape))
    return entries
