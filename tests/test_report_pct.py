"""validators.report.pct: the one percent formatter, in each form the reports and bench tables print."""

from __future__ import annotations

from validators.report import pct


def test_the_default_form_is_unchanged() -> None:
    assert pct(0.12345) == "12.35%" and pct(None) == "-" and pct(None, "n/a") == "n/a"
    assert pct(1.0) == "100.00%" and pct(0.0) == "0.00%"


def test_digits_and_unit_for_cells_whose_header_says_percent() -> None:
    assert pct(0.12345, digits=1, unit="") == "12.3"  # docs/SCAN.md's ASR cells
    assert pct(0.12345, "n/a", unit="") == "12.35"  # docs/GATE.md's audit table
    assert pct(0.9876, digits=0) == "99%"
    assert pct(None, "n/a", digits=1, unit="") == "n/a"
