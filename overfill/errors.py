class OverfillError(Exception):
    """A user-facing error: bad input, a missing model, an incompatible pair.

    The CLI prints these as one line and exits non-zero; anything else is a bug
    and keeps its traceback.
    """
