"""Real `pipeline.scan.ScanReport`s built from a few figures, for tests that stand in for a scan.

The audit and the gate read the typed report by attribute, so their stand-in scans return
the real dataclasses, filled with the figures a test decides.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.base.trigger import PatternTrigger
from pipeline.scan.report import Coverage, DefendedScan, Figures, ScanReport
from pipeline.scan.search import Found
from pipeline.scan.verdict import TestResult, Verdict

#: The images' shape (Fashion-MNIST's).
SHAPE = (1, 28, 28)
#: The provenance the gate reads (data, held-out images, onnxruntime).
PROVENANCE: dict[str, object] = {"data": "npz", "holdout_images": 32,
                                 "onnxruntime": {"opt_level": "faithful", "provider": "CPUExecutionProvider"}}


def outlier_test(name: str, classes: Sequence[int] = (), anomaly: Sequence[float] = (),
                 candidate: int | None = None, flagged: bool = False) -> TestResult:
    """A test's result with the given anomaly indices (evidence = index, ratio 1)."""
    return TestResult(name, tuple(classes), tuple(anomaly), (1.0,) * len(classes), tuple(anomaly), candidate,
                      flagged, 0.9 if flagged else 0.1)


def verdict(name: str = "clean", target: int | None = None, confidence: float = 0.9, reason: str = "why",
            differential: TestResult | None = None, fp: TestResult | None = None) -> Verdict:
    """A scan verdict (tests without classes unless given)."""
    return Verdict(name, target, confidence, differential or outlier_test("differential"),
                   fp or outlier_test("fp"), reason)


def figures(asr: dict[str, float | None]) -> Figures:
    """A trigger's attack success per model on 32 held-out images (29 not of the target)."""
    return Figures(asr=dict(asr), agreement={}, images=32, non_target_images=29)


def found(target: int, mode: str = "diff", size: float = 0.01, hit: bool = True) -> Found:
    """One finished search: a 4 x 4 white patch in the top-left corner."""
    mask = np.zeros(SHAPE, np.float32)
    mask[0, :4, :4] = 1.0
    return Found(target=target, family="patch", mode=mode, found=hit, size=size, success=0.9, steps=1,
                 seconds=0.0, cut_short=False, mask=mask, pattern=np.ones(SHAPE, np.float32))


def defended(recovered: dict[str, float | None] | None, flagged: bool, candidate: int | None,
             fresh: dict[str, float | None] | None, name: str = "fp-backdoor") -> DefendedScan:
    """The defended part: the FP model's trigger measured on Q, and the fresh search against Q
    (its outlier test, and its strongest trigger's figures when `fresh` is given)."""
    diff = outlier_test("differential", candidate=candidate, flagged=flagged)
    # The defended part's own verdict says fp-backdoor whenever the FP test flags a class.
    part = Verdict(name, candidate, 0.9, diff, outlier_test("fp"), "why")
    own = None if fresh is None else (found(0 if candidate is None else candidate), figures(fresh))
    return DefendedScan(model="q.onnx", model_sha256="0" * 64,
                        recovered=None if recovered is None else figures(recovered), verdict=part,
                        searches={}, own_trigger=own)


def scan_report(v: Verdict, part: DefendedScan | None = None, cut_short: bool | None = False,
                trigger: PatternTrigger | None = None, trigger_asr: dict[str, float | None] | None = None,
                searches: dict[int, list[Found]] | None = None, classes: int = 10) -> ScanReport:
    """A scan report: every search of `searches` planned and finished, `trigger` (with
    `trigger_asr`) the recovered one. `cut_short` is typed bool | None so that a test can
    hand the audit and the gate a report that does not say (both fail closed)."""
    searches = searches or {}
    planned = tuple((c, f.mode, f.family) for c, fs in sorted(searches.items()) for f in fs)
    coverage = Coverage(planned=planned, defended_planned=(), shortlisted=True, figures=not cut_short,
                        stopped=None)
    return ScanReport(
        model="fp.onnx", model_sha256="0" * 64, verdict=v, trigger=trigger,
        trigger_found=None if trigger is None else found(trigger.target),
        figures=None if trigger_asr is None else figures(trigger_asr), classes=classes,
        searched=tuple(sorted(searches)), drift=(0.0,) * classes, searches=searches, parity={},
        defended=part, settings={}, provenance=dict(PROVENANCE), cut_short=cut_short,  # type: ignore[arg-type]
        coverage=coverage, seconds=0.1)
