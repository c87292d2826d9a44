"""Progress reporting that suits both a terminal and CI logs.

On a terminal a single line is redrawn in place. Elsewhere (CI, pipes, log files) a
stage prints a line when it passes each tenth of its steps, at most one per
`LOG_GAP` seconds (so a short stage prints only its end line and a log stays
readable), and at least one per `LOG_EVERY` seconds (so a long one shows that it is
alive). Both show the stage's remaining time and, for a stage that is part of a
longer run (a layer of a quantization), the run's (`RunClock`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from pipeline.base import budget

T = TypeVar("T")

#: Outside a terminal: fewest seconds between two progress lines of a stage ...
LOG_GAP = 5.0
#: ... and most seconds between them (a line is due then even within a tenth).
LOG_EVERY = 30.0

_quiet = False
#: Warnings already printed by `warn_once` in this process.
_warned: set[str] = set()


def set_quiet(quiet: bool) -> None:
    """Silence all progress output (for library use and tests)."""
    global _quiet
    _quiet = quiet


def log(message: str) -> None:
    """Print one status line to stderr."""
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


def warn_once(message: str) -> None:
    """Print ``warning: MESSAGE`` to stderr the first time this process meets `message`.

    For facts about the inputs that every stage reading them would repeat (each of a
    self-checking defend's candidates and its audit reads the same calibration data).
    """
    if _quiet or message in _warned:
        return
    _warned.add(message)
    log(f"warning: {message}")


def format_seconds(seconds: float | None) -> str:
    """A duration for people: "42s", "3m05s", "1h02m" ("?" when unknown).

    Rounded up to the unit shown, so that a remaining time never reads 0 before the end.
    """
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = math.ceil(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"


def stage_remaining(count: int, total: int | None, elapsed: float) -> float | None:
    """Seconds a stage still needs at its pace so far (None: not known yet)."""
    if not total or count <= 0 or elapsed <= 0:
        return None
    return elapsed * max(total - count, 0) / count


class RunClock:
    """The remaining time of a run made of stages of known relative cost.

    The pace (seconds per unit of cost) comes from the stages timed so far in this
    process, the stage in progress included as far as it got; a stage that took no
    work here (restored from a checkpoint) is marked done without a time.

    Args:
        costs: Relative cost of each stage, in order (e.g. 1 each: the layers of one
            run take the same number of steps).
    """

    def __init__(self, costs: Sequence[float]) -> None:
        self.costs = [float(c) for c in costs]
        self._done: set[int] = set()
        self._seconds = 0.0
        self._timed_cost = 0.0

    def finish(self, index: int, seconds: float | None = None) -> None:
        """Stage `index` (0-based) is done; `seconds`: its time here (None: not timed)."""
        self._done.add(index)
        if seconds is not None:
            self._seconds += seconds
            self._timed_cost += self.costs[index]

    def remaining(self, index: int, fraction: float, elapsed: float) -> float | None:
        """Seconds left in the whole run while stage `index` is `fraction` done after `elapsed`.

        Returns:
            None until some work has been timed.
        """
        cost = self._timed_cost + self.costs[index] * fraction
        seconds = self._seconds + elapsed
        if cost <= 0 or seconds <= 0:
            return None
        pace = seconds / cost
        later = sum(c for i, c in enumerate(self.costs) if i not in self._done and i != index)
        return pace * (later + self.costs[index] * (1.0 - fraction))


class Progress:
    """A progress counter for one stage.

    Args:
        desc: Stage name shown at the start of the line.
        total: Number of steps, if known.
        run_remaining: For a stage of a longer run: (fraction of this stage done,
            seconds spent on it) -> seconds left in the run (see `RunClock.remaining`).
        min_seconds: A stage that ends sooner prints no end line (a pass over images that
            is long only for a large model or data set stays silent when it is quick).
    """

    def __init__(self, desc: str, total: int | None = None,
                 run_remaining: Callable[[float, float], float | None] | None = None,
                 min_seconds: float = 0.0) -> None:
        self.desc = desc
        self.min_seconds = min_seconds
        self.total = total
        self.count = 0
        self.postfix = ""
        self.run_remaining = run_remaining
        self._tty = sys.stderr.isatty() and not _quiet
        self._start = time.perf_counter()
        self._last_draw = 0.0
        self._last_line = self._start
        self._tenth = 0

    @property
    def elapsed(self) -> float:
        """Seconds since the stage started."""
        return time.perf_counter() - self._start

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        """Advance by `n` steps, optionally replacing the trailing text.

        Raises:
            OutOfTime: inside `pipeline.base.budget.within`, once its deadline has passed.
        """
        self.count += n
        if postfix is not None:
            self.postfix = postfix
        budget.check()
        if _quiet:
            return
        now = time.perf_counter()
        if self._tty:
            if now - self._last_draw > 0.1 or (self.total and self.count >= self.total):
                self._last_draw = now
                sys.stderr.write(f"\r{self.line(now)}\x1b[K")
                sys.stderr.flush()
            return
        tenth = int(10 * self.count / self.total) if self.total else 0
        finished = bool(self.total) and self.count >= self.total  # close() prints the end
        gap = now - self._last_line
        if not finished and ((tenth > self._tenth and gap >= LOG_GAP) or gap >= LOG_EVERY):
            self._last_line = now
            self._tenth = tenth
            log(self.line(now))

    def eta(self, now: float | None = None) -> str:
        """The remaining time of the stage and, when known, of the run: "ETA 12s, run 3m05s"."""
        elapsed = (now or time.perf_counter()) - self._start
        text = f"ETA {format_seconds(stage_remaining(self.count, self.total, elapsed))}" \
            if self.total else ""
        if self.run_remaining is not None:
            fraction = min(self.count / self.total, 1.0) if self.total else 0.0
            run = f"run {format_seconds(self.run_remaining(fraction, elapsed))}"
            text = f"{text}, {run}" if text else f"ETA {run}"
        return text

    def line(self, now: float | None = None) -> str:
        """The progress line: stage, steps, elapsed time, ETA, trailing text."""
        now = now or time.perf_counter()
        elapsed = now - self._start
        if self.total:
            frac = min(self.count / self.total, 1.0)
            bar = "#" * int(frac * 24)
            head = f"{self.desc} [{bar:<24}] {self.count}/{self.total}"
        else:
            head = f"{self.desc} {self.count}"
        eta = self.eta(now)
        return f"{head} {elapsed:6.1f}s{' ' + eta if eta else ''} {self.postfix}".rstrip()

    def close(self, summary: str | None = None) -> None:
        """Finish the stage with one summary line."""
        elapsed = time.perf_counter() - self._start
        text = summary if summary is not None else self.postfix
        if self._tty:
            sys.stderr.write("\r\x1b[K")
        if elapsed >= self.min_seconds:
            log(f"{self.desc}: done in {elapsed:.1f}s {text}".rstrip())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Passes over images shorter than this print no end line (`Progress.min_seconds`).
QUICK_PASS = LOG_GAP


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
