"""User-facing errors.

A user mistake (a missing file, a bad scheme, data that does not fit the model)
raises `EfrapError`; the CLI prints its message on one line and exits with code 2.
Anything else is a bug and keeps its traceback.

Messages often quote untrusted text (node names, file names, metadata), so the CLI
prints them through `one_line`, which escapes control characters: a name holding a
newline cannot forge a second line of output.
"""

from __future__ import annotations


class EfrapError(Exception):
    """An error caused by the user's input, reported as one line."""


def one_line(text: str) -> str:
    """`text` with every control character escaped, so it prints as exactly one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class NotSupported(EfrapError):
    """A model uses something a part of the pipeline does not cover (an op, a layout).

    Callers that can go on without that part (a parity reference) catch it and say so.
    """
