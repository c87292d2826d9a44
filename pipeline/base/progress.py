"""Progress reporting that suits both a terminal and CI logs.

On a terminal a single line is redrawn in place; elsewhere (CI, pipes) only the
stage's start and end are printed, one line each, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence all progress output (for library use and tests)."""
    global _quiet
    _quiet = quiet


def log(message: str) -> None:
    """Print one status line to stderr."""
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


class Progress:
    """A progress counter for one stage.

    Args:
        desc: Stage name shown at the start of the line.
        total: Number of steps, if known.
    """

    def __init__(self, desc: str, total: int | None = None) -> None:
        self.desc = desc
        self.total = total
        self.count = 0
        self.postfix = ""
        self._tty = sys.stderr.isatty() and not _quiet
        self._start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        """Advance by `n` steps, optionally replacing the trailing text."""
        self.count += n
        if postfix is not None:
            self.postfix = postfix
        if self._tty:
            now = time.perf_counter()
            if now - self._last_draw > 0.1 or (self.total and self.count >= self.total):
                self._last_draw = now
                self._draw()

    def _draw(self) -> None:
        elapsed = time.perf_counter() - self._start
        if self.total:
            frac = min(self.count / self.total, 1.0)
            bar = "#" * int(frac * 24)
            head = f"{self.desc} [{bar:<24}] {self.count}/{self.total}"
        else:
            head = f"{self.desc} {self.count}"
        sys.stderr.write(f"\r{head} {elapsed:6.1f}s {self.postfix}\x1b[K")
        sys.stderr.flush()

    def close(self, summary: str | None = None) -> None:
        """Finish the stage with one summary line."""
        elapsed = time.perf_counter() - self._start
        text = summary if summary is not None else self.postfix
        if self._tty:
            sys.stderr.write("\r\x1b[K")
        log(f"{self.desc}: done in {elapsed:.1f}s {text}".rstrip())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items` while showing progress for stage `desc`."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = Progress(desc, total)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()
