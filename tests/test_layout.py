"""The package's shape: no import circle among cbd_mlx modules (imports in
function bodies count: they hide the graph, they do not break it)."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest

from cbd_mlx import _blas

PKG = Path(__file__).resolve().parent.parent / "cbd_mlx"


def module_name(p: Path) -> str:
    """cbd_mlx/method/ranking.py -> "method.ranking" (a package: its folder's name)."""
    parts = p.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(p: Path) -> set[str]:
    """The modules ``p`` imports (absolute names), in any scope."""
    pkg = module_name(p).split(".")
    if p.name != "__init__.py":
        pkg = pkg[:-1]
    out = set()
    for n in ast.walk(ast.parse(p.read_text())):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg[: len(pkg) - (n.level - 1)] if n.level > 1 else pkg
                mod = ".".join(["cbd_mlx", *base, *([n.module] if n.module else [])])
            else:
                mod = n.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in n.names}  # `from . import delta` imports a module
        elif isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
    return out


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py") if module_name(p)}
    graph = {}
    for name, p in files.items():
        deps = {d.removeprefix("cbd_mlx.") for d in imports_of(p) if d.startswith("cbd_mlx.")}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# what reads or writes files: the standard library's file modules and the package's disk side
FILE_IO = {"os", "pathlib", "shutil", "tempfile", "json", "tomllib", "gzip", "safetensors", "huggingface_hub",
           "subprocess", "glob", "io"}
DISK_MODULES = {"loader", "save", "gguf", "chain", "chain_pack", "delta_store", "teacher_cache", "data", "corpus",
                "resources", "calibration", "evaluate", "rdata", "export", "convert", "cli"}


def test_the_method_does_no_file_io():
    """method/ (and what it imports from the package) reads and writes no
    files: arrays and anchors in, arrays out."""
    graph = import_graph()
    seen, todo = set(), [m for m in graph if m.startswith("method")]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    assert not seen & DISK_MODULES, f"method/ reaches disk modules: {sorted(seen & DISK_MODULES)}"
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    for m in sorted(m for m in seen if m.startswith("method")):
        stdlib = {d.split(".")[0] for d in imports_of(files[m]) if not d.startswith("cbd_mlx")}
        assert not stdlib & FILE_IO, f"{m} imports {sorted(stdlib & FILE_IO)}"


def test_the_method_package_holds_the_operators():
    names = {module_name(p) for p in PKG.rglob("*.py")}
    assert {"method.operators", "method.ranking", "method.pruning", "method.lineage", "method.interpolation",
            "method.delta"} <= names


def test_no_function_is_over_60_lines():
    long = []
    for p in PKG.rglob("*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60:
                long.append(f"{module_name(p)}.{n.name}: {n.end_lineno - n.lineno + 1} lines")
    assert long == []


def test_the_tests_run_mlx_on_openblas():
    """conftest imports cbd_mlx before MLX, so the test process binds MLX's
    matmuls to OpenBLAS (a reordered import once left the whole suite on the
    wheel's reference BLAS, ~25x slower matmuls)."""
    if sys.platform != "linux" or os.environ.get("CBD_NO_OPENBLAS") or \
            not any(os.path.exists(p) for p in _blas.OPENBLAS_CANDIDATES):
        pytest.skip("no OpenBLAS on this machine")
    assert _blas.BLAS is not None
