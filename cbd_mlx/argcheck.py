"""The Python API's argument check: what the command line's typed options
guarantee, for calls from Python.

``checked(fn)`` wraps an API function: every argument must have the type its
annotation names (a path a non-empty str or os.PathLike, a count a whole
number, a number finite, a flag True/False, a config its class with fields of
their types), and the ranges and choices the matching command-line options
have (``NAMED``, by parameter name). A bad argument is one CBDError naming
it, never a TypeError, ZeroDivisionError or AttributeError from deep inside.
Two conveniences: a bare path where a list of paths is expected becomes a
one-item list, and ``log=None`` means no log."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
import os
import types
import typing
from pathlib import Path

import numpy as np

from .arch.shapes import SHAPE_RULES
from .errors import CBDError
from .quantize import BITS, GROUP_SIZES, METHODS
from .save import SAFETENSORS_DTYPES, check_out_path

PATH_NAMES = {"calib", "out", "eval_data", "calib_text", "teacher_cache"}  # unannotated parameters that are paths
OWN_CHECK = {"size", "alpha"}  # parameters the functions read leniently and check themselves (size_of, alpha)


def _named() -> tuple[dict, dict]:
    """(ranges, choices) of parameters by name: the command line's options."""

    ranges = {"max_tokens": (1, None), "calib_tokens": (1, None), "eval_tokens": (1, None), "cache_k": (1, 1 << 16),
              "n_params": (1, None), "stop_after": (1, None), "polish_tokens": (0, None), "cloze": (0, None),
              "choice": (0, None), "seed": (0, (1 << 63) - 1)}
    choices = {"dtype": tuple(SAFETENSORS_DTYPES), "shape_rule": tuple(SHAPE_RULES), "method": tuple(METHODS),
               "bits": tuple(BITS), "group_size": tuple(GROUP_SIZES), "embed_bits": tuple(BITS),
               "embed_group_size": tuple(GROUP_SIZES)}
    return ranges, choices


def _describe(ann) -> str:
    """What an annotation asks for, in words."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple) or ann in (list, tuple):
        return {str: "a list of paths or names", Path: "a list of paths", int: "a list of whole numbers"}.get(
            args[0] if args else None, "a list")
    return {type(None): "None", str: "text or a path", Path: "a path", int: "a whole number",
            float: "a finite number", bool: "True or False", dict: "a dict"}.get(
        ann, _a(getattr(ann, "__name__", str(ann)) if origin is None else getattr(origin, "__name__", str(origin))))


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _fits(v, ann) -> bool:
    """Whether ``v`` has the type ``ann`` names (leniently for what a path or a list may be)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is typing.Any or isinstance(ann, str) or ann is inspect.Parameter.empty:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(v, a) for a in args)
    if ann is type(None):
        return v is None
    if ann is bool:
        return isinstance(v, (bool, np.bool_))
    if ann is int:
        return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
    if ann is float:
        return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)
    if ann in (str, Path):
        return isinstance(v, (str, os.PathLike)) and str(os.fspath(v)) != ""
    if origin in (list, tuple) or ann in (list, tuple):
        if not isinstance(v, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(v) == len(args) and all(_fits(x, a) for x, a in zip(v, args))
        return not args or all(_fits(x, args[0]) for x in v)
    if origin is dict or ann is dict:
        return isinstance(v, dict)
    if isinstance(ann, type):
        if not isinstance(v, ann):
            return False
        return not dataclasses.is_dataclass(v) or _bad_fields(v) is None
    return True  # callables, protocols: not checked here


def _bad_fields(obj) -> str | None:
    """'field value: give ...' of the first field of a dataclass instance whose value is not of its type."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in hints and not _fits(getattr(obj, f.name), hints[f.name]):
            return f"{f.name} {getattr(obj, f.name)!r} is invalid: give {_describe(hints[f.name])}"
    return None


def _hints(obj) -> dict:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # noqa: BLE001 - a name only importable elsewhere: evaluate the others one by one
        out = {}
        glb = getattr(obj, "__globals__", None) or vars(__import__(obj.__module__, fromlist=["_"]))
        for k, a in getattr(obj, "__annotations__", {}).items():
            try:
                out[k] = eval(a, glb) if isinstance(a, str) else a  # noqa: S307 - our own annotations
            except Exception:  # noqa: BLE001
                pass
        return out


def check_args(fn, bound: inspect.BoundArguments, hints: dict) -> None:
    """Refuse (CBDError) the first argument of ``bound`` outside its type, range or choices."""
    where = f"{fn.__name__}()"
    ranges, choices = _named()
    for name, v in bound.arguments.items():
        param = bound.signature.parameters[name]
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        ann = hints.get(name, inspect.Parameter.empty) if name not in OWN_CHECK else inspect.Parameter.empty
        if ann is inspect.Parameter.empty and name in PATH_NAMES:
            ann = Path | None
        if name == "log" and v is not None and not callable(v):
            raise CBDError(f"{where}: log {v!r} is invalid: give a function that takes a message, or None")
        if not _fits(v, ann):
            field = _bad_fields(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else None
            if field:
                raise CBDError(f"{where}: {name}.{field}")
            raise CBDError(f"{where}: {name} {_short(v)} is invalid: give {_describe(ann)}")
        if v is None:
            continue
        if name == "out":

            check_out_path(v)
        if name in ranges and isinstance(v, numbers.Integral):
            lo, hi = ranges[name]
            if v < lo or (hi is not None and v > hi):
                raise CBDError(f"{where}: {name} {v!r} is invalid: give a whole number "
                               + (f"{lo}..{hi}" if hi is not None else f">= {lo}"))
        if name in choices and not (any(v == c for c in choices[name])
                                    and not isinstance(v, (bool, float, complex, np.bool_))):
            raise CBDError(f"{where}: {name} {v!r} is invalid: choose one of "
                           f"{', '.join(repr(c) for c in choices[name])}")


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def checked(fn):
    """``fn`` with its arguments checked (see the module's docstring)."""
    sig = inspect.signature(fn)
    hints = _hints(fn)
    lists = {n for n, a in hints.items() if typing.get_origin(a) is list
             and typing.get_args(a) and typing.get_args(a)[0] in (Path, str)}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise CBDError(f"{fn.__name__}(): {e}") from None
        for name in lists & set(bound.arguments):
            if isinstance(bound.arguments[name], (str, os.PathLike)):  # one path given bare: a list of one
                bound.arguments[name] = [bound.arguments[name]]
        if "log" in bound.arguments and bound.arguments["log"] is None:
            bound.arguments["log"] = lambda *_: None
        check_args(fn, bound, hints)
        return fn(*bound.args, **bound.kwargs)

    return wrapper
