"""Plain Python calls: a drop-in for onnxruntime's `quantize_static`, and `defend`, `scan`, `verify`.

`quantize_static` takes exactly onnxruntime's arguments, in its order, so changing one
import line moves a script onto this pipeline::

    from pipeline.api import quantize_static  # was: from onnxruntime.quantization import ...

    quantize_static("fp.onnx", "q.onnx", reader, per_channel=True)                     # nearest
    quantize_static("fp.onnx", "d.onnx", reader, per_channel=True, rounding="efrap")   # the defense

onnxruntime's enums (`QuantFormat`, `QuantType`, `CalibrationMethod`) and their names as
strings are both accepted. What this quantizer cannot do as onnxruntime does is refused by
name with a ValueError, never ignored: see `quantize_static`.

`defend`, `scan` and `verify` call what `efrap defend`, `efrap scan` and `efrap verify`
call, with the same defaults, and return the same typed reports.

Arguments are checked before anything is read or written: a bad one raises a one-line
ValueError or TypeError naming it, and no file is written. A problem found later, while
running (data that does not fit the model, a graph nothing can quantize), raises
`EfrapError`, as on the command line; outputs are written atomically at the end, so a
failed call leaves no output either.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import onnx

from pipeline.base import checks
from pipeline.base.data import DEFAULT_DATA, spec_files
from pipeline.base.deployment import Deployment
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import image_input, load_model, model_files, save_model
from pipeline.base.preprocess import ready, resolve
from pipeline.base.runtime import OPT_LEVELS, PROVIDERS
from pipeline.base.safe_io import check_outputs
from pipeline.base.scheme import DEFAULT_SCHEME, Scheme, load_scheme, scheme_files, scheme_from_dict
from pipeline.base.trigger import trigger_files
from pipeline.graph import FUSED_ACTIVATIONS, INTEGER_OPS, PASSTHROUGH_OPS, QUANTIZABLE_OPS
from pipeline.prepare import prepare_model
from pipeline.quantize import (
    QuantizeSummary,
    calibration_array,
    quantize_model,
)
from pipeline.release_spec import ReleaseSpec, RoundingChoice, ScanChoice
from pipeline.rounding import METHODS, get_method
from pipeline.rounding.efrap import EFRAP_PRESETS
from pipeline.rounding.settings import PRESET_METHOD
from pipeline.runner import defend_step, scan_step, verify_step
from pipeline.scan import ScanReport
from pipeline.torch_graph import SIMULATION
from validators.guard import GuardLimits, GuardReport
from validators.limits import VerifyLimits
from validators.verify import VerifyReport

try:  # onnxruntime's enums; without its quantization tools, their names as strings still work
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
except ImportError:  # pragma: no cover - onnxruntime ships them
    CalibrationMethod = QuantFormat = QuantType = None  # type: ignore[assignment,misc]

T = TypeVar("T")
PathArg = str | os.PathLike[str]

QUANT_FORMATS = ("QOperator", "QDQ")
QUANT_TYPES = ("QInt8", "QUInt8", "QFLOAT8E4M3FN", "QInt16", "QUInt16", "QInt4", "QUInt4")
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")

#: onnxruntime QuantType -> (bits, signed) of the grid this quantizer writes for it.
TYPE_GRIDS: dict[str, tuple[int, bool]] = {
    "QInt8": (8, True),
    "QUInt8": (8, False),
    "QInt4": (4, True),
    "QUInt4": (4, False),
}

#: extra_options keys that change what this quantizer does.
HONOURED_OPTIONS = ("ActivationSymmetric", "WeightSymmetric")

#: extra_options keys accepted only at onnxruntime's default, which is what this quantizer
#: always does (docs/ARCHITECTURE.md, "Where the quantizers are"); any other value is refused.
FIXED_OPTIONS: dict[str, str] = {
    "ActivationRestrictedAsymmetric": "zero points come from the calibrated range",
    "AddQDQPairToWeight": "weights are stored as integers feeding DequantizeLinear",
    "CalibMovingAverage": "calibration keeps the exact min and max over every batch",
    "DedicatedQDQPair": "a tensor read by several nodes has one Q/DQ pair",
    "EnableSubgraph": "subgraphs stay in float",
    "ForceQuantizeNoInputCheck": "a MaxPool, Reshape, ... is quantized only after a quantized tensor",
    "MatMulConstBOnly": "a MatMul of two activations is quantized too",
    "UseQDQContribOps": "Q/DQ are the standard ONNX ops",
}

#: Op types `op_types_to_quantize` may name: those this quantizer puts on integer grids, and
#: those that follow a neighbour's grid (a fused Relu/Clip, a MaxPool on the integers).
QUANTIZED_OP_TYPES = (*QUANTIZABLE_OPS, *INTEGER_OPS)
FOLLOWING_OP_TYPES = (*FUSED_ACTIVATIONS, *PASSTHROUGH_OPS)

#: onnxruntime execution providers for calibration -> this project's provider names.
CALIBRATION_PROVIDERS = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}

#: What `quantize_static` records as its calibration data (there is no data spec).
READER_DATA = "calibration_data_reader"


def _checked(argument: str, build: Callable[[], T]) -> T:
    """`build()`, with a reused check's EfrapError raised as a ValueError naming `argument`."""
    try:
        return build()
    except EfrapError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(argument) else f"{argument}: {message}") from None


def _flag(value: object, argument: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{argument} must be True or False, got {value!r}")
    return value


def _names(value: object, argument: str) -> tuple[str, ...]:
    """A list of strings (a bare string is refused: onnxruntime would iterate its letters)."""
    if (
        isinstance(value, str)
        or not isinstance(value, Collection)
        or not all(isinstance(v, str) for v in value)
    ):
        raise TypeError(f"{argument} must be a list of strings, got {value!r}")
    return tuple(value)


def _enum_name(value: object, argument: str, enum_type: type | None, names: tuple[str, ...]) -> str:
    """The member name of an onnxruntime enum, given as the member or as its name."""
    if enum_type is not None and isinstance(value, enum_type):
        return value.name  # type: ignore[attr-defined]
    if isinstance(value, str) and value in names:
        return value
    if isinstance(value, str | enum.Enum):
        raise ValueError(f"{argument} must be one of {', '.join(names)}, got {value!r}")
    raise TypeError(f"{argument} must be onnxruntime's enum or its name as a string, got {value!r}")


def _path(value: object, argument: str) -> Path:
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"{argument} must be a file path, got {type(value).__name__}")
    return Path(value)


def _extra_options(extra: object) -> dict[str, bool]:
    """The honoured extra_options; every other key is refused by name."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise TypeError(f"extra_options must be a dict, got {type(extra).__name__}")
    honoured: dict[str, bool] = {}
    for key, value in extra.items():
        where = f"extra_options[{key!r}]"
        if key in HONOURED_OPTIONS:
            honoured[key] = _flag(value, where)
        elif key in FIXED_OPTIONS:
            if _flag(value, where):
                raise ValueError(f"{where}=True: not supported ({FIXED_OPTIONS[key]}; only False)")
        else:
            raise ValueError(
                f"{where}: not supported by this quantizer (supported: "
                f"{', '.join(HONOURED_OPTIONS)}; {', '.join(FIXED_OPTIONS)} only as False)"
            )
    return honoured


def _grid(qtype: str, argument: str, symmetric: bool, symmetric_key: str) -> dict[str, object]:
    """One scheme table ("weight" or "activation") for onnxruntime's type and symmetry."""
    if qtype not in TYPE_GRIDS:
        raise ValueError(
            f"{argument}={qtype}: not supported (this quantizer writes 8- and 4-bit grids: "
            f"{', '.join(TYPE_GRIDS)})"
        )
    bits, signed = TYPE_GRIDS[qtype]
    if symmetric and not signed:
        raise ValueError(
            f"extra_options[{symmetric_key!r}]=True with {argument}={qtype}: not supported "
            f"(symmetric grids here are signed: use Q{qtype[2:]})"
        )
    # onnxruntime's symmetric int8 grid is [-127, 127]; INT4 has no restricted range there, so
    # [-8, 7]. An asymmetric grid on a signed type is the unsigned grid shifted by 2^(bits-1):
    # the same scale and values, stored unsigned (the form onnxruntime fuses on x86).
    return {
        "bits": bits,
        "symmetric": symmetric,
        "observer": "minmax",
        "symmetric_range": "full" if bits == 4 else "restricted",
    }


def _ort_scheme(
    weight_type: str, activation_type: str, per_channel: bool, honoured: Mapping[str, bool]
) -> Scheme:
    """The scheme onnxruntime's type arguments describe, built and checked by `scheme_from_dict`."""
    # onnxruntime: weights on signed types are symmetric unless WeightSymmetric says otherwise.
    w_sym = honoured.get("WeightSymmetric", TYPE_GRIDS.get(weight_type, (8, True))[1])
    weight = {**_grid(weight_type, "weight_type", w_sym, "WeightSymmetric"), "per_channel": per_channel}
    activation = _grid(
        activation_type, "activation_type", honoured.get("ActivationSymmetric", False), "ActivationSymmetric"
    )
    name = (
        f"quantize_static(weight_type={weight_type}, activation_type={activation_type}, "
        f"per_channel={per_channel})"
    )
    return _checked(
        "scheme",
        lambda: scheme_from_dict(
            {"name": name, "weight": weight, "activation": activation}, "quantize_static"
        ),
    )


def _given_scheme(
    scheme: str | Scheme,
    mapped: Scheme,
    weight_type: str,
    activation_type: str,
    per_channel: bool,
    honoured: Mapping[str, bool],
) -> Scheme:
    """`scheme`, checked against every type argument that is not at onnxruntime's default."""
    if isinstance(scheme, Scheme):
        chosen = scheme
    elif isinstance(scheme, str):
        chosen = _checked("scheme", lambda: load_scheme(scheme))
    else:
        raise TypeError(f"scheme must be a preset name, a scheme file or a Scheme, got {scheme!r}")
    asked = []
    if per_channel:
        asked.append(("per_channel=True", chosen.weight.per_channel, True))
    if weight_type != "QInt8" or "WeightSymmetric" in honoured:
        asked.append(
            (
                f"weight_type={weight_type}",
                (chosen.weight.bits, chosen.weight.symmetric),
                (mapped.weight.bits, mapped.weight.symmetric),
            )
        )
    if activation_type != "QInt8" or "ActivationSymmetric" in honoured:
        asked.append(
            (
                f"activation_type={activation_type}",
                (chosen.activation.bits, chosen.activation.symmetric),
                (mapped.activation.bits, mapped.activation.symmetric),
            )
        )
    for what, has, wants in asked:
        if has != wants:
            raise ValueError(
                f"scheme '{chosen.name}' and {what} disagree on the grid; give one, or make them agree"
            )
    return chosen


def _provider(providers: object) -> str:
    """onnxruntime's calibration_providers -> "cpu" or "cuda" (None: onnxruntime's CPU default)."""
    if providers is None:
        return "cpu"
    names = _names(providers, "calibration_providers")
    if not names:
        raise ValueError("calibration_providers: give at least one provider, or None")
    if names[0] not in CALIBRATION_PROVIDERS:
        raise ValueError(
            f"calibration_providers: {names[0]} is not supported (supported: "
            f"{', '.join(CALIBRATION_PROVIDERS)})"
        )
    return CALIBRATION_PROVIDERS[names[0]]


def _rounding(rounding: object, preset: str | None, iters: int | None, weight_storage: str,
              device: str, exclude: tuple[str, ...] = ()) -> RoundingChoice:
    """The rounding choice the arguments name (its settings are resolved by the release spec)."""
    method = _checked("rounding", lambda: checks.string(rounding, "rounding", tuple(METHODS)))
    if preset is not None:
        if method != PRESET_METHOD:
            raise ValueError(f"preset applies to rounding='{PRESET_METHOD}' only, not '{method}'")
        _checked("preset", lambda: checks.string(preset, "preset", tuple(EFRAP_PRESETS)))
    if iters is not None and "iters" not in {f.name for f in fields(type(get_method(method).defaults))}:
        raise ValueError(f"iters applies to learned rounding only, not rounding='{method}'")
    return RoundingChoice(method, preset, {} if iters is None else {"iters": iters}, weight_storage, device,
                          exclude)


def _exclusions(
    model: onnx.ModelProto, source: str, op_types: object, only: object, exclude: object
) -> tuple[str, ...]:
    """op_types_to_quantize, nodes_to_quantize and nodes_to_exclude as this project's exclude."""
    out: list[str] = []
    if op_types is not None:
        wanted = _names(op_types, "op_types_to_quantize")
        for op in wanted:
            if op not in (*QUANTIZED_OP_TYPES, *FOLLOWING_OP_TYPES):
                raise ValueError(
                    f"op_types_to_quantize: {op} is not quantized by this quantizer (it "
                    f"quantizes {', '.join(QUANTIZED_OP_TYPES)}; every other op stays in float)"
                )
        out += [op for op in QUANTIZED_OP_TYPES if op not in wanted]
    if only is None and exclude is None:
        return tuple(out)
    # Names are those of the prepared graph (unnamed nodes get names there) and the given one's.
    prepared = _checked("model_input", lambda: prepare_model(model, source))
    names = [n.name for n in prepared.graph.node]
    known = {*names, *(n.name for n in model.graph.node)}
    for argument, value in (("nodes_to_quantize", only), ("nodes_to_exclude", exclude)):
        if value is None:
            continue
        listed = _names(value, argument)
        missing = [n for n in listed if n not in known]
        if missing:
            raise ValueError(f"{argument}: no node named {missing[0]!r} in the model")
        out += [n for n in names if n not in listed] if argument == "nodes_to_quantize" else list(listed)
    return tuple(dict.fromkeys(out))


def quantize_static(
    model_input: str | os.PathLike[str] | onnx.ModelProto,
    model_output: str | os.PathLike[str],
    calibration_data_reader: Any = None,
    quant_format: Any = "QDQ",
    op_types_to_quantize: list[str] | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    activation_type: Any = "QInt8",
    weight_type: Any = "QInt8",
    nodes_to_quantize: list[str] | None = None,
    nodes_to_exclude: list[str] | None = None,
    use_external_data_format: bool = False,
    calibrate_method: Any = "MinMax",
    calibration_providers: list[str] | None = None,
    extra_options: dict[str, Any] | None = None,
    calibration_cache_path: str | os.PathLike[str] | None = None,
    *,
    rounding: str = "nearest",
    preset: str | None = None,
    iters: int | None = None,
    scheme: str | Scheme | None = None,
    seed: int = 0,
    weight_storage: str | None = None,
    device: str = "auto",
) -> QuantizeSummary:
    """onnxruntime's `quantize_static`, with the weights rounded by this project's methods.

    The arguments up to `calibration_cache_path` are onnxruntime's, in its order and with its
    defaults; `rounding` and those after it are this project's, keyword-only.

    Mapped onto this project's scheme (`pipeline.base.scheme`): `weight_type` and
    `activation_type` QInt8/QUInt8 give 8-bit grids, QInt4/QUInt4 4-bit ones; weights on a
    signed type are symmetric unless `extra_options["WeightSymmetric"]` is False,
    activations asymmetric unless `extra_options["ActivationSymmetric"]` is True (symmetric
    int8 on [-127, 127], int4 on [-8, 7], as onnxruntime); `per_channel` sets per-channel
    weights; ranges are min/max (`CalibrationMethod.MinMax`). An asymmetric grid on a signed
    type is written as the unsigned grid with its zero point shifted (the same values).
    `nodes_to_exclude`, `nodes_to_quantize` and `op_types_to_quantize` keep the other nodes
    and op types in float; a name that is not in the model is refused. Ops this quantizer
    does not quantize (docs/ARCHITECTURE.md) stay in float whatever the arguments say.

    Refused, by name: `quant_format=QOperator`; `reduce_range=True` (onnxruntime's reduced
    int8 grid is [-64, 64], this project's [-63, 63]: ask for it with a scheme file's
    `reduce_range`); `calibrate_method` other than MinMax; `use_external_data_format=True`
    (one ONNX file, at most 2 GiB); `calibration_cache_path`; types other than the four
    above; `extra_options` keys other than `HONOURED_OPTIONS`, and `FIXED_OPTIONS` set to
    anything but False; calibration providers other than CPU and CUDA.

    Args:
        model_input: The FP model: a path or a loaded ModelProto.
        model_output: Where to write the QDQ model (never `model_input`).
        calibration_data_reader: onnxruntime's reader: `get_next()` returns
            {input name: batch} until None; `rewind()` is called first when it has one, so a
            reader another quantizer used can be passed again.
        rounding: "nearest" (onnxruntime's rounding, the default), "adaround", "efrap"
            (the project's defense: `preset` "default" unless given) or "lac"; not "qvec",
            whose scale search needs held-out images a calibration reader does not give.
        preset: EFRAP settings (`pipeline.rounding.efrap.EFRAP_PRESETS`).
        iters: Iterations per layer of learned rounding.
        scheme: A preset name, scheme file or Scheme instead of the type arguments; those
            not at onnxruntime's defaults must agree with it.
        seed: The run's one seed.
        weight_storage: "int8" containers or packed "int4"; None: packed int4 for 4-bit
            weight types (as onnxruntime writes them), int8 otherwise.
        device: torch device of learned rounding ("auto", "cpu", "cuda").

    Returns:
        The run's summary (settings, per-layer results, timings).

    Raises:
        ValueError, TypeError: a bad or unsupported argument, before anything is read or
            written.
        EfrapError: a problem found while running (batches that do not fit the model, ...).
    """
    # Arguments first, none of them read from disk: a refusal leaves everything untouched.
    fmt = _enum_name(quant_format, "quant_format", QuantFormat, QUANT_FORMATS)
    if fmt != "QDQ":
        raise ValueError(f"quant_format={fmt}: not supported (this quantizer writes QDQ)")
    if _flag(reduce_range, "reduce_range"):
        raise ValueError(
            "reduce_range=True: not supported (onnxruntime's reduced int8 grid is [-64, 64], "
            "this project's [-63, 63]: give a scheme file with weight.reduce_range = true)"
        )
    if _flag(use_external_data_format, "use_external_data_format"):
        raise ValueError(
            "use_external_data_format=True: not supported (the model is written as one "
            "ONNX file, at most 2 GiB)"
        )
    method_name = _enum_name(calibrate_method, "calibrate_method", CalibrationMethod, CALIBRATION_METHODS)
    if method_name != "MinMax":
        raise ValueError(
            f"calibrate_method={method_name}: not supported (ranges are min/max; a scheme "
            "with activation observer 'mse' or 'percentile' searches them)"
        )
    if calibration_cache_path is not None:
        raise ValueError(
            "calibration_cache_path: not supported (calibration runs on the reader's data every time)"
        )
    if calibration_data_reader is None:
        raise ValueError("calibration_data_reader: required (there is no calibration cache)")
    if not callable(getattr(calibration_data_reader, "get_next", None)):
        raise TypeError("calibration_data_reader must have get_next() (onnxruntime's CalibrationDataReader)")
    w_type = _enum_name(weight_type, "weight_type", QuantType, QUANT_TYPES)
    a_type = _enum_name(activation_type, "activation_type", QuantType, QUANT_TYPES)
    honoured = _extra_options(extra_options)
    mapped = _ort_scheme(w_type, a_type, _flag(per_channel, "per_channel"), honoured)
    chosen = (
        mapped if scheme is None else _given_scheme(scheme, mapped, w_type, a_type, per_channel, honoured)
    )
    storage = (
        weight_storage if weight_storage is not None else ("int4" if TYPE_GRIDS[w_type][0] == 4 else "int8")
    )
    choice = _rounding(rounding, preset, iters, storage, device)
    provider = _provider(calibration_providers)
    spec = ReleaseSpec(Deployment(scheme=chosen, data=READER_DATA, seed=seed, provider=provider), choice)
    settings = _checked("quantize_static", spec.quantize_options)
    if "search" in get_method(settings.method).needs(settings.rounding):
        raise ValueError(f"rounding='{settings.method}' chooses its setting on held-out training images, "
                         "which a calibration reader does not give; use quantize_file or efrap quantize")
    out = _path(model_output, "model_output")
    if isinstance(model_input, onnx.ModelProto):
        model, source, inputs = model_input, "model_input", []
    else:
        path = _path(model_input, "model_input")
        inputs = _checked("model_input", lambda: model_files(path))
        model, source = _checked("model_input", lambda: load_model(path)), str(path)
    _checked("model_output", lambda: check_outputs({"model_output": out}, inputs))
    exclude = _exclusions(model, source, op_types_to_quantize, nodes_to_quantize, nodes_to_exclude)
    image = _checked("model_input", lambda: image_input(model, source))
    images = _checked(
        "calibration_data_reader", lambda: calibration_array(calibration_data_reader, image.name)
    )
    # The reader's arrays are model-ready: record the model's preprocessing as given by the data.
    pre = _checked("model_input", lambda: ready(resolve(model, image, None, source, announce=False)))
    deployment = replace(settings.deployment, num_calib=len(images))
    options = replace(settings, deployment=deployment, exclude=exclude)
    qdq, _, summary = quantize_model(model, images, options, source, pre)
    save_model(qdq, out)
    return summary


@dataclass(frozen=True)
class DefendResult:
    """What `defend` did.

    Attributes:
        summary: The quantization run (settings, per-layer results, timings).
        check: The defended model against FP on held-out training images.
    """

    summary: QuantizeSummary
    check: GuardReport

    @property
    def passed(self) -> bool:
        """Whether the defended model kept within its budget (True when none was set)."""
        return self.check.passed


def _limit(value: float | str | None, argument: str) -> float | None:
    """A threshold as a fraction (0.01) or a percentage string ("1%"), as on the command line."""
    if isinstance(value, str):
        return _checked(argument, lambda: checks.fraction(value, argument))
    return value


def _scheme(scheme: str | Scheme) -> tuple[Scheme, list[Path]]:
    """A scheme argument and the files it reads."""
    if isinstance(scheme, Scheme):
        return scheme, []
    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a preset name, a scheme file or a Scheme, got {scheme!r}")
    return _checked("scheme", lambda: load_scheme(scheme)), scheme_files(scheme)


def defend(
    model_input: PathArg,
    model_output: PathArg,
    *,
    scheme: str | Scheme = DEFAULT_SCHEME,
    calib: str = DEFAULT_DATA,
    num_calib: int = 1024,
    seed: int = 0,
    preset: str = "default",
    iters: int | None = None,
    holdout: int = 1000,
    max_agreement_drop: float | str | None = None,
    min_accuracy: float | str | None = None,
    check_opt_level: str = "faithful",
    weight_storage: str = "int8",
    device: str = "auto",
    exclude: tuple[str, ...] = (),
) -> DefendResult:
    """`efrap defend`: EFRAP with a preset, then the defended model checked against FP.

    The model is written whether or not the check passes (its `efrap.guard` metadata and
    the result say which), as the command writes it.

    Args:
        model_input: The FP ONNX model.
        model_output: Where to write the defended QDQ model.
        scheme: Preset name, scheme file or Scheme (default w8a8, as the command).
        calib: Data spec of the calibration images (training split).
        num_calib: Calibration images.
        seed: The run's one seed.
        preset: EFRAP settings: "default" (the project's rule), "release" or "fast".
        iters: Iterations per layer instead of the preset's.
        holdout: Held-out training images of the check.
        max_agreement_drop: Largest share of held-out images whose prediction may differ
            from FP's (0.01 or "1%").
        min_accuracy: Lowest clean accuracy on the held-out images.
        check_opt_level: onnxruntime optimization level of the check ("faithful", "all").
        weight_storage: "int8" containers or packed "int4".
        device: torch device of learned rounding.
        exclude: Node names or op types kept in float.
    """
    model, out = _path(model_input, "model_input"), _path(model_output, "model_output")
    chosen, scheme_inputs = _scheme(scheme)
    _checked("check_opt_level", lambda: checks.string(check_opt_level, "check_opt_level", tuple(OPT_LEVELS)))
    spec = _checked("defend", lambda: ReleaseSpec(
        # The deployment's level is the check's, as on the command line.
        Deployment(scheme=chosen, data=calib, num_calib=num_calib, seed=seed, opt_level=check_opt_level),
        _rounding("efrap", preset, iters, weight_storage, device, _names(exclude, "exclude")),
        holdout=holdout,
        check=GuardLimits(max_agreement_drop=_limit(max_agreement_drop, "max_agreement_drop"),
                          min_accuracy=_limit(min_accuracy, "min_accuracy"))))
    guard = _checked("defend", spec.guard_options)
    options = _checked("defend", spec.quantize_options)
    inputs = _checked("model_input", lambda: [*model_files(model), *scheme_inputs, *spec_files(calib)])
    _checked("model_output", lambda: check_outputs({"model_output": out}, inputs))
    step = defend_step(model, out, options, guard)
    return DefendResult(step.summary, step.guard)


def scan(
    model_input: PathArg,
    *,
    scheme: str | Scheme = DEFAULT_SCHEME,
    calib: str = DEFAULT_DATA,
    num_calib: int = 1024,
    seed: int = 0,
    budget: float | None = None,
    holdout: int = 1000,
    max_targets: int = 10,
    steps: int | None = None,
    defended: PathArg | None = None,
    provider: str = "auto",
) -> ScanReport:
    """`efrap scan`: does the FP model carry a backdoor that the deployment's quantization wakes?

    Args:
        model_input: The FP ONNX model.
        scheme: The deployment's scheme (preset name, scheme file or Scheme; default w8a8, as the command).
        calib: Clean unlabelled images (data spec, training split).
        num_calib: Calibration images, as for quantization.
        seed: The scan's one seed.
        budget: Seconds the whole scan may take (None: no limit); a scan it stops is
            "inconclusive".
        holdout: Held-out images of the onnxruntime figures.
        max_targets: Most classes searched.
        steps: Most search steps per class and family (None: the scan's default).
        defended: A defended QDQ model of the same FP model to measure and scan too.
        provider: onnxruntime provider ("auto", "cpu", "cuda").

    Returns:
        The scan's report: verdict, recovered trigger, figures.
    """
    model = _path(model_input, "model_input")
    chosen, _ = _scheme(scheme)  # scan writes nothing, so the files it reads need no guard
    if steps is not None:
        _checked("steps", lambda: checks.integer(steps, "steps", low=1))
    spec = _checked("scan", lambda: ReleaseSpec(
        Deployment(scheme=chosen, data=calib, num_calib=num_calib, seed=seed, provider=provider),
        scan=ScanChoice(budget=budget, holdout=holdout, max_targets=max_targets, steps=steps)))
    options = _checked("scan", spec.scan_options)
    _checked("model_input", lambda: model_files(model))
    _checked("calib", lambda: spec_files(calib))
    other = None if defended is None else _path(defended, "defended")
    if other is not None:
        _checked("defended", lambda: model_files(other))
    return scan_step(model, options, defended=other).report


def verify(
    model_input: PathArg,
    *,
    data: str = DEFAULT_DATA,
    trigger: PathArg | None = None,
    opt_level: str = "faithful",
    provider: str = "auto",
    reference: bool = False,
    limit: int | None = None,
    seed: int = 0,
    min_accuracy: float | str | None = None,
    max_asr: float | str | None = None,
    max_parity_diff: float | str | None = None,
) -> VerifyReport:
    """`efrap verify`: measure a model in onnxruntime on the test split, with an optional gate.

    Args:
        model_input: The ONNX model (FP or QDQ).
        data: Data spec (test split).
        trigger: Trigger file: also measure attack success.
        opt_level: "faithful" (exact QDQ semantics) or "all" (what a deployment gets).
        provider: onnxruntime provider ("auto", "cpu", "cuda").
        reference: Also compare with the pipeline's PyTorch simulation.
        limit: Use only this many test images, chosen with `seed`.
        seed: Seeds the choice of the `limit` images.
        min_accuracy: Limit: lowest clean accuracy (0.9 or "90%").
        max_asr: Limit: highest attack success rate.
        max_parity_diff: Limit: highest share of predictions differing from the simulation.

    Returns:
        The report; `report.gate.passed` says whether a gate that was set passed.
    """
    model = _path(model_input, "model_input")
    trig = None if trigger is None else _path(trigger, "trigger")
    _checked("opt_level", lambda: checks.string(opt_level, "opt_level", tuple(OPT_LEVELS)))
    _checked("provider", lambda: checks.string(provider, "provider", PROVIDERS))
    spec = _checked("verify", lambda: ReleaseSpec(
        Deployment(data=data, opt_level=opt_level, provider=provider,
                   seed=checks.integer(seed, "seed", low=0)),
        limit=limit,
        limits=VerifyLimits(min_accuracy=_limit(min_accuracy, "min_accuracy"),
                            max_asr=_limit(max_asr, "max_asr"),
                            max_parity_diff=_limit(max_parity_diff, "max_parity_diff")),
        trigger=None if trig is None else str(trig)))
    compared = SIMULATION if _flag(reference, "reference") else None
    options = _checked("verify", lambda: spec.verify_options(reference=compared))
    _checked("model_input", lambda: model_files(model))
    _checked("data", lambda: spec_files(data))
    if trig is not None:
        _checked("trigger", lambda: trigger_files(str(trig)))
    return verify_step(model, options).output


__all__ = ["DefendResult", "defend", "quantize_static", "scan", "verify"]
