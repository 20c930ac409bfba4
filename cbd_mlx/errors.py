"""The one exception type the CLI turns into a single clear error line."""


class CBDError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""


def check_count(name: str, value, low: int = 1, high: int | None = None) -> int:
    """``value`` as a whole number in [low, high], else a CBDError naming the
    option: the Python API refuses what the command line's typed options do."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise CBDError(f"{name} {value!r} is invalid: give a whole number {bound}")
    return value
