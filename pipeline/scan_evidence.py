"""The audit's facts from a scan of FP with Q as the defended model, read from the typed report.

`pipeline.scan.scan_model(FP, options, defended=Q)` measures the FP model's recovered
trigger on Q and runs a fresh differential trigger search where Q is the quantized side.
`evidence_from_scan` reads what the audit's verdict rests on from its `ScanReport` by
attribute, never through its JSON: a field renamed in `pipeline.scan.report` is an
attribute error here, not a missing figure a verdict could be decided on.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.scan.report import ScanReport


@dataclass(frozen=True)
class ScanEvidence:
    """The scan's facts the verdict rests on.

    Attributes:
        scan_verdict: The scan's verdict on the FP model ("qcb", "fp-backdoor", "clean",
            "inconclusive").
        confidence: The scan's confidence in it.
        target: The class of the FP model's recovered trigger (None when none).
        asr_fp: The recovered trigger's attack success on the FP model.
        asr_nearest: On nearest rounding of the FP model.
        asr_quantized: On Q.
        fresh_found: Whether the fresh differential search with Q as the quantized side
            found a class with an anomalously small trigger (the scan's outlier test);
            None when the scan has no such search.
        fresh_target: That class.
        fresh_asr: Its strongest trigger's attack success on Q.
        fresh_asr_fp: On the FP model.
        fresh_asr_nearest: On nearest rounding.
        complete: Whether every search of the scan (the fresh search against Q included) ran
            to its end and its figures were measured within the budget; False also when the
            report does not say (fail closed).
        incomplete: Why not, when not complete (the scan's own account of what ran).
    """

    scan_verdict: str
    confidence: float | None
    target: int | None
    asr_fp: float | None
    asr_nearest: float | None
    asr_quantized: float | None
    fresh_found: bool | None
    fresh_target: int | None = None
    fresh_asr: float | None = None
    fresh_asr_fp: float | None = None
    fresh_asr_nearest: float | None = None
    complete: bool = False
    incomplete: str = ""


def _incomplete(report: ScanReport) -> str:
    """Why the scan is not complete: the inconclusive parts' own reasons."""
    parts = [report.verdict] + ([report.defended.verdict] if report.defended is not None else [])
    reasons = [v.reason for v in parts if v.verdict == "inconclusive"]
    return "; ".join(reasons) or "the scan report does not say that every search ran to its end"


def evidence_from_scan(report: ScanReport) -> ScanEvidence:
    """The verdict's facts from a scan report run with `defended=Q`.

    The recovered trigger is the FP model's own (its differential search against nearest
    rounding, or Neural Cleanse's when the scan calls FP backdoored). The fresh search is
    the differential search with Q as the quantized side; it is read from its own outlier
    test (`DefendedScan.verdict.differential`), not from the defended part's verdict,
    which says "fp-backdoor" whenever the FP test flags a class, whatever Q does.
    Figures are the report's (rounded as its JSON gives them), so the audit's evidence
    and the scan's JSON agree to the digit.
    """
    defended = report.defended
    recovered = defended.recovered if defended is not None else None
    own = defended.own_figures if defended is not None else None
    test = defended.verdict.differential if defended is not None else None
    # Complete only when the report says so on both parts: anything but an explicit
    # cut_short=False is not a finished scan (fail closed).
    complete = report.cut_short is False and report.verdict.verdict != "inconclusive" \
        and (defended is None or defended.complete)
    target = report.verdict.target
    if target is None and report.trigger is not None and report.trigger_found is not None:
        target = report.trigger.target
    return ScanEvidence(
        scan_verdict=report.verdict.verdict, confidence=report.confidence, target=target,
        asr_fp=None if recovered is None else recovered.success("fp"),
        asr_nearest=None if recovered is None else recovered.success("nearest"),
        asr_quantized=None if recovered is None else recovered.success("defended"),
        fresh_found=None if test is None else test.flagged,
        fresh_target=None if test is None else test.candidate,
        fresh_asr=None if own is None else own.success("defended"),
        fresh_asr_fp=None if own is None else own.success("fp"),
        fresh_asr_nearest=None if own is None else own.success("nearest"),
        complete=complete, incomplete="" if complete else _incomplete(report),
    )
