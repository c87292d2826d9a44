"""The scan: does an FP model carry a backdoor that the deployment quantization wakes?

    from pipeline.base.deployment import Deployment
    from pipeline.base.scheme import load_scheme
    from pipeline.scan import ScanOptions, scan_model
    report = scan_model("model.onnx", ScanOptions(Deployment(scheme=load_scheme("w4a4"))))
    report.verdict.verdict, report.verdict.target, report.to_json()

Modules: `sides` (the FP, nearest and defended models as differentiable functions of
[0, 1] images), `search` (trigger reverse-engineering), `verdict` (the decision, pure
functions of per-class trigger sizes), `report` (the JSON report), `run` (`scan_model`,
the stages in order), `options` (`ScanOptions`), `state` (what the stages build, and the
budget's clock), `inputs` (the models and images, read first), `stages` (the nearest
deployment, the clean figures, then the shortlist and the searches of `planning`),
`figures` (onnxruntime figures), `decision` (the verdict and the recovered trigger),
`defended` (the defended part).
docs/SCAN.md describes the method and its measured results.
"""

from __future__ import annotations

from pipeline.scan.report import CLASS_STATES, Coverage, DefendedScan, Figures, ScanFunction, ScanReport
from pipeline.scan.run import ScanOptions, scan_model
from pipeline.scan.search import FAMILIES, Found, SearchConfig
from pipeline.scan.verdict import (
    VERDICTS,
    TestResult,
    Verdict,
    VerdictRule,
    decide,
    inconclusive,
    not_findings,
    run_test,
)

__all__ = [
    "CLASS_STATES",
    "FAMILIES",
    "VERDICTS",
    "Coverage",
    "DefendedScan",
    "Figures",
    "Found",
    "ScanFunction",
    "ScanOptions",
    "ScanReport",
    "SearchConfig",
    "TestResult",
    "Verdict",
    "VerdictRule",
    "decide",
    "inconclusive",
    "not_findings",
    "run_test",
    "scan_model",
]
