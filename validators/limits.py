"""Verification's limits: the pass/fail thresholds `efrap verify` puts on a measured model.

`efrap gate`, the release gate, is `pipeline.gate`; these are the limits of one
verification, which the gate and the batch also use. They fail closed: a check whose
value could not be measured (None, or not a finite number) fails, and a threshold that
no model could fail (accuracy at least 0, attack success at most 100%) is refused when
the limits are built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.base.checks import finite
from pipeline.base.errors import EfrapError


@dataclass(frozen=True)
class LimitCheck:
    """One check of the limits.

    Attributes:
        check: What is compared ("clean_accuracy >= min", ...).
        limit: The threshold (a fraction).
        value: The measured value, or None when it could not be measured.
        passed: Whether the check passed.
        why: Why it failed without a value.
    """

    check: str
    limit: float
    value: float | None
    passed: bool
    why: str = ""


@dataclass(frozen=True)
class LimitsResult:
    """The limits' verdict: passed only if every check passed."""

    passed: bool
    checks: tuple[LimitCheck, ...]


@dataclass(frozen=True)
class VerifyLimits:
    """Thresholds (fractions in [0, 1]); None disables a check.

    Attributes:
        min_accuracy: Lowest acceptable clean accuracy.
        max_asr: Highest acceptable attack success rate (non-target images).
        max_parity_diff: Highest acceptable fraction of predictions that differ
            from the reference simulation.
    """

    min_accuracy: float | None = None
    max_asr: float | None = None
    max_parity_diff: float | None = None

    def __post_init__(self) -> None:
        for name, lo_ok, hi_ok in (("min_accuracy", False, True), ("max_asr", True, False),
                                   ("max_parity_diff", True, False)):
            value = getattr(self, name)
            if value is None:
                continue
            finite(value, name, low=0.0, high=1.0)
            if (not lo_ok and value == 0.0) or (not hi_ok and value == 1.0):
                raise EfrapError(f"{name} {value:g} lets every model pass; a gate must be able to fail")

    @property
    def active(self) -> bool:
        """Whether any check is set."""
        return any(v is not None for v in (self.min_accuracy, self.max_asr, self.max_parity_diff))

    def evaluate(self, accuracy: float | None, asr: float | None,
                 parity_diff: float | None, why_missing: dict[str, str] | None = None) -> LimitsResult:
        """Check measured values; a value that is None or not finite fails its check.

        Args:
            accuracy: Clean accuracy.
            asr: Attack success rate on non-target images.
            parity_diff: Fraction of predictions differing from the reference.
            why_missing: check name ("accuracy", "asr", "parity") -> why its value is
                missing, for the report.
        """
        why_missing = why_missing or {}
        checks = []
        for key, name, value, limit, upper in (
                ("accuracy", "clean_accuracy >= min", accuracy, self.min_accuracy, False),
                ("asr", "attack_success_rate <= max", asr, self.max_asr, True),
                ("parity", "parity differing predictions <= max", parity_diff, self.max_parity_diff,
                 True)):
            if limit is None:
                continue
            if value is None or not math.isfinite(value):
                # Missing or not a number (NaN compares false both ways): not measurable, a fail.
                checks.append(LimitCheck(name, limit, None, False,
                                        why_missing.get(key, "not measurable")))
                continue
            ok = value <= limit if upper else value >= limit
            checks.append(LimitCheck(name, limit, value, ok))
        return LimitsResult(passed=all(c.passed for c in checks), checks=tuple(checks))
