"""The batch manifest: which models to defend, with what settings, read as untrusted data.

A manifest is a TOML (or JSON) file: a ``[defaults]`` table that every model inherits
and a list of ``[[model]]`` tables that may override any default::

    [defaults]
    data = "fashion-mnist"        # verification data (test split); calibration too unless `calib`
    scheme = "w4a4"               # preset or a .toml/.json scheme file
    method = "efrap"              # efrap is `efrap defend`; nearest, adaround, lac are `efrap quantize`
    preset = "default"            # EFRAP's settings, as `efrap defend --preset`: default, release, fast
    [defaults.rounding]
    iters = 200
    [defaults.gate]
    max_asr = "5%"

    [[model]]
    name = "compartifact_w4a4"
    path = "models/zoo/fmnist_compartifact_w4a4.onnx"
    trigger = "models/zoo/fmnist_compartifact_w4a4.trigger.json"

    [[model]]
    path = "~/.cache/efrap-onnx/corpus/mobilenet_v3_small.dynamo.onnx"
    calib = "npz:~/.cache/efrap-onnx/corpus/data/fmnist32_train.npz"
    data = "npz:~/.cache/efrap-onnx/corpus/data/fmnist32_test.npz"
    method = "nearest"
    scheme = "w8a8"
    [model.preprocess]
    mean = [0.219, 0.219, 0.219]
    std = [0.3318, 0.3318, 0.3318]

Every value is checked once, here, with its exact type (an integer is never 8.0, a
boolean never "true"); unknown keys are refused; relative paths (models, triggers,
data specs, scheme files) are relative to the manifest's folder and ``~`` is the home
folder. Errors are one line naming the file and the field. Files a model reads (its
ONNX file, trigger, data) are not opened here: a missing one fails that model alone
when the batch runs, and the others go on.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from converters.qdq import WEIGHT_STORAGES
from pipeline.base import checks, limits
from pipeline.base.data import DEFAULT_DATA, relative_path, spec_from_config
from pipeline.base.deployment import Deployment
from pipeline.base.device import DEVICES
from pipeline.base.errors import EfrapError
from pipeline.base.preprocess import from_table
from pipeline.base.runtime import PROVIDERS
from pipeline.base.safe_io import file_sha256
from pipeline.base.scheme import DEFAULT_SCHEME, PRESETS, load_scheme
from pipeline.base.trigger import trigger_files
from pipeline.quantize import GuardOptions, QuantizeOptions
from pipeline.release_spec import ReleaseSpec, RoundingChoice, ScanChoice
from pipeline.rounding import METHODS, run_needs
from pipeline.rounding.efrap import EFRAP_PRESETS
from pipeline.rounding.settings import FIELD_TYPES
from validators.guard import GuardLimits
from validators.limits import VerifyLimits

#: Version of the settings that make a result's key; a change here recomputes old results.
SETTINGS_FORMAT = 1
#: Most models one manifest may list.
MAX_MODELS = 10_000
#: Largest seed (torch, numpy and the seed derivation all take a 63-bit integer).
MAX_SEED = limits.SEED.high
#: A model's name is its output folder's name: portable, no path separators, no leading dot.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
OPT_LEVELS = ("faithful", "all")
#: Keys of [defaults] and of each [[model]]; `name`, `path` and `trigger` belong to a model only.
SETTING_KEYS = frozenset({"data", "calib", "scheme", "method", "preset", "num_calib", "seed",
                          "weight_storage",
                          "device", "provider", "exclude", "holdout", "limit", "opt_level", "verify_fp",
                          "scan", "scan_budget", "rounding", "preprocess", "gate"})
MODEL_KEYS = SETTING_KEYS | {"name", "path", "trigger"}
GATE_KEYS = frozenset({"max_agreement_drop", "min_accuracy", "max_asr"})
#: The [rounding] table's keys and their types: every method's settings (`FIELD_TYPES`); the
#: method's own settings refuse a field it does not have when the job is built.
_ROUNDING_FIELDS = FIELD_TYPES


@dataclass(frozen=True)
class ModelJob:
    """One model of the batch and everything its run needs (checked when the manifest is read).

    Attributes:
        name: Unique name; the model's output folder under --out.
        path: The FP ONNX model (absolute).
        spec: What the manifest asks of it (`pipeline.release_spec.ReleaseSpec`): its
            deployment, rounding, check, scan, verification and trigger (absolute, or None:
            attack success is then not measured).
        verify_fp: Also verify the FP model (its clean accuracy and attack success).
        scheme_spec: The scheme as the manifest names it (a preset or a file).
    """

    name: str
    path: str
    spec: ReleaseSpec
    verify_fp: bool = True
    scheme_spec: str = DEFAULT_SCHEME

    # Built once per job (the rounding settings are resolved there), not at every read.
    @cached_property
    def options(self) -> QuantizeOptions:
        """The quantization settings, built by the spec (checked when the manifest is read)."""
        return self.spec.quantize_options()

    @cached_property
    def guard(self) -> GuardOptions:
        """The defended model's check against FP on held-out training images."""
        return self.spec.guard_options()

    @property
    def trigger(self) -> str | None:
        """The trigger file (None: attack success is not measured)."""
        return self.spec.trigger

    @property
    def data(self) -> str:
        """Verification data spec (test split)."""
        return self.spec.deployment.data

    @property
    def limit(self) -> int | None:
        """Test images used by verification (None: all)."""
        return self.spec.limit

    @property
    def opt_level(self) -> str:
        """onnxruntime optimization level of verification, the check and the scan."""
        return self.spec.deployment.opt_level

    @property
    def gate(self) -> VerifyLimits:
        """Thresholds on the verified output (clean accuracy, attack success)."""
        return self.spec.limits

    @property
    def scan(self) -> bool:
        """Whether the trigger-free scan runs."""
        return self.spec.scan is not None

    @property
    def scan_budget(self) -> float | None:
        """Seconds the scan may take (None: no limit)."""
        return None if self.spec.scan is None else self.spec.scan.budget

    @property
    def step(self) -> str:
        """The quantization step's name: `defend` for EFRAP, else `quantize`."""
        return "defend" if self.options.method == "efrap" else "quantize"

    @property
    def learned(self) -> bool:
        """Whether the method learns the rounding from data (torch work; a GPU helps)."""
        return "data" in run_needs(self.options.method, self.options.config)

    def settings(self) -> dict[str, Any]:
        """Everything that decides this model's result, as canonical JSON-ready data.

        The model file enters the key by its sha256 (`result_key`), the trigger by the
        sha256 of its files; data sets by their spec (the files are not hashed).
        """
        o = self.options
        return {
            "format": SETTINGS_FORMAT,
            "steps": [*(["scan"] if self.scan else []), self.step, "verify"],
            "method": o.method, "scheme": o.scheme.to_json(), "calib": o.calib, "num_calib": o.num_calib,
            "seed": o.seed, "weight_storage": o.weight_storage,
            "rounding": asdict(o.config) if self.learned else {},
            "device": o.device, "provider": o.provider,
            "preprocess": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in (o.preprocess or {}).items()},
            "exclude": list(o.exclude), "holdout": self.guard.images,
            "max_agreement_drop": self.guard.limits.max_agreement_drop,
            "data": self.data, "limit": self.limit, "opt_level": self.opt_level,
            "gate": {"min_accuracy": self.gate.min_accuracy, "max_asr": self.gate.max_asr},
            "verify_fp": self.verify_fp,
            "scan_budget": self.scan_budget if self.scan else None,
            "trigger": None if self.trigger is None else
            {p.name: file_sha256(p) for p in trigger_files(self.trigger)},
        }


def canonical_json(data: object) -> str:
    """The one text of `data` that its key hashes (sorted keys, no spaces)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def result_key(model_sha256: str, settings: dict[str, Any]) -> str:
    """The key a stored result is found by: sha256 over the model's sha256 and its settings."""
    text = canonical_json({"model_sha256": model_sha256, "settings": settings})
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """A checked manifest.

    Attributes:
        source: The manifest file.
        jobs: Its models, in the manifest's order.
    """

    source: str
    jobs: tuple[ModelJob, ...]


def _path(value: str, base: Path) -> str:
    return str(relative_path(value, base))


def _threshold(value: object, what: str) -> float:
    """A fraction as a number in [0, 1] or a string ("0.05", "5%")."""
    if isinstance(value, str):
        return checks.fraction(value, what)
    return checks.finite(value, what, low=0.0, high=1.0)  # type: ignore[arg-type]


def _rounding(raw: object, what: str) -> dict[str, Any]:
    table = checks.table(raw, what, set(_ROUNDING_FIELDS))
    out: dict[str, Any] = {}
    for key, value in table.items():
        kind = _ROUNDING_FIELDS[key]
        if kind == "int":
            # Its range (a cap where it has one) is the method's settings' check, made when the job is built.
            out[key] = checks.integer(value, f"{what}.{key}")
        elif kind == "float":
            # 1 and 1.0 are one setting: stored as a float, so both give one key.
            out[key] = checks.finite(value, f"{what}.{key}")  # type: ignore[arg-type]
        else:
            out[key] = checks.string(value, f"{what}.{key}")
    return out


def _settings(raw: object, where: str, base: Path, known: frozenset[str]) -> dict[str, Any]:
    """The checked values of one table ([defaults] or a [[model]]), as given."""
    table = checks.table(raw, where, set(known))
    out: dict[str, Any] = {}
    for key, value in table.items():
        what = f"{where}.{key}"
        if key in ("name", "path", "trigger", "scheme"):
            text = checks.string(value, what)
            if not text:
                raise EfrapError(f"{what} must not be empty")
            out[key] = text if key in ("name", "scheme") else _path(text, base)
        elif key in ("data", "calib"):
            out[key] = spec_from_config(checks.string(value, what), base, what)
        elif key == "method":
            out[key] = checks.string(value, what, tuple(METHODS))
        elif key == "preset":
            out[key] = checks.string(value, what, tuple(EFRAP_PRESETS))
        elif key in ("num_calib", "holdout", "limit"):
            out[key] = limits.IMAGES.check(value, what)
        elif key == "seed":
            out[key] = limits.SEED.check(value, what)
        elif key == "weight_storage":
            out[key] = checks.string(value, what, WEIGHT_STORAGES)
        elif key == "device":
            out[key] = checks.string(value, what, DEVICES)
        elif key == "provider":
            out[key] = checks.string(value, what, PROVIDERS)
        elif key == "opt_level":
            out[key] = checks.string(value, what, OPT_LEVELS)
        elif key in ("verify_fp", "scan"):
            out[key] = checks.boolean(value, what)
        elif key == "scan_budget":
            out[key] = checks.finite(value, what, low=0.0, low_open=True)  # type: ignore[arg-type]
        elif key == "exclude":
            if not isinstance(value, list):
                raise EfrapError(f"{what} must be a list of node names or op types")
            out[key] = tuple(checks.string(v, f"{what}[{i}]") for i, v in enumerate(value))
        elif key == "rounding":
            out[key] = _rounding(value, what)
        elif key == "preprocess":
            out[key] = from_table(value, where)
        else:  # gate
            gate = checks.table(value, what, set(GATE_KEYS))
            out[key] = {k: _threshold(v, f"{what}.{k}") for k, v in gate.items()}
    return out


def _merged(defaults: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """The model's settings over the defaults; sub-tables merge key by key."""
    out = dict(defaults)
    for key, value in own.items():
        out[key] = {**defaults.get(key, {}), **value} if key in ("rounding", "preprocess", "gate") \
            else value
    return out


def scheme_path(spec: str, source: str | Path) -> Path | None:
    """The scheme file a model's `scheme` names (relative to the manifest `source`), or None for a preset."""
    if spec in PRESETS:
        return None
    return Path(_path(spec, Path(source).resolve().parent))


def _scheme(spec: str, base: Path, what: str) -> tuple[str, Any]:
    if spec in PRESETS:
        return spec, PRESETS[spec]
    path = _path(spec, base)
    try:
        return spec, load_scheme(path)
    except EfrapError as exc:
        raise EfrapError(f"{what}: {exc}") from None


def _job(values: dict[str, Any], where: str, base: Path) -> ModelJob:
    if "path" not in values:
        raise EfrapError(f"{where}: needs a 'path' (the FP ONNX model)")
    name = values.get("name", Path(values["path"]).stem)
    if not NAME_PATTERN.fullmatch(name):
        raise EfrapError(f"{where}.name '{name}' must be 1-100 letters, digits, '.', '_' or '-' and "
                         "start with a letter or digit (it names the model's output folder)")
    method = values.get("method", "efrap")
    scheme_spec, scheme = _scheme(values.get("scheme", DEFAULT_SCHEME), base, f"{where}.scheme")
    gate = values.get("gate", {})
    holdout = values.get("holdout", 1000)
    try:
        # The checks of these classes name the field; the prefix names the model.
        deployment = Deployment(scheme=scheme, data=values.get("data", DEFAULT_DATA),
                                calib=values.get("calib"),
                                num_calib=values.get("num_calib", 1024), seed=values.get("seed", 0),
                                provider=values.get("provider", "auto"),
                                opt_level=values.get("opt_level", "faithful"),
                                preprocess=values.get("preprocess") or None)
        overrides = {k: float(v) if _ROUNDING_FIELDS[k] == "float" else v
                     for k, v in values.get("rounding", {}).items()}
        rounding = RoundingChoice(method, values.get("preset"), overrides,
                                  values.get("weight_storage", "int8"), values.get("device", "auto"),
                                  tuple(values.get("exclude", ())))
        spec = ReleaseSpec(deployment, rounding, holdout=holdout,
                           check=GuardLimits(max_agreement_drop=gate.get("max_agreement_drop")),
                           scan=ScanChoice(budget=values.get("scan_budget"), holdout=holdout)
                           if values.get("scan", True) else None,
                           limit=values.get("limit"),
                           limits=VerifyLimits(min_accuracy=gate.get("min_accuracy"),
                                               max_asr=gate.get("max_asr")),
                           trigger=values.get("trigger"))
        options = spec.quantize_options()  # built here once so that a bad setting fails the manifest
        spec.guard_options()
    except EfrapError as exc:
        raise EfrapError(f"{where}: {exc}") from None
    if spec.scan is not None and options.num_calib < limits.SCAN_CALIB.low:
        # The scan calibrates on the same images; refused here, not after the batch has begun.
        raise EfrapError(f"{where}.num_calib must be at least {limits.SCAN_CALIB.low:,} while scan is "
                         f"on ({limits.SCAN_CALIB.what}; scan = false skips the scan), got "
                         f"{options.num_calib:,}")
    return ModelJob(name=name, path=values["path"], spec=spec, verify_fp=values.get("verify_fp", True),
                    scheme_spec=scheme_spec)


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest (see the module docstring).

    Raises:
        EfrapError: one line naming the file and the field: unreadable file, unknown
            keys, wrong types, values out of range, duplicate names, an unreadable
            scheme file.
    """
    path = Path(path)
    if path.suffix.lower() not in (".toml", ".json"):
        raise EfrapError(f"{path}: a manifest is a .toml or .json file")
    data = checks.load_config(path, "manifest")
    source = str(path)
    base = path.resolve().parent
    top = checks.table(data, f"{source}: the manifest", {"defaults", "model"})
    defaults = _settings(top.get("defaults", {}), f"{source}: defaults", base, SETTING_KEYS)
    models = top.get("model")
    if not isinstance(models, list) or not models:
        raise EfrapError(f"{source}: lists no models (add [[model]] tables with a 'path')")
    if len(models) > MAX_MODELS:
        raise EfrapError(f"{source}: lists {len(models)} models; at most {MAX_MODELS} are accepted")
    jobs: list[ModelJob] = []
    seen: dict[str, str] = {}
    for i, raw in enumerate(models):
        where = f"{source}: model[{i}]"
        own = _settings(raw, where, base, MODEL_KEYS)
        job = _job(_merged(defaults, own), where, base)
        # Output folders must differ on case-insensitive file systems too.
        if job.name.lower() in seen:
            raise EfrapError(f"{where}.name '{job.name}' is already the name of {seen[job.name.lower()]}; "
                             "give each model its own name")
        seen[job.name.lower()] = f"model[{i}]"
        jobs.append(job)
    return Manifest(source=source, jobs=tuple(jobs))
