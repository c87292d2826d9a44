"""A method's one setting chosen on clean held-out images (QVec's scale).

Some rounding methods have a setting that no layer can choose for itself: QVec's scale
lambda trades the whole model's clean accuracy against how many weights leave nearest
rounding. Such a method declares "search" among its needs and exposes a `ScaleSearch`
(the candidate values and the rule) and `at(value)` (the method at one value). The
orchestrator calibrates once, rounds every layer at each value, measures each whole
quantized model on clean held-out images in onnxruntime and keeps the value `pick`
chooses; it knows nothing of what the setting means. `SearchRecord` is what the output's
metadata and the run's summary say about it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pipeline.base import checks
from pipeline.base.errors import EfrapError
from pipeline.rounding.base import RoundingMethod
from validators.guard import GuardReport
from validators.report import pct

#: Figures are shares of the same images: a difference equal to the tolerance in exact
#: arithmetic may come out a rounding error above it, and must still count as equal.
_SLACK = 1e-9


@dataclass(frozen=True)
class ScaleSearch:
    """The candidate values of a setting and the rule that keeps one.

    The rule: the largest value of the grid whose clean figure is at most `tolerance`
    below the first value's (the reference, e.g. QVec's lambda = 0, nearest rounding). A
    tie with the bound qualifies; a larger value that qualifies wins even past a smaller
    one that does not. The first value always qualifies.

    Attributes:
        setting: The setting's name, as records spell it ("lambda").
        grid: Candidate values, strictly rising, the reference first.
        tolerance: Largest drop of the clean figure from the reference's, as a fraction
            (0.01: one point).
        images: Held-out clean images each candidate is measured on.
    """

    setting: str
    grid: tuple[float, ...]
    tolerance: float = 0.01
    images: int = 1000

    def __post_init__(self) -> None:
        checks.string(self.setting, "search setting")
        if not isinstance(self.grid, tuple) or not self.grid:
            raise EfrapError(f"the {self.setting} search needs a non-empty tuple of values")
        for value in self.grid:
            checks.finite(value, f"{self.setting} value", low=0.0)
        if any(b <= a for a, b in zip(self.grid, self.grid[1:], strict=False)):
            raise EfrapError(f"the {self.setting} values must rise strictly, got {list(self.grid)}")
        checks.finite(self.tolerance, f"{self.setting} search tolerance", low=0.0, high=1.0)
        checks.integer(self.images, f"{self.setting} search images", low=1)

    def qualifies(self, reference: float, figure: float) -> bool:
        """Whether a candidate's clean figure is within the tolerance of the reference's."""
        return reference - figure <= self.tolerance + _SLACK

    def pick(self, figures: Sequence[float]) -> int:
        """The index of the value the rule keeps, given each value's clean figure in grid order."""
        if len(figures) != len(self.grid):
            raise EfrapError(f"the {self.setting} search has {len(self.grid)} values but "
                             f"{len(figures)} figures")
        return max(i for i, f in enumerate(figures) if self.qualifies(figures[0], f))

    def rule(self, figure: str) -> str:
        """The rule in words, for records."""
        points = f"{100 * self.tolerance:g} point{'' if 100 * self.tolerance == 1 else 's'}"
        return (f"the largest {self.setting} of the grid whose clean {figure} on held-out images is at "
                f"most {points} below {self.setting} = {self.grid[0]:g}'s")


class Searched(RoundingMethod, Protocol):
    """A rounding method with one setting chosen by a `ScaleSearch` (it needs "search")."""

    search: ScaleSearch

    def at(self, value: float) -> RoundingMethod:
        """The method at one value of its setting."""
        ...


def searched(method: RoundingMethod) -> Searched:
    """`method` as a searched method (it declared "search" among its needs).

    Raises:
        TypeError: it has no `search` or no `at` (a method written wrongly, not a user's error).
    """
    has_search = isinstance(getattr(method, "search", None), ScaleSearch)
    if not (has_search and callable(getattr(method, "at", None))):
        raise TypeError(f"rounding method '{method.name}' needs a search but has no ScaleSearch and at()")
    return method  # type: ignore[return-value]


def clean_figure(report: GuardReport) -> tuple[str, float]:
    """The figure a candidate is judged by: clean accuracy where the images have labels, else
    top-1 agreement with FP.

    Raises:
        EfrapError: neither can be measured (the first output is not a classifier's).
    """
    if report.accuracy is not None:
        return "accuracy", report.accuracy
    if report.agreement is not None:
        return "agreement", report.agreement
    raise EfrapError(f"a setting search needs a classifier's top-1 on held-out images, and none was "
                     f"measured ({report.note or 'the first output is not a classifier'})")


@dataclass(frozen=True)
class SearchTrial:
    """One candidate value, measured.

    Attributes:
        value: The setting's value.
        accuracy: Clean accuracy on the held-out images (None: no labels).
        agreement: Top-1 agreement with FP on them.
        flip_fraction: Share of the model's weights rounded off nearest.
        seconds: Time to round every layer and measure the model.
    """

    value: float
    accuracy: float | None
    agreement: float | None
    flip_fraction: float
    seconds: float


@dataclass(frozen=True)
class SearchRecord:
    """What a setting search measured and kept.

    Attributes:
        method: The rounding method.
        search: Its grid and rule.
        figure: "accuracy" or "agreement", what the rule compared.
        trials: Every candidate, in grid order.
        chosen: Index of the kept one.
        images: Held-out images each candidate was measured on.
        opt_level: onnxruntime optimization level of the measurement.
    """

    method: str
    search: ScaleSearch
    figure: str
    trials: tuple[SearchTrial, ...]
    chosen: int
    images: int
    opt_level: str

    @property
    def value(self) -> float:
        """The kept value."""
        return self.trials[self.chosen].value

    def metadata(self) -> dict:
        """The output's `efrap.search` entry (no seconds: the same inputs give the same bytes)."""
        s = self.search
        return {"method": self.method, "setting": s.setting, "grid": list(s.grid), "tolerance": s.tolerance,
                "figure": self.figure, "images": self.images, "opt_level": self.opt_level,
                "rule": s.rule(self.figure), "chosen": self.value,
                "candidates": [{s.setting: t.value, "accuracy": t.accuracy, "agreement": t.agreement,
                                "flip_fraction": round(t.flip_fraction, 6)} for t in self.trials]}

    def to_json(self) -> dict:
        """The `--summary` entry: the metadata with each candidate's seconds."""
        out = self.metadata()
        for entry, trial in zip(out["candidates"], self.trials, strict=True):
            entry["seconds"] = round(trial.seconds, 3)
        return out

    def lines(self) -> list[str]:
        """One printed line per candidate, then the choice."""
        s = self.search
        out = [f"search: {s.setting} {t.value:<5g} accuracy {pct(t.accuracy, 'n/a')}  agreement with FP "
               f"{pct(t.agreement, 'n/a')}  flipped {100 * t.flip_fraction:.2f}%  {t.seconds:.1f}s"
               for t in self.trials]
        out.append(f"search: kept {s.setting} = {self.value:g} on {self.images} held-out images: "
                   f"{s.rule(self.figure)}")
        return out
