"""A defense that checks itself: ship the first candidate rounding its deployed model shows is safe.

No rounding wins on every model (docs/DEFENSE.md, docs/RESULTS.md), and a user who
converts one model has no trigger to tell which. What the project can measure without a
trigger is the deployed model itself: the audit (`pipeline.audit.audit_models`) runs the
scan against FP with the candidate as the quantized side (the FP model's recovered
trigger measured on it, and a fresh differential search for a trigger that wakes it and
not FP), and the defense's check (`validators.guard`) measures its agreement with FP and
its accuracy on held-out images. `self_checking_defend` rounds the candidates in one fixed
order (`ORDER`, docs/DEFENSE.md "The self-check") and ships the first whose audit says
"clean" and whose check passes. When none passes, it writes the one with the weakest
trigger (`CandidateResult.rank`), and the caller exits 1: a user never ships a model that
failed its check without being told. Every candidate's figures and times go into the
shipped model's `efrap.self_check` metadata and the run's result.

The first candidate whose audit flags it with a trigger the audit recovered (one that
wakes it and not FP) is also repaired (`pipeline.repair`): the input units that trigger
drives apart from FP are pruned, and the repaired model, named ``NAME+repair``, is checked
and audited afresh like any candidate, right after the one it repairs.

The candidates are written into ``OUT.selfcheck/`` beside the output (each with its own
resume checkpoint, so a killed run resumes the candidate it was rounding) and the folder
is removed once the output is written.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pipeline.audit import AuditReport, AuditThresholds, audit_models
from pipeline.base import checks
from pipeline.base import data as data_mod
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import load_model, model_files, save_model, set_metadata
from pipeline.base.preprocess import PreparedImages
from pipeline.base.progress import log
from pipeline.base.safe_io import check_outputs, check_work_folder
from pipeline.calibration import NoHoldout
from pipeline.quantize import (
    GuardOptions,
    QuantizeOptions,
    QuantizeSummary,
    check_output,
    holdout_images,
    quantize_file,
)
from pipeline.repair import RepairSettings, repair_model
from pipeline.rounding import LearnedSettings, RoundingSettings
from pipeline.rounding.adaround import ADAROUND_DEFAULTS
from pipeline.rounding.efrap import EFRAP_DEFAULT, EFRAP_FAST, EFRAP_RELEASE
from pipeline.rounding.lac import LAC_DEFAULTS
from pipeline.rounding.qvec import QVec
from pipeline.scan import ScanFunction, ScanOptions
from validators.guard import GuardReport

SUFFIX = ".selfcheck"
#: The name of a repaired candidate: its candidate's name and this.
REPAIR = "+repair"
#: The file that marks a folder as this program's self-check folder.
MARKER = ".efrap-selfcheck"


@dataclass(frozen=True)
class Candidate:
    """One rounding the self-check may ship.

    Attributes:
        name: Its name (`--candidates`).
        method: The rounding method.
        config: Its settings.
    """

    name: str
    method: str
    config: RoundingSettings


#: Every candidate by name: the default rule, the papers' methods at their settings, the
#: release's settings, the fast form, QVec with its scale search (docs/DEFENSE.md, "QVec").
CANDIDATES: dict[str, Candidate] = {c.name: c for c in (
    Candidate("default", "efrap", EFRAP_DEFAULT),
    Candidate("adaround", "adaround", ADAROUND_DEFAULTS),
    Candidate("lac", "lac", LAC_DEFAULTS),
    Candidate("release", "efrap", EFRAP_RELEASE),
    Candidate("fast", "efrap", EFRAP_FAST),
    Candidate("qvec", "qvec", QVec.defaults),
)}

#: The fixed order (docs/DEFENSE.md "The self-check"): the default first, then by how often
#: each won on the held-out models of docs/RESULTS.md (AdaRound 3, LAC 1, the release 1).
ORDER = ("default", "adaround", "lac", "release")


@dataclass(frozen=True)
class SelfCheckOptions:
    """Settings of the self-check, checked when built.

    Attributes:
        candidates: Candidate names, in the order they are tried.
        budget: Seconds each candidate's audit (its scan) may take (None: no limit); an
            audit the budget cuts short is inconclusive, which fails the candidate.
        thresholds: When a trigger counts as working on a candidate (the audit's).
        iters: Iterations per layer for every candidate (None: each candidate's own).
        max_targets: Most classes each audit's scan searches.
        repair: The trigger-guided repair's rule, applied to the first candidate flagged
            with a trigger (None: no repair).
    """

    candidates: tuple[str, ...] = ORDER
    budget: float | None = None
    thresholds: AuditThresholds = field(default_factory=AuditThresholds)
    iters: int | None = None
    max_targets: int = 10
    repair: RepairSettings | None = field(default_factory=RepairSettings)

    def __post_init__(self) -> None:
        if not self.candidates:
            raise EfrapError("the self-check needs at least one candidate")
        for name in self.candidates:
            checks.string(name, "self-check candidate", tuple(CANDIDATES))
        if len(set(self.candidates)) != len(self.candidates):
            raise EfrapError(f"self-check candidates are listed twice: {', '.join(self.candidates)}")
        if self.budget is not None:
            checks.finite(self.budget, "self-check budget (seconds)", low=0.0, low_open=True)
        if self.iters is not None:
            checks.integer(self.iters, "iterations per layer", low=1, high=1_000_000)
        checks.integer(self.max_targets, "most searched classes", low=3)
        if self.repair is not None and not isinstance(self.repair, RepairSettings):
            raise EfrapError(f"the self-check's repair must be RepairSettings or None, got {self.repair!r}")


@dataclass(frozen=True)
class CandidateResult:
    """What the self-check measured on one candidate.

    Attributes:
        name: The candidate (``NAME+repair`` for a repaired one).
        method: Its rounding method.
        passed: Whether its audit said "clean" and its check passed.
        verdict: The audit's verdict ("clean", "qcb", "rounding-backdoor", "inconclusive").
        reasons: Why, the audit's and the check's lines.
        guard: Its check against FP.
        strongest_asr: The largest attack success on the candidate of the triggers its
            audit measured (the FP model's recovered one and the fresh search's); None
            when none was measured.
        rounding_seconds: Time to round and check it.
        audit_seconds: Time of its audit.
        audit: The audit's JSON (its evidence, verdict and scan); empty when the repair
            pruned nothing (the model is its candidate's, already audited).
        repair: For a repaired candidate, what the repair measured and pruned
            (`pipeline.repair.RepairRecord.to_json`); None for a rounding.
    """

    name: str
    method: str
    passed: bool
    verdict: str
    reasons: tuple[str, ...]
    guard: GuardReport
    strongest_asr: float | None
    rounding_seconds: float
    audit_seconds: float
    audit: dict
    repair: dict | None = None

    def rank(self) -> tuple[float, float]:
        """Order among failed candidates (smaller is better): the weakest trigger first, an
        unmeasured one last; then the closest agreement with FP."""
        asr = 2.0 if self.strongest_asr is None else self.strongest_asr
        return asr, -(self.guard.agreement if self.guard.agreement is not None else -1.0)

    def to_json(self, full: bool = True) -> dict:
        """JSON-ready dict (`full`: with the audit's own JSON)."""
        out = {"name": self.name, "method": self.method, "passed": self.passed, "verdict": self.verdict,
               "reasons": list(self.reasons), "strongest_asr": self.strongest_asr,
               "agreement": self.guard.agreement, "accuracy": self.guard.accuracy,
               "rounding_seconds": round(self.rounding_seconds, 1),
               "audit_seconds": round(self.audit_seconds, 1), "repair": self.repair}
        return {**out, "guard": self.guard.to_json(), "audit": self.audit} if full else out


@dataclass(frozen=True)
class SelfCheckResult:
    """The self-checking defend's outcome.

    Attributes:
        shipped: The name of the candidate written to the output.
        passed: Whether it passed (False: no candidate did; the best was written).
        candidates: Every candidate tried, in order.
        summary: The shipped candidate's quantization summary.
        guard: The shipped candidate's check.
        options: The self-check's settings.
    """

    shipped: str
    passed: bool
    candidates: tuple[CandidateResult, ...]
    summary: QuantizeSummary
    guard: GuardReport
    options: SelfCheckOptions

    def metadata(self) -> dict:
        """The shipped model's `efrap.self_check` entry (no scan JSON: it is in --summary)."""
        return {"shipped": self.shipped, "passed": self.passed,
                "order": list(self.options.candidates), "budget": self.options.budget,
                "repair": None if self.options.repair is None else asdict(self.options.repair),
                "thresholds": asdict(self.options.thresholds),
                "candidates": [c.to_json(full=False) for c in self.candidates]}

    def to_json(self) -> dict:
        """JSON-ready dict (the `--summary` file's `self_check`)."""
        return {**self.metadata(), "candidates": [c.to_json() for c in self.candidates]}


def _strongest(audit: AuditReport) -> float | None:
    ev = audit.evidence
    values = [v for v in (ev.asr_quantized, ev.fresh_asr) if v is not None]
    return max(values) if values else None


def work_folder(out_path: str | Path, inputs: list[Path]) -> Path:
    """``OUT.selfcheck`` beside the output, checked by `check_work_folder` (never an input,
    never someone else's folder)."""
    out = Path(out_path)
    return check_work_folder(out.with_name(out.name + SUFFIX), inputs, MARKER, "self-check")


def _remove(folder: Path) -> None:
    """Delete the self-check folder's own files (candidates, their checkpoints), then it."""
    if folder.is_symlink() or not (folder / MARKER).is_file():
        return
    for path in sorted(folder.iterdir()):
        if path.is_dir() and not path.is_symlink() and path.name.endswith(".ckpt"):
            for inner in path.iterdir():
                inner.unlink(missing_ok=True)
            path.rmdir()
        elif path.name != MARKER:
            path.unlink(missing_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def scan_options(options: QuantizeOptions, guard: GuardOptions, check: SelfCheckOptions) -> ScanOptions:
    """The audit's scan settings: the defense's own data, scheme, seed and held-out count."""
    deployment = replace(options.deployment, num_calib=max(options.num_calib, 8), opt_level=guard.opt_level)
    return ScanOptions(deployment, budget=check.budget, holdout=guard.images, max_targets=check.max_targets)


def _repair(name: str, flagged: CandidateResult, audit: AuditReport, model_path: str, folder: Path,
            options: QuantizeOptions, guard: GuardOptions, check: SelfCheckOptions, scan: ScanFunction,
            audit_options: ScanOptions) -> CandidateResult | None:
    """Repair the flagged candidate `name` with its audit's triggers, check and audit the result.

    None when the repair cannot run (no held-out image left, or model-ready arrays that no
    trigger can be stamped on): it is said in one line and the order goes on.
    """
    assert check.repair is not None
    repaired_name = name + REPAIR
    log(f"self-check: repairing '{name}' with the {len(audit.triggers)} trigger(s) its audit recovered "
        f"({', '.join(t.source for t in audit.triggers)})")
    t0 = time.perf_counter()
    fp = load_model(model_path)
    try:
        held, _ = holdout_images(fp, options.calib, options.num_calib, guard.images, options.seed,
                                 model_path, options.preprocess, announce=False)
    except NoHoldout as exc:
        log(f"self-check: no repair of '{name}': {exc}")
        return None
    if not isinstance(held, PreparedImages):
        log(f"self-check: no repair of '{name}': its held-out images are model-ready arrays, on which "
            "no trigger can be stamped")
        return None
    repaired, record = repair_model(model_path, str(folder / f"{name}.onnx"), audit.triggers, held,
                                    check.repair, guard.opt_level, options.provider)
    report = check_output(fp, repaired, options, guard, model_path)
    set_metadata(repaired, {"efrap.repair": record.to_json(), "efrap.guard": report.to_json()})
    path = folder / f"{repaired_name}.onnx"
    save_model(repaired, path)
    t1 = time.perf_counter()
    if record.pruned_units == 0:
        why = ("the repair's gap rule found no outlier unit: nothing was pruned, and the model is the "
               f"candidate '{name}' itself",)
        return CandidateResult(repaired_name, flagged.method, False, flagged.verdict,
                               (*why, *flagged.reasons), report, flagged.strongest_asr, t1 - t0, 0.0, {},
                               record.to_json())
    audit2 = audit_models(model_path, str(path), scan, audit_options, check.thresholds)
    t2 = time.perf_counter()
    passed = report.passed and not audit2.verdict.flagged
    return CandidateResult(repaired_name, flagged.method, passed, audit2.verdict.verdict,
                           (*audit2.verdict.reasons, *report.why), report, _strongest(audit2), t1 - t0,
                           t2 - t1, audit2.to_json(), record.to_json())


def self_checking_defend(model_path: str, out_path: str, options: QuantizeOptions, guard: GuardOptions,
                         check: SelfCheckOptions, scan: ScanFunction, resume: bool = True,
                         on_candidate: Callable[[CandidateResult], None] | None = None) -> SelfCheckResult:
    """Round the candidates in order, audit each, ship the first that passes (else the best).

    Args:
        model_path: The FP ONNX model.
        out_path: Where the shipped model goes.
        options: Scheme, data, seed, device and preprocessing of every candidate (their
            method and rounding settings come from the candidates).
        guard: Every candidate's check against FP.
        check: The self-check's settings.
        scan: `pipeline.scan.scan_model` (or a stand-in with its signature, returning a
            `ScanReport`; one whose reports keep no trigger leaves nothing to repair).
        resume: Keep per-layer checkpoints of the candidates (see `quantize_file`).
        on_candidate: Called with each candidate's result as soon as it exists.

    Returns:
        The outcome; `passed` is False when no candidate passed (the best one is written).
    """
    inputs = [*model_files(model_path), *data_mod.spec_files(options.calib)]
    check_outputs({"output": out_path}, inputs)
    folder = work_folder(out_path, inputs)
    folder.mkdir(exist_ok=True)
    (folder / MARKER).write_text("efrap-onnx self-check\n", encoding="utf-8")
    audit_options = scan_options(options, guard, check)
    results: list[CandidateResult] = []
    summaries: dict[str, QuantizeSummary] = {}
    repaired = check.repair is None
    for name in check.candidates:
        cand = CANDIDATES[name]
        learned = isinstance(cand.config, LearnedSettings)
        config = replace(cand.config, iters=check.iters) if check.iters is not None and learned \
            else cand.config
        path = folder / f"{name}.onnx"
        steps = f"{config.iters} iterations per layer" if learned else "no learned rounding"
        log(f"self-check: candidate {len(results) + 1}/{len(check.candidates)} '{name}' "
            f"({cand.method}, {steps})")
        t0 = time.perf_counter()
        summary, report = quantize_file(model_path, str(path), replace(options, method=cand.method,
                                                                       rounding=config), guard, resume)
        t1 = time.perf_counter()
        audit = audit_models(model_path, str(path), scan, audit_options, check.thresholds)
        t2 = time.perf_counter()
        passed = report.passed and not audit.verdict.flagged
        reasons = (*audit.verdict.reasons, *report.why)
        result = CandidateResult(name, cand.method, passed, audit.verdict.verdict, reasons, report,
                                 _strongest(audit), t1 - t0, t2 - t1, audit.to_json())
        results.append(result)
        summaries[name] = summary
        if on_candidate is not None:
            on_candidate(result)
        if passed:
            break
        if repaired or not audit.triggers:
            continue
        repaired = True  # only the first flagged candidate: one repair bounds the cost
        fixed = _repair(name, result, audit, model_path, folder, options, guard, check, scan, audit_options)
        if fixed is None:
            continue
        results.append(fixed)
        summaries[fixed.name] = summary
        if on_candidate is not None:
            on_candidate(fixed)
        if fixed.passed:
            break
    shipped = next((r for r in results if r.passed), None) or min(results, key=CandidateResult.rank)
    outcome = SelfCheckResult(shipped.name, shipped.passed, tuple(results), summaries[shipped.name],
                              shipped.guard, check)
    model = load_model(folder / f"{shipped.name}.onnx")
    set_metadata(model, {"efrap.self_check": outcome.metadata()})
    save_model(model, out_path)
    _remove(folder)
    return outcome
