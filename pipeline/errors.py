"""User-facing errors.

A user mistake (a missing file, a bad scheme, data that does not fit the model)
raises `EfrapError`; the CLI prints its message on one line and exits with code 2.
Anything else is a bug and keeps its traceback.
"""


class EfrapError(Exception):
    """An error caused by the user's input, reported as one line."""
