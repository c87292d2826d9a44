"""The release gate: scan, then defend, then verify, against thresholds from a config file.

1. Scan (pipeline.scan): with no trigger and clean unlabelled training images, is the FP
   model a quantization-conditioned backdoor ("qcb"), a backdoor active in FP
   ("fp-backdoor") or "clean"? A recovered trigger comes with it.
2. Defend: EFRAP (or the configured method) writes the defended QDQ model, and the
   defense's own check compares it with FP on held-out training images (agreement).
3. Verify in onnxruntime on the test split: the defended model's clean accuracy, per
   class, and the recovered trigger's attack success on the defended and the FP model.

The release fails when the scan's verdict is one the config lists ("fp-backdoor"
always: EFRAP changes how weights round, and a backdoor active in FP needs no
rounding) or "inconclusive" (the scan's budget stopped it: a search that did not run
clears nothing), when the recovered trigger still works on the defended model, when the
defended model disagrees with FP or loses accuracy beyond the limits, or when any of
these figures cannot be measured (the gate fails closed). Every figure is reported
with what it was measured on: the model's sha256, the data, the onnxruntime
optimization level and provider.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pipeline.base import data as data_mod
from pipeline.base.deployment import Deployment
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import image_input, load_model, model_files
from pipeline.base.preprocess import resolve
from pipeline.base.progress import log
from pipeline.base.provenance import versions
from pipeline.base.runtime import make_session
from pipeline.base.safe_io import check_outputs, file_sha256
from pipeline.base.scheme import load_scheme, scheme_files
from pipeline.base.trigger import AnyTrigger
from pipeline.gate.config import SCAN_VERDICTS, GateConfig
from pipeline.quantize import QuantizeSummary
from pipeline.release_spec import ReleaseSpec, RoundingChoice, ScanChoice
from pipeline.runner import Release, run_release
from pipeline.scan import scan_model
from pipeline.scan.report import ScanFunction, ScanReport
from validators.guard import GuardReport
from validators.verify import VerifyReport

#: The files the gate writes into its output folder.
OUTPUT_FILES = {"json": "report.json", "markdown": "summary.md", "html": "report.html",
                "defended": "defended.onnx", "trigger": "recovered.trigger.json",
                "trigger_npz": "recovered.trigger.npz"}



@dataclass(frozen=True)
class Check:
    """One condition of the release.

    Attributes:
        name: What is checked.
        limit: The threshold as written ("<= 5.00%", "not in [fp-backdoor]").
        value: The measured value (a fraction, a verdict), or None when not measurable.
        passed: Whether it holds.
        why: Why it failed or could not be measured.
        measured_on: The model's sha256, the data, images, opt level and provider.
    """

    name: str
    limit: str
    value: float | str | None
    passed: bool
    why: str = ""
    measured_on: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PerClass:
    """Clean accuracy per class of the FP and defended models (test split)."""

    classes: tuple[int, ...]
    fp: tuple[float | None, ...]
    defended: tuple[float | None, ...]
    images: tuple[int, ...]


@dataclass(frozen=True)
class TriggerExample:
    """A test image, its triggered copy and what each model predicts."""

    clean: np.ndarray
    triggered: np.ndarray
    label: int
    fp_clean: int
    fp_triggered: int
    defended_triggered: int


@dataclass(frozen=True)
class GateRun:
    """Everything one gate run decided and measured (the reports are written from it)."""

    config: GateConfig
    model_sha256: str
    scan: ScanReport
    trigger: AnyTrigger | None
    scan_seconds: float
    defend: QuantizeSummary
    guard: GuardReport | None
    defended_path: Path
    defended_sha256: str
    verify_defended: VerifyReport
    verify_fp: VerifyReport
    per_class: PerClass
    example: TriggerExample | None
    checks: tuple[Check, ...]
    seconds: dict[str, float]
    versions: dict[str, str] = field(default_factory=versions)

    @property
    def passed(self) -> bool:
        """Whether every check held."""
        return all(c.passed for c in self.checks)

    def scan_json(self) -> dict[str, object]:
        """The scan report's JSON, naming the trigger file the gate saved (when it saved one)."""
        return self.scan.to_json(trigger_file(self.config, self.trigger))


def output_paths(config: GateConfig) -> dict[str, Path]:
    """Where each output goes."""
    return {key: config.output / name for key, name in OUTPUT_FILES.items()}


def trigger_file(config: GateConfig, trigger: AnyTrigger | None) -> str | None:
    """Where the gate saves the recovered trigger (None: the scan recovered none)."""
    return str(output_paths(config)["trigger"]) if trigger is not None else None


def _read_inputs(config: GateConfig) -> None:
    """Read what the stages read, once, so that a missing data set or a bad model or scheme
    file is a one-line user mistake before anything is written."""
    where = "model"
    try:
        model = load_model(config.model)
        where = "scheme"
        load_scheme(config.scheme)
        where = "preprocess"
        size = _resize(config, model)
        where = "data"
        # Calibration needs no labels; verification does.
        data_mod.load_images(config.data, "train", size)
        data_mod.load_dataset(config.data, "test", size)
    except EfrapError as exc:
        raise EfrapError(f"{config.source}: {where}: {exc}") from None


def prepare_output(config: GateConfig) -> bool:
    """Check every output before any work and create the output folder.

    Returns:
        Whether the folder was created here (the caller removes it if nothing follows).

    Raises:
        EfrapError: an output that would overwrite an input, a folder that cannot be made.
    """
    out = config.output
    if out.exists() and not out.is_dir():
        raise EfrapError(f"{config.source}: output: '{out}' exists and is not a folder")
    if not out.parent.is_dir():
        raise EfrapError(f"{config.source}: output: the folder above '{out}' does not exist")
    try:
        inputs = [config.source, *model_files(config.model), *data_mod.spec_files(config.data),
                  *scheme_files(config.scheme)]
    except EfrapError as exc:
        raise EfrapError(f"{config.source}: model: {exc}") from None
    _read_inputs(config)
    for src in inputs:
        if Path(src).is_dir() and Path(src).resolve() in [out.resolve(), *out.resolve().parents]:
            raise EfrapError(f"{config.source}: output: '{out}' is inside the input folder {src}")
    created = not out.exists()
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise EfrapError(f"{config.source}: output: cannot create '{out}' ({exc.strerror})") from None
    try:
        check_outputs({f"output {k}": p for k, p in output_paths(config).items()}, inputs)
    except EfrapError:
        if created:
            out.rmdir()
        raise
    return created


def release_spec(config: GateConfig) -> ReleaseSpec:
    """The config as the one release spec: its scan, defense and verification settings."""
    d, s, v = config.defend, config.scan, config.verify
    deployment = Deployment(scheme=load_scheme(config.scheme), data=config.data, num_calib=d.num_calib,
                            seed=d.seed, provider=v.provider, opt_level=v.opt_level,
                            preprocess=config.preprocess)
    # As efrap defend: EFRAP's preset (the project's default rule unless the config says release).
    rounding = RoundingChoice(d.method, d.preset, {} if d.iters is None else {"iters": d.iters},
                              d.weight_storage, d.device)
    return ReleaseSpec(deployment, rounding, holdout=d.holdout,
                       check=config.thresholds.check,
                       scan=ScanChoice(s.budget, s.holdout, s.max_targets, s.num_calib, s.seed),
                       limit=v.limit, verify_seed=0)


def _measured(model: str, sha256: str, data: str, split: str, images: int | None, opt_level: str,
              provider: str) -> dict[str, Any]:
    return {"model": model, "sha256": sha256, "data": data, "split": split, "images": images,
            "opt_level": opt_level, "provider": provider}


def _resize(config: GateConfig, model: onnx.ModelProto) -> tuple[int, int] | None:
    """The size the FP model's preprocessing resizes to (an image folder of mixed sizes is
    resized to it as it is read)."""
    return resolve(model, image_input(model, str(config.model)), config.preprocess, str(config.model),
                   announce=False).resize


def _test_images(config: GateConfig, size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """The test images and labels `verify_model` measures (the same choice as its --limit)."""
    test = data_mod.load_dataset(config.data, "test", size)
    limit = config.verify.limit
    if limit is None or limit >= len(test.labels):
        return test.images, test.labels
    idx = data_mod.sample_indices(len(test.labels), limit, 0)
    return test.take(idx), test.labels[idx]


def _per_class(config: GateConfig, defended: Path, trigger: AnyTrigger | None
               ) -> tuple[PerClass, TriggerExample | None]:
    """Per-class clean accuracy of FP and defended, and one triggered example."""
    fp_model, d_model = load_model(config.model), load_model(defended)
    pre = resolve(fp_model, image_input(fp_model, str(config.model)), config.preprocess, str(config.model),
                  announce=False)
    images, labels = _test_images(config, pre.resize)
    v = config.verify
    fp_s = make_session(fp_model, v.opt_level, v.provider)
    d_s = make_session(d_model, v.opt_level, v.provider)
    fp_pred, d_pred = fp_s.run(pre.apply(images)).argmax(1), d_s.run(pre.apply(images)).argmax(1)
    classes = tuple(range(int(max(labels.max(), fp_pred.max(), d_pred.max())) + 1))
    fp_acc, d_acc, counts = [], [], []
    for c in classes:
        sel = labels == c
        counts.append(int(sel.sum()))
        fp_acc.append(float((fp_pred[sel] == c).mean()) if sel.any() else None)
        d_acc.append(float((d_pred[sel] == c).mean()) if sel.any() else None)
    example = None
    if trigger is not None:
        pick = np.flatnonzero((labels != trigger.target) & (fp_pred == labels))
        i = int(pick[0]) if len(pick) else 0
        clean = images[i : i + 1]
        stamped = trigger.apply(clean)
        example = TriggerExample(clean=clean[0], triggered=stamped[0], label=int(labels[i]),
                                 fp_clean=int(fp_pred[i]),
                                 fp_triggered=int(fp_s.run(pre.apply(stamped)).argmax(1)[0]),
                                 defended_triggered=int(d_s.run(pre.apply(stamped)).argmax(1)[0]))
    return PerClass(classes, tuple(fp_acc), tuple(d_acc), tuple(counts)), example


def scan_measured_on(config: GateConfig, sha256: str, scan: ScanReport) -> dict[str, Any]:
    """What the scan's figures were measured on: the FP model, the scan's data and held-out images."""
    on = scan.measured_on()
    return _measured(str(config.model), sha256, on.data, "train, held out", on.holdout_images, on.opt_level,
                     on.provider)


def _verdict_check(config: GateConfig, scan: ScanReport, sha256: str) -> Check:
    """The scan's verdict against `fail_verdicts`; an unfinished scan fails whatever the config says."""
    verdict = scan.verdict.verdict
    fail = config.thresholds.fail_verdicts
    measured = scan_measured_on(config, sha256, scan)
    limit = f"not in [{', '.join(fail)}], not inconclusive"
    # Fails closed: only a finished scan with a verdict the gate knows can pass (anything but an
    # explicit cut_short=False is not a finished scan).
    if verdict == "inconclusive" or scan.cut_short is not False:
        why = scan.verdict.reason or "the scan does not say that every search ran to its end"
        return Check("scan verdict", limit, "inconclusive", False,
                     f"the scan did not finish, so it clears nothing: {why}", measured)
    if verdict not in SCAN_VERDICTS:
        return Check("scan verdict", limit, verdict, False, f"unknown scan verdict {verdict!r}", measured)
    passed = verdict not in fail
    why = "" if passed else (
        "a backdoor active in FP: no rounding of the weights can fix it" if verdict == "fp-backdoor"
        else f"the scan's verdict is {verdict}, which the config fails")
    return Check("scan verdict", limit, verdict, passed, why, measured)


def _limit_check(name: str, value: float | None, limit: float, upper: bool, why_missing: str,
                 measured: dict[str, Any]) -> Check:
    """A figure against its limit; a figure that is missing or not a number fails (not measurable)."""
    text = f"{'<=' if upper else '>='} {100 * limit:.2f}%"
    if value is None or not math.isfinite(value):
        return Check(name, text, None, False, why_missing or "not measurable", measured)
    ok = value <= limit if upper else value >= limit
    why = "" if ok else f"{100 * value:.2f}% is {'above' if upper else 'below'} the limit {100 * limit:.2f}%"
    return Check(name, text, value, ok, why, measured)


def evaluate(config: GateConfig, scan: ScanReport, sha256: str, guard: GuardReport | None,
             defended_sha256: str, verify_defended: VerifyReport,
             trigger: AnyTrigger | None) -> tuple[Check, ...]:
    """Every check of the release, in order (scan verdict, trigger, agreement, accuracy)."""
    t = config.thresholds.verify
    max_drop = config.thresholds.check.max_agreement_drop
    checks = [_verdict_check(config, scan, sha256)]
    vd = verify_defended
    measured = _measured(str(vd.model), defended_sha256, vd.data, vd.split, vd.images, vd.opt_level,
                         vd.provider)
    if t.max_asr is not None:
        if trigger is None:
            # No trigger, no figure: the check asks for one, so it fails (never a pass by default).
            checks.append(Check("recovered trigger on the defended model",
                                f"<= {100 * t.max_asr:.2f}%", None, False,
                                "not measurable: the scan recovered no trigger", measured))
        else:
            checks.append(_limit_check("recovered trigger on the defended model", vd.attack_success_rate,
                                       t.max_asr, True, vd.not_measurable.get("asr", ""), measured))
    if max_drop is not None:
        g_measured = _measured(str(vd.model), defended_sha256, config.data, "train, held out",
                               guard.images if guard else None, guard.opt_level if guard else "",
                               guard.provider if guard else "")
        drop = None if guard is None or guard.agreement is None else 1.0 - guard.agreement
        checks.append(_limit_check("agreement drop against FP", drop, max_drop, True,
                                   "the defense's check did not run", g_measured))
    if t.min_accuracy is not None:
        checks.append(_limit_check("clean accuracy of the defended model", vd.clean_accuracy, t.min_accuracy,
                                   False, vd.not_measurable.get("accuracy", ""), measured))
    return tuple(checks)


def run_gate(config: GateConfig, scan: ScanFunction = scan_model) -> GateRun:
    """Scan, defend and verify the config's model; write nothing but the defended model and trigger.

    The caller checks the outputs first (`prepare_output`) and writes the reports
    (`pipeline.gate.report.write_reports`).

    Args:
        config: The checked config.
        scan: `pipeline.scan.scan_model` or a stand-in with its signature (tests).
    """
    paths = output_paths(config)
    sha256 = file_sha256(config.model)
    spec = release_spec(config)
    # Verification measures the recovered trigger as saved (as a user re-checks it with
    # efrap verify --trigger): the release names none of its own.
    release = Release(model=config.model, output=paths["defended"], quantize=spec.quantize_options(),
                      guard=spec.guard_options(), verify=spec.verify_options(), scan=spec.scan_options(),
                      trigger_out=paths["trigger"], verify_fp=True)
    stages = {"scan": f"1/3 scan of {config.model}",
              "defend": f"2/3 defense ({config.defend.method}, scheme {config.scheme})",
              "verify": "3/3 verification in onnxruntime"}
    t0 = time.perf_counter()
    run = run_release(release, scan, on_step=lambda name: log(f"gate: {stages[name]}"))
    if run.scan is None or run.verify.fp is None:  # the release asked for both; never reached
        raise EfrapError("the gate's release ran without its scan or the FP model's verification")
    report, trigger = run.scan.report, run.scan.trigger
    per_class, example = _per_class(config, paths["defended"], trigger)
    checks = evaluate(config, report, sha256, run.defend.guard, run.defend.sha256, run.verify.output, trigger)
    total = time.perf_counter() - t0
    verify_seconds = total - run.scan.seconds - run.defend.seconds
    return GateRun(config=config, model_sha256=sha256, scan=report, trigger=trigger,
                   scan_seconds=run.scan.seconds, defend=run.defend.summary, guard=run.defend.guard,
                   defended_path=paths["defended"], defended_sha256=run.defend.sha256,
                   verify_defended=run.verify.output, verify_fp=run.verify.fp, per_class=per_class,
                   example=example, checks=checks,
                   seconds={"scan": round(run.scan.seconds, 2), "defend": round(run.defend.seconds, 2),
                            "verify": round(verify_seconds, 2), "total": round(total, 2)})
