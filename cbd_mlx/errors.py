"""The one exception type the CLI turns into a single clear error line."""

import os
from contextlib import contextmanager


class CBDError(Exception):
    """A user-facing error: the message says what is wrong and what to do,
    on one line (line breaks of messages quoted from other libraries are
    folded)."""

    def __init__(self, message: object = "", *args):
        super().__init__(" ".join(str(message).split()), *args)


def check_count(name: str, value, low: int = 1, high: int | None = None) -> int:
    """``value`` as a whole number in [low, high], else a CBDError naming the
    option: the Python API refuses what the command line's typed options do."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise CBDError(f"{name} {value!r} is invalid: give a whole number {bound}")
    return value


def memory_bytes() -> int:
    """This machine's physical memory (bytes; 0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_fits(what: str, need_bytes: float, fix: str) -> None:
    """Refuse work whose arrays alone would exceed physical memory (a native
    crash otherwise), naming the option to lower."""
    total = memory_bytes()
    if total and need_bytes > total:
        raise CBDError(f"{what} needs about {need_bytes / 2**30:,.0f} GiB, more than this machine's "
                       f"{total / 2**30:.0f} GiB; {fix}")


@contextmanager
def translated(what: str):
    """Errors of another library's code (mlx-lm's tuner, generate, server) as
    one clear line naming it, instead of a traceback."""
    try:
        yield
    except (CBDError, KeyboardInterrupt, MemoryError, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - whatever the library raises
        text = " ".join(str(e).split())
        msg = text if text else type(e).__name__
        raise CBDError(f"{what} failed: {msg[:400]}") from None
