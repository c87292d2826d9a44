"""The release gate's configuration file (`efrap gate CONFIG.toml`).

A config file is untrusted data. It is read once by `pipeline.base.checks.load_config`
(size, nesting depth and non-finite numbers refused), every field is typed strictly
(an integer is never 8.0 or "8", a flag never "true"), unknown keys are refused, and
every error is one line naming the file and the field. Paths (the model, the output
folder, a data spec's file) are relative to the config file's folder. Example::

    model = "fmnist_compartifact_w4a4.onnx"   # the FP ONNX model to release
    data = "fashion-mnist"                     # data spec: scan, calibration, test split
    scheme = "w4a4"                            # deployment scheme: preset or .json/.toml file
    output = "gate-out"                        # folder for the reports and the defended model

    [preprocess]            # optional: for models that record no preprocessing
    mean = [0.286]
    std = [0.353]

    [scan]                  # optional
    budget = 600.0          # seconds (default: no limit)
    num_calib = 1024
    holdout = 1000
    max_targets = 10
    seed = 0

    [defend]                # optional
    method = "efrap"        # efrap, adaround, lac or nearest
    preset = "default"      # EFRAP's: default (the project's rule, as efrap defend) or release
    iters = 10000           # default: the method's own
    num_calib = 1024
    seed = 0
    holdout = 1000          # held-out images of the agreement check
    weight_storage = "int8"

    [verify]                # optional
    opt_level = "faithful"  # or "all" (what a deployment runs)
    provider = "auto"
    limit = 10000           # test images (default: all)

    [thresholds]
    max_trigger_asr = 0.05      # recovered trigger's attack success on the defended model
    max_agreement_drop = 0.02   # held-out images whose prediction may differ from FP
    min_accuracy = 0.85         # clean accuracy of the defended model on the test split
    fail_verdicts = ["fp-backdoor"]   # scan verdicts that fail the release ("fp-backdoor" always does)

Thresholds are fractions in [0, 1] or percentages written as strings ("5%"). A limit
that no model can fail (an attack success of at most 100%, an accuracy of at least 0)
is refused: a gate must be able to fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.base import checks, limits
from pipeline.base.data import relative_path, spec_from_config
from pipeline.base.errors import EfrapError
from pipeline.base.preprocess import from_table
from pipeline.base.runtime import PROVIDERS
from pipeline.base.safe_io import check_output_folder
from pipeline.base.scheme import PRESETS
from pipeline.rounding import METHODS
from pipeline.rounding.efrap import EFRAP_PRESETS
from pipeline.rounding.settings import DEFAULT_PRESET, method_settings
from validators.guard import GuardLimits
from validators.limits import VerifyLimits

#: Scan verdicts (pipeline.scan): a backdoor active in FP always fails, since no rounding fixes it.
SCAN_VERDICTS = ("qcb", "fp-backdoor", "clean")
ALWAYS_FAIL = ("fp-backdoor",)
#: The recovered trigger's largest attack success on the defended model, unless the config says.
DEFAULT_MAX_TRIGGER_ASR = 0.05
OPT_LEVELS = ("faithful", "all")
WEIGHT_STORAGES = ("int8", "int4")
_TOP = frozenset({"model", "data", "scheme", "output", "preprocess", "scan", "defend", "verify",
                  "thresholds"})
_SCAN = frozenset({"budget", "num_calib", "holdout", "max_targets", "seed"})
_DEFEND = frozenset({"method", "preset", "iters", "num_calib", "seed", "holdout", "weight_storage", "device"})
_VERIFY = frozenset({"opt_level", "provider", "limit"})
_THRESHOLDS = frozenset({"max_trigger_asr", "max_agreement_drop", "min_accuracy", "fail_verdicts"})
#: Most iterations per layer a config may ask for (the command line's cap too).
MAX_ITERS = limits.ITERS.high
#: Most images any count in a config may name (the command line's cap too).
MAX_IMAGES = limits.IMAGES.high


@dataclass(frozen=True)
class ScanSettings:
    """How the scan runs (pipeline.scan.ScanOptions)."""

    budget: float | None = None
    num_calib: int = 1024
    holdout: int = 1000
    max_targets: int = 10
    seed: int = 0


@dataclass(frozen=True)
class DefendSettings:
    """How the model is defended (`efrap defend` / `efrap quantize`)."""

    method: str = "efrap"
    preset: str = "default"
    iters: int | None = None
    num_calib: int = 1024
    seed: int = 0
    holdout: int = 1000
    weight_storage: str = "int8"
    device: str = "auto"


@dataclass(frozen=True)
class VerifySettings:
    """Where the figures are measured (onnxruntime)."""

    opt_level: str = "faithful"
    provider: str = "auto"
    limit: int | None = None


@dataclass(frozen=True)
class Thresholds:
    """What fails the release: the defense check's and verification's own limit types, and
    the scan verdicts (each limit has one owner and one validation).

    Attributes:
        check: The check against FP on held-out training images: `max_agreement_drop`,
            the largest share whose defended prediction differs from FP's.
        verify: The defended model on the test split: `max_asr`, the largest attack
            success of the recovered trigger (images whose label is not the target), and
            `min_accuracy`, the lowest clean accuracy.
        fail_verdicts: Scan verdicts that fail the release; always holds "fp-backdoor".
    """

    check: GuardLimits = field(default_factory=GuardLimits)
    verify: VerifyLimits = field(default_factory=lambda: VerifyLimits(max_asr=DEFAULT_MAX_TRIGGER_ASR))
    fail_verdicts: tuple[str, ...] = ALWAYS_FAIL

    def to_json(self) -> dict[str, Any]:
        """The thresholds as the config names them (the report's `config.thresholds`)."""
        return {"max_trigger_asr": self.verify.max_asr, "max_agreement_drop": self.check.max_agreement_drop,
                "min_accuracy": self.verify.min_accuracy, "fail_verdicts": list(self.fail_verdicts)}


@dataclass(frozen=True)
class GateConfig:
    """A checked gate configuration (built by `load_gate_config`).

    Attributes:
        source: The config file.
        model: The FP model (resolved against the config's folder).
        data: The data spec (a relative file resolved likewise).
        scheme: Preset name or scheme file (resolved likewise).
        output: The output folder (resolved likewise).
        preprocess: Checked [preprocess] fields, or None.
        scan: Scan settings.
        defend: Defense settings.
        verify: Verification settings.
        thresholds: What fails the release.
    """

    source: Path
    model: Path
    data: str
    scheme: str
    output: Path
    preprocess: dict | None = None
    scan: ScanSettings = field(default_factory=ScanSettings)
    defend: DefendSettings = field(default_factory=DefendSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)
    thresholds: Thresholds = field(default_factory=Thresholds)


def _limit(value: object, what: str, useless: float) -> float:
    if isinstance(value, str):
        number = checks.fraction(value, what)
    else:
        number = checks.finite(value, what, low=0.0, high=1.0)  # type: ignore[arg-type]
    if number == useless:
        raise EfrapError(f"{what} {number:g} lets every model pass; a gate must be able to fail")
    return number


def _count(raw: Mapping[str, Any], key: str, where: str, default: int | None,
           cap: limits.Cap = limits.IMAGES) -> int | None:
    if key not in raw:
        return default
    return cap.check(raw[key], f"{where}.{key}")


def _resolve(base: Path, value: str) -> Path:
    return relative_path(value, base)


def _scan(raw: object, source: str) -> ScanSettings:
    where = f"{source}: scan"
    t = checks.table(raw, where, _SCAN)
    budget = None
    if "budget" in t:
        budget = checks.finite(t["budget"], f"{where}.budget", low=0.0, low_open=True)
    return ScanSettings(budget=budget,
                        num_calib=_count(t, "num_calib", where, 1024, limits.SCAN_CALIB) or 1024,
                        holdout=_count(t, "holdout", where, 1000) or 1000,
                        max_targets=_count(t, "max_targets", where, 10, limits.TARGETS) or 10,
                        seed=_count(t, "seed", where, 0, limits.SEED) or 0)


def _defend(raw: object, source: str) -> DefendSettings:
    where = f"{source}: defend"
    t = checks.table(raw, where, _DEFEND)
    method = checks.string(t.get("method", "efrap"), f"{where}.method", tuple(METHODS))
    preset = checks.string(t.get("preset", DEFAULT_PRESET), f"{where}.preset", tuple(EFRAP_PRESETS))
    iters = _count(t, "iters", where, None, limits.ITERS)
    try:  # the one preset resolution (pipeline.rounding.settings), refused here, before any work
        method_settings(method, t.get("preset"), None if iters is None else {"iters": iters})
    except EfrapError as exc:
        raise EfrapError(f"{where}.preset: {exc}" if "preset" in str(exc) else f"{where}: {exc}") from None
    return DefendSettings(
        method=method, preset=preset, iters=iters,
        num_calib=_count(t, "num_calib", where, 1024) or 1024,
        seed=_count(t, "seed", where, 0, limits.SEED) or 0,
        holdout=_count(t, "holdout", where, 1000) or 1000,
        weight_storage=checks.string(t.get("weight_storage", "int8"), f"{where}.weight_storage",
                                     WEIGHT_STORAGES),
        device=checks.string(t.get("device", "auto"), f"{where}.device", ("auto", "cpu", "cuda")))


def _verify(raw: object, source: str) -> VerifySettings:
    where = f"{source}: verify"
    t = checks.table(raw, where, _VERIFY)
    return VerifySettings(opt_level=checks.string(t.get("opt_level", "faithful"), f"{where}.opt_level",
                                                  OPT_LEVELS),
                          provider=checks.string(t.get("provider", "auto"), f"{where}.provider", PROVIDERS),
                          limit=_count(t, "limit", where, None))


def _thresholds(raw: object, source: str) -> Thresholds:
    where = f"{source}: thresholds"
    t = checks.table(raw, where, _THRESHOLDS)
    verdicts = t.get("fail_verdicts", list(ALWAYS_FAIL))
    if not isinstance(verdicts, list):
        raise EfrapError(f"{where}.fail_verdicts must be a list of verdicts ({', '.join(SCAN_VERDICTS)})")
    chosen = [checks.string(v, f"{where}.fail_verdicts", SCAN_VERDICTS) for v in verdicts]
    if "clean" in chosen:
        raise EfrapError(f"{where}.fail_verdicts: 'clean' would fail every clean model")
    def given(key: str, useless: float, default: float | None = None) -> float | None:
        return _limit(t[key], f"{where}.{key}", useless) if key in t else default

    return Thresholds(
        check=GuardLimits(max_agreement_drop=given("max_agreement_drop", 1.0)),
        verify=VerifyLimits(max_asr=given("max_trigger_asr", 1.0, DEFAULT_MAX_TRIGGER_ASR),
                            min_accuracy=given("min_accuracy", 0.0)),
        fail_verdicts=tuple(dict.fromkeys([*ALWAYS_FAIL, *chosen])))


def gate_config_from_dict(data: object, source: str, base: Path) -> GateConfig:
    """Validate parsed config data; relative paths are taken from `base`.

    Raises:
        EfrapError: one line naming `source` and the field.
    """
    raw = checks.table(data, f"{source}: the config", _TOP)
    for key in ("model", "data", "scheme", "output"):
        if key not in raw:
            raise EfrapError(f"{source}: {key}: missing (the config needs model, data, scheme and output)")
        checks.string(raw[key], f"{source}: {key}")
    model = _resolve(base, raw["model"])
    if not model.is_file():
        raise EfrapError(f"{source}: model: no such file '{raw['model']}' (paths are relative to the "
                         "config's folder)")
    scheme = raw["scheme"]
    if scheme not in PRESETS:
        path = _resolve(base, scheme)
        if path.suffix.lower() not in (".json", ".toml") or not path.is_file():
            raise EfrapError(f"{source}: scheme: '{scheme}' is neither a preset ({', '.join(PRESETS)}) nor "
                             "a .json/.toml scheme file")
        scheme = str(path)
    preprocess = None
    if "preprocess" in raw:
        preprocess = from_table(raw["preprocess"], source) or None
    output = _resolve(base, raw["output"])
    try:
        check_output_folder(output, "the output folder")
    except EfrapError as exc:
        raise EfrapError(f"{source}: output: {exc}") from None
    return GateConfig(
        source=Path(source), model=model, data=spec_from_config(raw["data"], base, f"{source}: data"),
        scheme=scheme, output=output, preprocess=preprocess,
        scan=_scan(raw.get("scan", {}), source), defend=_defend(raw.get("defend", {}), source),
        verify=_verify(raw.get("verify", {}), source),
        thresholds=_thresholds(raw.get("thresholds", {}), source))


def load_gate_config(path: str | Path) -> GateConfig:
    """Read and check a gate config file (.toml or .json).

    Raises:
        EfrapError: unreadable file or any invalid field (one line naming the file and field).
    """
    path = Path(path)
    if path.suffix.lower() not in (".toml", ".json"):
        raise EfrapError(f"{path}: a gate config is a .toml (or .json) file")
    data = checks.load_config(path, "gate config")
    return gate_config_from_dict(data, str(path), path.resolve().parent)
