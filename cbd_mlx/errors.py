"""The one exception type the CLI turns into a single clear error line."""


class CBDError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""
