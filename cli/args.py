"""Argument types and the parser class of the command line.

Every number from the command line is checked where it is parsed: finite, in range,
of the right kind. A parse error is one line (`efrap CMD: error: ...`), exit 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from pipeline.base import checks
from pipeline.base.errors import EfrapError, one_line


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print `efrap CMD: error: MESSAGE` (one line) and exit 2."""
        print(f"{self.prog}: error: {one_line(message)}", file=sys.stderr)
        sys.exit(2)


def _number(kind: type, low: float | None, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}"
                                             ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"'{text}' is not finite")
        if low is not None and (value <= low if low_open else value < low):
            bound = "above" if low_open else "at least"
            raise argparse.ArgumentTypeError(f"'{text}' must be {bound} {low:g}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, 1)
nonnegative_int = _number(int, 0)
positive_float = _number(float, 0.0, low_open=True)
nonnegative_float = _number(float, 0.0)


def above_one(text: str) -> float:
    """A finite number above 1."""
    return _number(float, 1.0, low_open=True)(text)


def fraction(text: str) -> float:
    """A threshold: a fraction in [0, 1] (0.05) or a percentage (5%)."""
    try:
        return checks.fraction(text)
    except EfrapError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
