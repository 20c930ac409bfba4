"""Real English text offline, from Debian packages: the Python 3.11 docs
(reST sources), the Linux 6.1 docs, Jane Austen's six novels (inside an R
data file), and prose of other kinds and eras (``BROAD``): Ambrose Bierce's
*Devil's Dictionary* (1911 satire), the Jargon File (hacker slang and lore),
the GNOME user help (everyday how-to writing), the Debian project's
history, manifesto, social contract and constitution, the World English
Bible (narrative, law, poetry and letters in modern English) and five State
of the Union addresses (2010-2014 political speech). Cleaned, one document
per file, whole documents held out.

And an out-of-domain evaluation suite (``fetch_suite``): texts that share
nothing with that corpus (another author, era and genre each), never to be
distilled on: Melville's *Moby-Dick* (1851), Reuters newswire (1987) and
fortune-file quotations."""

from __future__ import annotations

import gzip
import html
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from tqdm import tqdm

from .data import is_heldout
from .errors import CBDError
from .loader import cache_dir
from .rdata import read_lazyload_db, unserialize
from .save import atomic_dir

PACKAGES = {
    "python": "python3.11-doc",
    "linux": "linux-doc-6.1",
    "austen": "r-cran-janeaustenr",
    "devil": "dict-devil",
    "jargon": "dict-jargon",
    "gnome": "gnome-user-docs",
    "history": "debian-history",
    "bible": "sword-text-web",
    "sotu": "r-cran-wordcloud",
}
LICENCES = {
    "python": "PSF License 2",
    "linux": "GPL-2.0",
    "austen": "public domain (Project Gutenberg texts; the R package is MIT)",
    "devil": "public domain (1911)",
    "jargon": "public domain",
    "gnome": "CC-BY-SA-3.0",
    "history": "GPL-2+ (project history); the social contract and constitution are Debian's, freely redistributable",
    "bible": "public domain (World English Bible; the SWORD packaging GPL-2+)",
    "sotu": "public domain (US government works; the R package is LGPL-2.1)",
}
BROAD = ("devil", "jargon", "gnome", "history", "bible", "sotu")  # the kinds of prose beyond docs and Austen
DICT_DOC_CHARS = 6_000  # a dictionary is cut into documents of about this size, at entry boundaries
HELDOUT_BOOKS = ("persuasion",)  # whole novels kept for evaluation (perplexity, cloze)
HELDOUT_DOC_FRACTION = 0.05

_ROLE = re.compile(r":[\w:+-]+:`(?:[^`<]*<)?([^`>]+)>?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")
_LITERAL = re.compile(r"``([^`]+)``")
_EMPH = re.compile(r"(?<![\w*])\*{1,2}([^*\n]+?)\*{1,2}(?![\w*])")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+<>_.:])\1{2,}\s*$")


def clean_rst(text: str) -> str:
    """reST -> plain text: directives, option lines, section rules, comments
    and substitution definitions dropped; roles, links and literals unwrapped."""
    out, skip_indent = [], None
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if stripped and indent <= skip_indent:
                skip_indent = None
            else:
                continue
        if stripped.startswith(".. "):
            # directive or comment: drop it and its indented body, except
            # prose-bearing admonitions, whose body stays
            if not re.match(r"\.\.\s+(note|warning|versionadded|versionchanged|deprecated|seealso|tip|important)::", stripped):
                skip_indent = indent
            continue
        if _UNDERLINE.match(line) or re.match(r"^\s*:[\w-]+:", line):
            continue
        line = _LINK.sub(r"\1", line)
        line = _ROLE.sub(r"\1", line)
        line = _LITERAL.sub(r"\1", line)
        line = _EMPH.sub(r"\1", line)
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def _download(package: str, dest: Path) -> Path:
    """apt-get download + dpkg -x (needs no installation, works as any user)."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise CBDError(f"'{tool}' is not available: `data fetch` needs a Debian-based system")
    r = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise CBDError(f"cannot download Debian package {package}: {msg} (try `apt-get update` first)")
    deb = next(dest.glob(f"{package}_*.deb"))
    root = dest / package
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, capture_output=True)
    deb.unlink()
    return root


def _is_heldout(name: str) -> bool:

    return is_heldout(name, HELDOUT_DOC_FRACTION)


def _write_docs(out: Path, source: str, docs, held: set[str] | None = None) -> dict:
    counts = {"train": 0, "heldout": 0}
    for name, text in docs:
        if len(text) < 200:
            continue
        split = "heldout" if (name in held if held is not None else _is_heldout(f"{source}/{name}")) else "train"
        path = out / split / source / (re.sub(r"[^\w.-]+", "_", name) + ".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        counts[split] += 1
    return counts


def _python_docs(root: Path):
    for f in sorted(root.rglob("_sources/**/*.rst.txt")):
        yield str(f.relative_to(root)).replace("/", "_"), clean_rst(f.read_text(errors="replace"))


def _linux_docs(root: Path):
    for f in sorted(root.rglob("Documentation/**/*.rst.gz")):
        yield str(f.relative_to(root)).replace("/", "_"), clean_rst(gzip.decompress(f.read_bytes()).decode(errors="replace"))


def _austen(root: Path):

    base = next(root.rglob("janeaustenr/data/Rdata.rdx")).with_suffix("")
    for title, lines in read_lazyload_db(base).items():
        text = "\n".join(line or "" for line in lines)
        yield title, re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _chunks(text: str, size: int = DICT_DOC_CHARS) -> list[str]:
    """Cut ``text`` at blank lines into pieces of about ``size`` characters."""
    out, cur = [], []
    for para in re.split(r"\n\s*\n", text):
        cur.append(para.rstrip())
        if sum(len(p) for p in cur) >= size:
            out.append("\n\n".join(cur).strip() + "\n")
            cur = []
    if cur:
        out.append("\n\n".join(cur).strip() + "\n")
    return out


def _dictd(root: Path, name: str):
    """A dictd database (``name.dict.dz``, gzip-compatible) as documents of
    whole entries; the database's own header entries and cross-reference
    braces are dropped."""
    text = gzip.decompress(next(root.rglob(f"dictd/{name}.dict.dz")).read_bytes()).decode(errors="replace")
    text = re.sub(r"^00-?database[^\n]*\n(?:[ \t]+[^\n]*\n|\n)*", "", text, flags=re.M)
    text = re.sub(r"[{}]", "", text).replace("\r\n", "\n")
    for i, doc in enumerate(_chunks(text)):
        yield f"{name}-{i:04d}", doc


def _devil(root: Path):
    yield from _dictd(root, "devil")


def _jargon(root: Path):
    yield from _dictd(root, "jargon")


def _paragraphs(xml: str) -> str:
    """Markup with blank lines at its block boundaries -> plain text: tags
    dropped, entities decoded, one paragraph per block, whitespace folded."""
    text = html.unescape(re.sub(r"<[^>]+>", "", xml))
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paras if p) + "\n"


def clean_mallard(xml: str) -> str:
    """A Mallard help page -> plain text: its <info> block dropped, one
    paragraph per block element, inline markup unwrapped."""
    xml = re.sub(r"<info>.*?</info>|<!--.*?-->", "", xml, flags=re.S)
    xml = re.sub(r"</?(p|title|item|section|note|list|steps|terms|tr|td|code|screen)\b[^>]*>", "\n\n", xml)
    return _paragraphs(xml)


def _gnome(root: Path):
    for f in sorted(root.rglob("help/C/*/*.page")):
        yield f"{f.parent.name}_{f.stem}", clean_mallard(f.read_text(errors="replace"))


def _history(root: Path):
    base = next(root.rglob("doc/debian-history"))
    files = [base / "docs/project-history.en.txt.gz", base / "debian-manifesto.gz",
             base / "social-contract.txt.gz", base / "constitution.txt.gz",
             *sorted((base / "dedication").glob("dedication-*[0-9].txt"))]
    for f in files:
        if f.is_file():
            raw = f.read_bytes()
            text = (gzip.decompress(raw) if f.suffix == ".gz" else raw).decode(errors="replace")
            for i, doc in enumerate(_chunks(text)):
                yield f"{f.name.split('.')[0]}-{i:03d}", doc


def clean_osis(xml: str) -> str:
    """OSIS markup (a SWORD module's verses) -> plain text: notes dropped, a
    paragraph break at each paragraph, chapter and title marker."""
    xml = re.sub(r"<note\b.*?</note>", " ", xml, flags=re.S)
    xml = re.sub(r"<title\b.*?</title>", "\n\n", xml, flags=re.S)
    xml = re.sub(r"<(div|chapter|lg)\b[^>]*/>", "\n\n", xml)
    xml = re.sub(r"<(l|lb)\b[^>]*/>", " ", xml)
    return _paragraphs(xml)


def _bible(root: Path):
    """The World English Bible (a SWORD zText module: zlib blocks indexed by
    ``*.bzs``, 12 bytes each: offset, size, plain size), one document per book
    cut into pieces of about ``DICT_DOC_CHARS``."""
    folder = next(root.rglob("modules/texts/ztext/*/"))
    for testament in ("ot", "nt"):
        index, blocks = (folder / f"{testament}.bzs").read_bytes(), (folder / f"{testament}.bzz").read_bytes()
        xml = b"".join(zlib.decompress(blocks[off: off + size])
                       for off, size, _ in struct.iter_unpack("<III", index)).decode(errors="replace")
        for book in re.split(r'(?=<div [^>]*type="book")', xml):
            name = re.search(r'osisID="([\w.]+)"', book)
            for i, doc in enumerate(_chunks(clean_osis(book))):
                yield f"{testament}-{name.group(1) if name else 'front'}-{i:03d}", doc


def _sotu(root: Path):
    """State of the Union addresses (2010-2014) from the R package wordcloud's
    ``SOTU`` data set (an R corpus object in a gzip'd .RData file)."""
    raw = gzip.decompress(next(root.rglob("wordcloud/data/SOTU.RData")).read_bytes())
    docs = unserialize(raw[5:])["SOTU"]  # skip the "RDX2\n" magic of a saved workspace
    for i, d in enumerate(docs["content"] if isinstance(docs, dict) else docs):
        text = "\n".join(d["content"]).replace("\r\n", "\n")
        for j, doc in enumerate(_chunks(re.sub(r"\n", "\n\n", text))):
            yield f"sotu-{i:02d}-{j:02d}", doc


READERS = {"python": _python_docs, "linux": _linux_docs, "austen": _austen, "devil": _devil,
           "jargon": _jargon, "gnome": _gnome, "history": _history, "bible": _bible, "sotu": _sotu}

# the out-of-domain suite: name -> (Debian package, licence, what it is)
SUITE = {
    "melville": ("r-cran-tokenizers", "public domain (Project Gutenberg text)",
                 "Herman Melville, Moby-Dick (1851): chapters 10-16, an American novel"),
    "news": ("r-cran-tm", "Reuters-21578, free for research use (as distributed with tm, GPL-3)",
             "80 Reuters newswire stories of 1987 (crude oil, acquisitions)"),
    "quotes": ("fortunes", "BSD-style (fortune-mod data files)",
               "quotations and jokes of many authors (fortune's wisdom, people, humorists, ... files)"),
}
SUITE_MIN_CHARS = 40_000  # about 10K tokens of English
SUITE_MAX_CHARS = 100_000
QUOTE_FILES = ("wisdom", "people", "humorists", "love", "politics", "science", "education", "law", "work",
               "food", "kids", "pets", "men-women", "sports", "platitudes", "miscellaneous")


def _melville(root: Path) -> str:

    base = next(root.rglob("tokenizers/data/Rdata.rdx")).with_suffix("")
    text = read_lazyload_db(base)["mobydick"][0].replace("\r\n", "\n")
    start = text.index("CHAPTER 10. A Bosom Friend.")
    end = text.index("CHAPTER 17. The Ramadan.")
    return re.sub(r"\n{3,}", "\n\n", text[start:end]).strip() + "\n"


def _news(root: Path) -> str:
    texts = root.rglob("tm/texts/**/*.xml")
    stories = []
    for f in sorted(texts):
        for body in re.findall(r"<BODY>(.*?)</BODY>", f.read_text(errors="replace"), flags=re.S):
            body = html.unescape(body).replace("REUTER", "").strip()
            stories.append(re.sub(r"\s*\n\s*", " ", body))
    return "\n\n".join(stories) + "\n"


def _quotes(root: Path) -> str:
    folder = next(root.rglob("games/fortunes"))
    items = []
    for name in QUOTE_FILES:
        f = folder / name
        if f.is_file():
            items += [q.strip() for q in f.read_text(errors="replace").split("\n%\n")]
    kept, size = [], 0
    for q in items:  # nothing by or about the corpus's author; about 25K tokens in all
        if q and "austen" not in q.lower() and size < SUITE_MAX_CHARS:
            kept.append(q)
            size += len(q) + 2
    return "\n\n".join(kept) + "\n"


SUITE_READERS = {"melville": _melville, "news": _news, "quotes": _quotes}


def fetch_suite(out: Path | None = None, force: bool = False) -> Path:
    """Write the out-of-domain evaluation suite under ``out`` (default: the
    user cache): one ``<name>.txt`` per text of ``SUITE`` and a README with
    sources and licences. Never distill on these."""
    out = Path(out) if out else cache_dir() / "eval-suite"
    with tempfile.TemporaryDirectory() as work, atomic_dir(out, force) as tmp:
        lines = []
        for name in tqdm(SUITE, desc="suite", unit="text"):
            package, licence, what = SUITE[name]
            root = _download(package, Path(work))
            text = SUITE_READERS[name](root)
            if len(text) < SUITE_MIN_CHARS:
                raise CBDError(f"{package} gave only {len(text):,} characters for '{name}'; the suite needs "
                               f"{SUITE_MIN_CHARS:,}: is the package the expected version?")
            (tmp / f"{name}.txt").write_text(text)
            lines.append(f"{name}.txt: {what}; Debian package {package}; {licence}; {len(text):,} characters")
            shutil.rmtree(root, ignore_errors=True)
        (tmp / "README.txt").write_text(
            "Out-of-domain evaluation suite made by `cbd-mlx data suite`: texts that share nothing with "
            "`data fetch`'s corpus (another author, era and genre each). Never distill on them.\n"
            + "\n".join(lines) + "\n")
    return out


def fetch(out: Path | None = None, sources: tuple[str, ...] = tuple(PACKAGES), force: bool = False) -> Path:
    """Build the corpus under ``out`` (default: the user cache): out/train/<source>/*.txt
    and out/heldout/<source>/*.txt, whole documents (and whole novels) held out."""
    out = Path(out) if out else cache_dir() / "corpus"
    unknown = set(sources) - set(PACKAGES)
    if unknown:
        raise CBDError(f"unknown corpus source(s) {sorted(unknown)}; choose from {sorted(PACKAGES)}")
    with tempfile.TemporaryDirectory() as work, atomic_dir(out, force) as tmp:
        summary = {}
        for src in tqdm(sources, desc="corpus", unit="package"):
            root = _download(PACKAGES[src], Path(work))
            held = set(HELDOUT_BOOKS) if src == "austen" else None
            summary[src] = _write_docs(tmp, src, READERS[src](root), held)
            shutil.rmtree(root, ignore_errors=True)
        lines = [f"{s}: {c['train']} train / {c['heldout']} held-out documents; {PACKAGES[s]}, {LICENCES[s]}"
                 for s, c in summary.items()]
        (tmp / "README.txt").write_text(
            "Corpus made by `cbd-mlx data fetch` from Debian packages "
            + ", ".join(PACKAGES[s] for s in sources) + ".\n" + "\n".join(lines) + "\n"
        )
    return out
