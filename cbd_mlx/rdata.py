"""A small reader of R's serialization format (XDR, versions 2 and 3) and of
R lazy-load databases (.rdx/.rdb), enough to read character vectors such as
the novels in Debian's r-cran-janeaustenr. Read-only; nothing is executed."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path

from .errors import CBDError

NILVALUE, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 254, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, ENVSXP, GLOBALENV, EMPTYENV, BASEENV, MISSINGARG = 255, 4, 253, 242, 241, 251
NA_INT = -(2**31)


class _Reader:
    def __init__(self, data: bytes):
        self.d, self.i, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.d, self.i)
        self.i += 4
        return v

    def bytes(self, n: int) -> bytes:
        b = self.d[self.i : self.i + n]
        self.i += n
        return b

    def header(self) -> None:
        if self.bytes(2) != b"X\n":
            raise CBDError("not an R XDR serialization (only the binary XDR format is supported)")
        version = self.int()
        self.int(), self.int()  # writer's R version, minimal reader version
        if version == 3:
            self.bytes(self.int())  # native encoding

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if kind in (NILVALUE, GLOBALENV, EMPTYENV, BASEENV, MISSINGARG):
            return None
        if kind == REFSXP:
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if kind == SYMSXP:
            name = self.item()  # a CHARSXP
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            n = self.int()
            return None if n == -1 else self.bytes(n).decode("utf-8", errors="replace")
        if kind == LISTSXP:  # pairlist -> dict (tag -> value) or list
            out, tags = [], []
            while kind == LISTSXP:
                if has_attr:
                    self.item()
                tags.append(self.item() if has_tag else None)
                out.append(self.item())
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            if kind != NILVALUE:
                raise CBDError("unsupported R pairlist layout")
            return dict(zip(tags, out)) if all(tags) else out
        if kind in (LGLSXP, INTSXP):
            n = self.int()
            vals = list(struct.unpack_from(f">{n}i", self.d, self.i))
            self.i += 4 * n
            value = [None if v == NA_INT else v for v in vals]
        elif kind == REALSXP:
            n = self.int()
            value = list(struct.unpack_from(f">{n}d", self.d, self.i))
            self.i += 8 * n
        elif kind in (STRSXP, VECSXP):
            value = [self.item() for _ in range(self.int())]
        else:
            raise CBDError(f"unsupported R object type {kind}")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if names and kind == VECSXP:
                return dict(zip(names, value))
        return value


def unserialize(data: bytes):
    """A Python value (lists, dicts for named lists, str, int, float, None)."""
    r = _Reader(data)
    r.header()
    return r.item()


def _decompress(blob: bytes) -> bytes:
    """One object of an .rdb file: 4-byte length, then zlib (or a typed stream)."""
    (n,) = struct.unpack(">i", blob[:4])
    kind = blob[4:5]
    if kind == b"2":
        return bz2.decompress(blob[5:])
    if kind == b"3":
        return lzma.decompress(blob[5:])
    if kind == b"0":
        return blob[5 : 5 + n]
    return zlib.decompress(blob[4:])


def read_lazyload_db(base: Path) -> dict:
    """All variables of an R lazy-load database (``base``.rdx + ``base``.rdb)."""
    base = Path(base)
    try:
        index = unserialize(gzip.decompress(base.with_suffix(".rdx").read_bytes()))
        db = base.with_suffix(".rdb").read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise CBDError(f"cannot read the R database {base}: {e}") from None
    out = {}
    for name, (offset, length) in index["variables"].items():
        out[name] = unserialize(_decompress(db[offset : offset + length]))
    return out
