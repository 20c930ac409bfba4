"""Token caches: text tokenized once into memory-mapped uint32 files with a
document-level held-out split, read back as packed fixed-length sequences."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import CBDError
from .evaluate import check_text_file, encode_text, read_text
from .loader import load_tokenizer, resolve, tokenizer_fingerprint
from .save import atomic_dir, read_json

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}
CACHE_META = "meta.json"
SPLITS = ("train", "heldout")


def document_files(inputs: list[Path]) -> list[tuple[Path, str]]:
    """(file, id) of every text/jsonl file in ``inputs``; ids are relative to
    the input, so a corpus splits the same wherever it lives."""

    files = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += [(f, str(f.relative_to(p))) for f in sorted(p.rglob("*"))
                      if f.is_file() and (f.suffix in TEXT_SUFFIXES or f.suffix == ".jsonl")]
        else:
            files.append((check_text_file(p, "text or jsonl file"), p.name))
    if not files:
        raise CBDError("no text files found in the inputs")
    seen: dict[str, int] = {}
    unique = []
    for f, doc_id in files:  # two inputs with one name (a/doc.txt, b/doc.txt) stay two documents
        seen[doc_id] = seen.get(doc_id, 0) + 1
        unique.append((f, doc_id if seen[doc_id] == 1 else f"{doc_id}#{seen[doc_id]}"))
    return unique


def iter_documents(inputs: list[Path]):
    """(doc id, text): one per text file, one per jsonl line (its ``text``)."""
    yield from _read_documents(document_files(inputs))


def _read_documents(files: list[tuple[Path, str]]):
    for f, doc_id in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8", errors="replace") as fh:
                for i, line in enumerate(fh):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError, RecursionError):  # not JSON, numbers too long
                        raise CBDError(f"{f}:{i + 1}: each jsonl line needs a 'text' field") from None
                    if not isinstance(text, str):
                        raise CBDError(f"{f}:{i + 1}: 'text' is {type(text).__name__}, not a string; "
                                       "fix that line or drop it")
                    yield f"{doc_id}:{i}", text
        else:

            yield doc_id, read_text(f)


def split_documents(inputs: list[Path], fraction: float):
    """(split, doc id, text) of every document: the cache's train/held-out rule."""
    files = document_files(inputs)
    forced = forced_heldout(files, fraction)
    for doc_id, text in _read_documents(files):
        yield ("heldout" if is_heldout(doc_id, fraction) or doc_id in forced else "train"), doc_id, text


def forced_heldout(files: list[tuple[Path, str]], fraction: float) -> set[str]:
    """With a held-out fraction > 0 and 2+ text files of which the hash split
    holds none out, the one with the smallest hash (never an empty split)."""
    ids = [i for f, i in files if f.suffix != ".jsonl"]
    if fraction <= 0 or len(ids) < 2 or any(is_heldout(i, fraction) for i in ids):
        return set()
    return {min(ids, key=lambda i: hashlib.sha256(i.encode()).digest())}


def is_heldout(doc_id: str, fraction: float) -> bool:
    """Deterministic document-level split (by a hash of the document id)."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
    return (h % 1_000_000) < fraction * 1_000_000


def prepare(inputs: list[Path], tokenizer_src: str, out: Path, heldout_fraction: float = 0.05,
            force: bool = False) -> dict:
    """Tokenize ``inputs`` (files, folders, jsonl) into a cache directory
    (train.bin, heldout.bin, meta.json)."""
    if isinstance(inputs, (str, Path)):  # one input given bare, not a list of its characters
        inputs = [inputs]
    if not (isinstance(heldout_fraction, (int, float)) and 0 <= heldout_fraction < 1):
        raise CBDError("--heldout-fraction must be in [0, 1)")
    with atomic_dir(out, force) as tmp:
        return tokenize_into(tmp, inputs, tokenizer_src, heldout_fraction)


def tokenize_into(dest: Path, inputs: list[Path], tokenizer_src: str, heldout_fraction: float) -> dict:
    """Write a token cache's files into the folder ``dest``; returns its meta."""
    tok_dir = resolve(tokenizer_src)
    tok = load_tokenizer(tok_dir)
    eos = tok.eos_token_id
    counts = {s: 0 for s in SPLITS}
    docs = {s: 0 for s in SPLITS}
    max_id = -1
    dest.mkdir(parents=True, exist_ok=True)
    files = {s: open(dest / f"{s}.bin", "wb") for s in SPLITS}
    try:
        for split, _, text in tqdm(split_documents(inputs, heldout_fraction), desc="tokenize", unit="doc"):
            ids = encode_text(tok, text)
            if eos is not None:
                ids.append(eos)
            files[split].write(np.asarray(ids, dtype=np.uint32).tobytes())
            counts[split] += len(ids)
            docs[split] += 1
            max_id = max(max_id, max(ids, default=-1))
    finally:
        for f in files.values():
            f.close()
    if counts["train"] == 0:
        raise CBDError(f"no training tokens: all {docs['heldout']} document(s) went to the held-out split; "
                       "give more documents or a lower --heldout-fraction")
    meta = {
        "tokenizer": str(tokenizer_src),
        "tokenizer_sha256": tokenizer_fingerprint(tok_dir),
        "vocab_size": len(tok._tokenizer.get_vocab()),
        "max_token_id": max_id,
        "tokens": counts,
        "documents": docs,
        "heldout_fraction": heldout_fraction,
        "inputs": [str(p) for p in inputs],
    }
    (dest / CACHE_META).write_text(json.dumps(meta, indent=2))
    return meta


MIX_CHUNK = 4096


def mix_chunks(parts: list[np.ndarray], n_chunks: int, chunk: int, rng: np.random.Generator) -> np.ndarray:
    """``n_chunks`` chunks of ``chunk`` tokens from each of ``parts`` (at
    random aligned offsets, none twice), shuffled together."""
    picks = []
    for a in parts:
        starts = rng.choice(len(a) // chunk, size=n_chunks, replace=False) * chunk
        picks += [a[i:i + chunk] for i in np.sort(starts)]
    return np.concatenate([picks[i] for i in rng.permutation(len(picks))]) if picks else np.zeros(0, np.uint32)


def mix_caches(caches: list[Path], out: Path, seed: int = 0, chunk: int = MIX_CHUNK, force: bool = False) -> dict:
    """A token cache of equal shares of ``caches`` (one tokenizer): each split
    takes as many ``chunk``-token pieces from every cache as the smallest one
    holds, shuffled together, so a run on it sees each source equally."""
    if len(caches) < 2:
        raise CBDError("give two or more token caches to mix")
    opened = [open_cache(c) for c in caches]
    if len({m["tokenizer_sha256"] for m, _ in opened}) != 1:
        raise CBDError("these token caches were made with different tokenizers; prepare them with one")
    rng = np.random.default_rng(seed)
    splits = {}
    for s in SPLITS:
        n = min(len(a[s]) for _, a in opened) // chunk
        splits[s] = mix_chunks([a[s] for _, a in opened], n, chunk, rng)
    if len(splits["train"]) == 0:
        raise CBDError(f"the smallest cache holds fewer than {chunk} training tokens; nothing to mix")
    first = opened[0][0]
    meta = {"tokenizer": first.get("tokenizer"), "tokenizer_sha256": first["tokenizer_sha256"],
            "vocab_size": first.get("vocab_size"),
            "max_token_id": max(int(a.max()) for a in splits.values() if len(a)),
            "tokens": {s: int(len(a)) for s, a in splits.items()},
            "documents": {s: int(len(a)) // chunk for s, a in splits.items()},
            "inputs": [str(c) for c in caches],
            "mix": {"caches": [cache_id(m) for m, _ in opened], "chunk": chunk, "seed": seed}}
    with atomic_dir(out, force) as tmp:
        for s, a in splits.items():
            a.astype(np.uint32).tofile(tmp / f"{s}.bin")
        (tmp / CACHE_META).write_text(json.dumps(meta, indent=2))
    return meta


def open_cache(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, {split: memory-mapped uint32 tokens})."""
    path = Path(path)
    if not (path / CACHE_META).is_file():
        raise CBDError(f"{path} is not a token cache (no {CACHE_META}); make one with `cbd-mlx data prepare`")
    meta = read_json(path / CACHE_META, "token cache (rebuild it with `cbd-mlx data prepare`)")
    check_cache_meta(meta, path)
    arrays = {}
    for s in SPLITS:
        f = path / f"{s}.bin"
        if f.exists() and not f.is_file():
            raise CBDError(f"{f} is not a regular file (a pipe or a device?); the cache is damaged, rebuild it")
        n = f.stat().st_size // 4 if f.exists() else 0
        if n != meta["tokens"][s]:
            raise CBDError(f"{f} holds {n} tokens but meta.json says {meta['tokens'][s]}; the cache is damaged, rebuild it")
        arrays[s] = np.memmap(f, dtype=np.uint32, mode="r") if n else np.zeros(0, np.uint32)
    return meta, arrays


class PackedSequences:
    """Fixed-length windows of a token stream, visited in a seeded order that
    a step index fully determines (so a resumed run reads the same batches)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise CBDError(
                f"the token cache is too small: {len(tokens)} tokens, need more than {seq_len} per sequence"
            )

    def _order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_epoch", None) != epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def starts(self, index: int, batch_size: int) -> list[int]:
        """Stream positions of the ``index``-th batch's windows."""
        out = []
        for k in range(index * batch_size, (index + 1) * batch_size):
            epoch, pos = divmod(k, self.n)
            out.append(int(self._order(epoch)[pos]) * self.seq_len)
        return out

    def batch(self, index: int, batch_size: int) -> np.ndarray:
        """The ``index``-th batch: (batch_size, seq_len + 1) int32 (inputs and targets)."""
        return np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int32)
                         for s in self.starts(index, batch_size)])


def check_cache_meta(meta: dict, path: Path) -> None:
    """A token cache's meta.json: the fields a run reads, with their types."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    tokens = meta.get("tokens")
    ok = (isinstance(tokens, dict) and all(count(tokens.get(s)) for s in SPLITS)
          and isinstance(meta.get("tokenizer_sha256"), str)
          and (meta.get("max_token_id") is None or isinstance(meta["max_token_id"], int))
          and all(meta.get(k) is None or isinstance(meta[k], t)
                  for k, t in (("tokenizer", str), ("inputs", list), ("documents", dict), ("vocab_size", int))))
    if not ok:
        raise CBDError(f"{path / CACHE_META} has missing or wrong fields; the cache is damaged, rebuild it with "
                       "`cbd-mlx data prepare`")


def check_ids(meta: dict, splits: dict[str, np.ndarray], vocab: int, model: str) -> None:
    """Refuse a cache whose token ids do not fit the model's embedding rows:
    the largest id is computed from the token files, never taken from
    meta.json (an edited file would index past the embedding)."""
    top = max((int(a.max()) for a in splits.values() if len(a)), default=-1)
    if top >= vocab:
        raise CBDError(f"the token cache holds token id {top} but {model} has {vocab} embedding rows: its "
                       "tokenizer does not belong to this model; rebuild the cache with the model's own tokenizer")


def cache_id(meta: dict) -> str:
    """A token cache's identity (its tokenizer, inputs and counts)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


MIN_HELDOUT_SEQS = 8  # held-out windows a run needs; fewer and the tail of train is held out instead
CARVE_FRACTION = 0.05


def run_splits(splits: dict[str, np.ndarray], seq_len: int, seed: int,
               eval_seqs: int = MIN_HELDOUT_SEQS) -> tuple[PackedSequences, PackedSequences, bool]:
    """(train, held-out, carved) sequences for a training run. There is always
    a held-out split: when the cache's own is too small for ``eval_seqs``
    windows, the last 5% of the train tokens (at least ``eval_seqs`` windows)
    are held out instead and left out of training (carved=True)."""
    train, held = splits["train"], splits["heldout"]
    need = eval_seqs * seq_len + 1
    carved = len(held) < need
    if carved:
        n = max(need, int(len(train) * CARVE_FRACTION))
        if len(train) - n < seq_len + 1:
            raise CBDError(
                f"the token cache is too small: {len(train)} training tokens leave no room for a held-out "
                f"split of {need} tokens plus training data; give more text"
            )
        train, held = train[:-n], train[-n:]
    return PackedSequences(train, seq_len, seed), PackedSequences(held, seq_len, seed + 1), carved
