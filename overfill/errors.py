class OverfillError(Exception):
    """A user-facing error: bad input, a missing model, an incompatible pair.

    The CLI prints these as one line and exits non-zero; anything else is a bug
    and keeps its traceback.
    """


ECHO_LIMIT = 200
"""The most characters of a given value that an error message repeats: the value may be huge."""


def capped(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text`, cut to `limit` characters with a note of how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"
