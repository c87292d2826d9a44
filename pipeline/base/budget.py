"""A wall-time budget that long steps check as they go.

A scan's budget must bound its whole wall time, not only the stages it starts: a
calibration or a pass over 1,024 images at 224 x 224 takes minutes on a CPU. Code that
runs a budgeted job wraps it in `within(deadline)`; every long loop calls `check()`
between its batches (`pipeline.base.progress.Progress.update` does, so every step that
shows progress is interruptible), which raises `OutOfTime` once the deadline has passed.
Outside `within`, `check()` does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections.abc import Iterator

from pipeline.base.errors import EfrapError

_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("efrap_deadline", default=math.inf)


class OutOfTime(EfrapError):
    """The budget's deadline passed in the middle of a step."""


@contextlib.contextmanager
def within(deadline: float) -> Iterator[None]:
    """Run the block under `deadline` (a `time.perf_counter()` value; inf: none).

    A deadline set inside another keeps the earlier of the two.
    """
    token = _deadline.set(min(deadline, _deadline.get()))
    try:
        yield
    finally:
        _deadline.reset(token)


def check() -> None:
    """Raise `OutOfTime` when the deadline of the enclosing `within` has passed."""
    deadline = _deadline.get()
    if deadline != math.inf and time.perf_counter() >= deadline:
        raise OutOfTime("the time budget ran out")
