"""The acceptance rule of a defense: its floors, its goals and the winner of a model's row.

docs/DEFENSE.md and docs/RESULTS.md report this rule; `bench/results.py` applies it to
the figures it measures. A row is one model's figures as the bench stores them: ``"fp"``
and each method's measurement, each a mapping with ``"cda"`` (clean accuracy) and
``"asr"`` (attack success over test images whose label is not the target), in percent.
A method that was not run has no entry. Pure arithmetic: nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: One model's figures: "fp" and each method run -> {"cda": %, "asr": %, ...}.
Row = Mapping[str, Any]


@dataclass(frozen=True)
class Thresholds:
    """What a defended model must keep, against its FP model.

    Attributes:
        max_asr: Attack success at most, in percent.
        max_cda_drop: Clean accuracy at most this many points below the FP model's.
    """

    max_asr: float
    max_cda_drop: float

    def met(self, fp_cda: float, cda: float, asr: float) -> bool:
        """Whether a model with clean accuracy `cda` and attack success `asr` keeps these."""
        return asr <= self.max_asr and fp_cda - cda <= self.max_cda_drop


#: What the default defense must meet on every model.
FLOORS = Thresholds(max_asr=5.0, max_cda_drop=2.0)
#: What it aims for.
GOALS = Thresholds(max_asr=2.0, max_cda_drop=1.0)
#: The method the floors and goals are checked for: the project's rule (docs/DEFENSE.md).
JUDGED = "default"
#: The methods that compete for a row's winner, in column order. The nearest baseline and
#: ablations of the rule (its first part alone, "unpruned") are shown but never win.
CANDIDATES: tuple[str, ...] = ("adaround", "lac", "release", "default", "qvec")


def meets(row: Row, method: str, thresholds: Thresholds) -> bool:
    """Whether `method` was run on the row and keeps `thresholds` against the row's FP model."""
    m = row.get(method)
    return m is not None and thresholds.met(row["fp"]["cda"], m["cda"], m["asr"])


def verdict(row: Row, method: str = JUDGED) -> str:
    """'met'/'MISSED' floors / 'met'/'missed' goals of `method`, or 'not run'.

    A missed floor is in capitals: it is a failure, a missed goal is not.
    """
    if method not in row:
        return "not run"
    floors = "met" if meets(row, method, FLOORS) else "MISSED"
    goals = "met" if meets(row, method, GOALS) else "missed"
    return f"{floors} / {goals}"


def winner(row: Row, candidates: Iterable[str] = CANDIDATES) -> str:
    """The row's best defense among `candidates`.

    The highest clean accuracy among those that meet the goals (equal accuracy: the lower
    attack success); else the lowest attack success among those that meet the floors;
    else "none"; "-" when no candidate was run.
    """
    ran = [m for m in candidates if m in row]
    goals_met = [m for m in ran if meets(row, m, GOALS)]
    if goals_met:
        return max(goals_met, key=lambda m: (row[m]["cda"], -row[m]["asr"]))
    floors_met = [m for m in ran if meets(row, m, FLOORS)]
    if floors_met:
        return min(floors_met, key=lambda m: row[m]["asr"])
    return "none" if ran else "-"


def tally(rows: Iterable[Row], method: str = JUDGED) -> tuple[int, int]:
    """On how many rows `method` meets the floors, and on how many the goals."""
    rows = list(rows)
    return (sum(meets(r, method, FLOORS) for r in rows), sum(meets(r, method, GOALS) for r in rows))
