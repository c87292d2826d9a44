"""The release pipeline, written once: scan -> defend (or quantize) -> verify, with typed results.

`efrap gate`, `efrap batch` (local and on Ray) and the command line's `scan`, `quantize`,
`defend` and `verify` run these steps; the callers decide what they write and how a
failure counts, the steps decide what is computed and with which settings:

- `scan_step`: the trigger-free scan of the FP model (`pipeline.scan.scan_model`);
- `defend_step`: the QDQ model and its check against FP (`pipeline.quantize.quantize_file`);
- `verify_step`: the output (and, when asked, the FP model) in onnxruntime on the test split;
- `run_release`: the three in order, the scan's recovered trigger saved and verified when the
  release names no trigger of its own.

Every step returns a frozen result that holds the typed reports themselves, never their
JSON: a renamed field is an AttributeError where it is read, not a None that a verdict is
then decided on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.base.safe_io import file_sha256
from pipeline.base.trigger import AnyTrigger, save_trigger
from pipeline.quantize import GuardOptions, QuantizeOptions, QuantizeSummary, quantize_file
from pipeline.scan import ScanFunction, ScanOptions, scan_model
from pipeline.scan.report import ScanReport
from validators.guard import GuardReport
from validators.limits import VerifyLimits
from validators.verify import VerifyOptions, VerifyReport, verify_model

#: Told each step's name as it starts ("scan", "defend", "verify").
OnStep = Callable[[str], None]


@dataclass(frozen=True)
class ScanStep:
    """The scan of the FP model.

    Attributes:
        report: The scan's report.
        trigger_file: Where its recovered trigger was saved (None: not saved, or none found).
        seconds: Wall time of the scan.
    """

    report: ScanReport
    trigger_file: Path | None
    seconds: float

    @property
    def trigger(self) -> AnyTrigger | None:
        """The FP model's recovered trigger (None when the scan found none)."""
        return self.report.trigger


@dataclass(frozen=True)
class DefendStep:
    """The QDQ model written and checked against FP.

    Attributes:
        output: The QDQ model's path.
        summary: The quantization summary (per layer).
        guard: The check against FP on held-out training images.
        sha256: The written model's sha256.
        seconds: Wall time of the step.
    """

    output: Path
    summary: QuantizeSummary
    guard: GuardReport
    sha256: str
    seconds: float


@dataclass(frozen=True)
class VerifyStep:
    """The output, and the FP model when asked, measured in onnxruntime on the test split.

    Attributes:
        output: The QDQ model's report (with the thresholds' verdict when any were set).
        fp: The FP model's report (None: not asked).
        seconds: Wall time of the output's verification.
        fp_seconds: Wall time of the FP model's (None: not asked).
    """

    output: VerifyReport
    fp: VerifyReport | None
    seconds: float
    fp_seconds: float | None = None


@dataclass(frozen=True)
class Release:
    """What one release run does.

    Attributes:
        model: The FP ONNX model.
        output: Where the QDQ model goes.
        quantize: The rounding run's settings (`efrap defend` is EFRAP's).
        guard: The output's check against FP.
        verify: Verification of the output; its trigger (None: the scan's recovered one,
            when the scan ran and found one) and thresholds.
        scan: The scan's settings (None: no scan).
        trigger_out: Where the scan's recovered trigger is saved (None: not saved; then
            verification measures the trigger object itself).
        verify_fp: Also verify the FP model with the same settings.
        resume: Keep and use the rounding's per-layer checkpoint.
    """

    model: Path
    output: Path
    quantize: QuantizeOptions
    guard: GuardOptions
    verify: VerifyOptions
    scan: ScanOptions | None = None
    trigger_out: Path | None = None
    verify_fp: bool = True
    resume: bool = True


@dataclass(frozen=True)
class ReleaseRun:
    """Every step's result, in order."""

    scan: ScanStep | None
    defend: DefendStep
    verify: VerifyStep


def scan_step(model: Path, options: ScanOptions, trigger_out: Path | None = None,
              scan: ScanFunction = scan_model, defended: Path | None = None) -> ScanStep:
    """Scan the FP model; save the recovered trigger at `trigger_out` when there is one.

    Args:
        defended: A defended QDQ model of the same FP model: the recovered trigger is
            measured on it too, and it is searched afresh (`efrap scan --defended`).
    """
    t0 = time.perf_counter()
    report = scan(str(model), options) if defended is None else \
        scan(str(model), options, defended=str(defended))
    saved = None
    if trigger_out is not None and report.trigger is not None:
        save_trigger(report.trigger, trigger_out)
        saved = trigger_out
    return ScanStep(report, saved, time.perf_counter() - t0)


def defend_step(model: Path, output: Path, options: QuantizeOptions, guard: GuardOptions,
                resume: bool = True) -> DefendStep:
    """Quantize the FP model with its rounding method, check it against FP, write it."""
    t0 = time.perf_counter()
    summary, report = quantize_file(str(model), str(output), options, guard, resume=resume)
    return DefendStep(output, summary, report, file_sha256(output), time.perf_counter() - t0)


def verify_step(output: Path, options: VerifyOptions, fp: Path | None = None) -> VerifyStep:
    """Verify the output (with the options' thresholds) and, given `fp`, the FP model (without)."""
    fp_report, fp_seconds = None, None
    if fp is not None:
        t0 = time.perf_counter()
        fp_report = verify_model(str(fp), replace(options, gate=VerifyLimits()))
        fp_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = verify_model(str(output), options)
    return VerifyStep(report, fp_report, time.perf_counter() - t0, fp_seconds)


def run_release(release: Release, scan: ScanFunction = scan_model,
                on_step: OnStep | None = None) -> ReleaseRun:
    """Scan (when asked), defend and verify, in that order.

    Verification measures the release's own trigger; without one, the scan's recovered
    trigger (as saved at `trigger_out`, the file a user re-checks with `efrap verify
    --trigger`), so a gate judges the defended model on the trigger the scan found.
    """
    step = on_step or (lambda name: None)
    scanned = None
    if release.scan is not None:
        step("scan")
        scanned = scan_step(release.model, release.scan, release.trigger_out, scan)
    step("defend")
    defended = defend_step(release.model, release.output, release.quantize, release.guard, release.resume)
    step("verify")
    verify = release.verify
    if verify.trigger is None and scanned is not None and scanned.trigger is not None:
        trigger = scanned.trigger_file if scanned.trigger_file is not None else scanned.trigger
        verify = replace(verify, trigger=str(trigger) if isinstance(trigger, Path) else trigger)
    verified = verify_step(release.output, verify, release.model if release.verify_fp else None)
    return ReleaseRun(scanned, defended, verified)
