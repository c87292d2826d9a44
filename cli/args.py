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

#: Largest seed: torch, numpy and the seed derivation all take a 63-bit integer.
MAX_SEED = 2**63 - 1
#: Widest width multiplier of an architecture (beyond it a model does not fit in memory).
MAX_WIDTH = 16.0


def seed_number(text: str) -> int:
    """A seed: an integer in [0, 2**63 - 1]."""
    value = int(nonnegative_int(text))
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"'{text}' is larger than the largest seed, 2**63 - 1")
    return value


def width_factor(text: str) -> float:
    """A width multiplier: a number in (0, MAX_WIDTH]."""
    value = positive_float(text)
    if value > MAX_WIDTH:
        raise argparse.ArgumentTypeError(f"'{text}' is wider than {MAX_WIDTH:g} times the base model")
    return value


def above_one(text: str) -> float:
    """A finite number above 1."""
    return _number(float, 1.0, low_open=True)(text)


def fraction(text: str) -> float:
    """A threshold: a fraction in [0, 1] (0.05) or a percentage (5%)."""
    try:
        return checks.fraction(text)
    except EfrapError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit(text: str, useless: float) -> float:
    value = fraction(text)
    if value == useless:
        hint = " (a bare number is a fraction: 1 means 100%; for one percent write 1%)" \
            if useless == 1.0 and not text.strip().endswith("%") else ""
        raise argparse.ArgumentTypeError(f"'{text}' lets every model pass; a gate must be able to "
                                         f"fail{hint}")
    return value


def upper_limit(text: str) -> float:
    """A gate's highest acceptable fraction: `fraction`, but never 1 (100%), which passes all."""
    return _limit(text, 1.0)


def lower_limit(text: str) -> float:
    """A gate's lowest acceptable fraction: `fraction`, but never 0, which passes all."""
    return _limit(text, 0.0)
