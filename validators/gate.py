"""The pass/fail gate a release pipeline puts on a quantized model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gate:
    """Thresholds (fractions in [0, 1]); None disables a check.

    Attributes:
        min_accuracy: Lowest acceptable clean accuracy.
        max_asr: Highest acceptable attack success rate (non-target images).
        max_parity_diff: Highest acceptable fraction of predictions that differ
            from the PyTorch simulation.
    """

    min_accuracy: float | None = None
    max_asr: float | None = None
    max_parity_diff: float | None = None

    @property
    def active(self) -> bool:
        """Whether any check is set."""
        return any(v is not None for v in (self.min_accuracy, self.max_asr, self.max_parity_diff))

    def evaluate(self, report: dict) -> dict:
        """Check a verify report; returns {"passed": bool, "checks": [...]}."""
        checks = []

        def check(name: str, value: float | None, limit: float | None, upper: bool) -> None:
            if limit is None:
                return
            if value is None:
                checks.append({"check": name, "limit": limit, "value": None, "passed": False,
                               "why": "not measured (give the data it needs)"})
                return
            ok = value <= limit if upper else value >= limit
            checks.append({"check": name, "limit": limit, "value": value, "passed": ok})

        check("clean_accuracy >= min", report.get("clean_accuracy"), self.min_accuracy, False)
        check("attack_success_rate <= max", report.get("attack_success_rate"), self.max_asr, True)
        parity = report.get("parity") or {}
        check("parity differing predictions <= max",
              parity.get("fraction_differing_predictions"), self.max_parity_diff, True)
        return {"passed": all(c["passed"] for c in checks), "checks": checks}
