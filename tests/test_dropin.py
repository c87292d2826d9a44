"""`pipeline.api`: the drop-in for onnxruntime's quantize_static, and defend, scan, verify.

The same script runs against onnxruntime's `quantize_static` and this one on the stored
clean model with real Fashion-MNIST images: both outputs run in onnxruntime at opt level
all, agree with FP on held-out images, and (nearest rounding) hold the same integers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
from onnxruntime.quantization import quantize_static as ort_quantize_static

from pipeline import api
from pipeline.api import DefendResult, defend, quantize_static, scan, verify
from pipeline.base.onnx_io import get_metadata
from pipeline.base.runtime import make_session
from pipeline.quantize import QuantizeSummary, calibration_images, holdout_images
from pipeline.scan import ScanReport
from tests.conftest import require_fashion_mnist
from validators.verify import VerifyReport

CLEAN = Path(__file__).resolve().parent.parent / "models" / "zoo" / "fmnist_small_cnn_clean.onnx"
CALIB, HELD_OUT, BATCH = 256, 1000, 32
#: Floors set from a measurement with margin (onnxruntime 1.31.1, 1 thread: agreement with FP
#: 99.7% onnxruntime, 99.8% this one; 99.9% with each other; 0 of 458,272 integers differ).
MIN_AGREEMENT_WITH_FP = 0.98
MIN_AGREEMENT_WITH_EACH_OTHER = 0.98


class Reader(CalibrationDataReader):
    """A user's reader: batches of model-ready arrays, rewindable."""

    def __init__(self, images: np.ndarray, name: str = "input") -> None:
        self.images, self.name = images, name
        self.rewind()

    def rewind(self) -> None:
        self.starts = iter(range(0, len(self.images), BATCH))

    def get_next(self) -> dict[str, np.ndarray] | None:
        start = next(self.starts, None)
        return None if start is None else {self.name: self.images[start : start + BATCH]}


class EmptyReader(CalibrationDataReader):
    def get_next(self) -> None:
        return None


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    """Calibration images and held-out training images of the clean model, as the CLI picks them."""
    require_fashion_mnist()
    fp = onnx.load(str(CLEAN))
    calib, _ = calibration_images(fp, "fashion-mnist", CALIB, seed=0)
    held, labels = holdout_images(fp, "fashion-mnist", CALIB, HELD_OUT, seed=0)
    assert labels is not None
    return {"calib": np.asarray(calib[: len(calib)]), "held": np.asarray(held[: len(held)]), "labels": labels}


def _script(quantize: Callable[..., object], out: Path, reader: CalibrationDataReader) -> object:
    """The user's script: onnxruntime's documented CPU call, per-channel QInt8/QInt8, QDQ."""
    return quantize(
        str(CLEAN),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


def _integers(path: Path) -> dict[str, np.ndarray]:
    """Every layer's integer weight and bias, by layer and input slot."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = {
        n.output[0]: inits[n.input[0]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    }
    return {
        f"{n.name}:{k}": dq[i]
        for n in model.graph.node
        if n.op_type in ("Conv", "Gemm")
        for k, i in enumerate(n.input[1:], 1)
        if i in dq
    }


def test_the_same_script_against_onnxruntime_and_the_drop_in(
    data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    reader = Reader(data["calib"])
    ours, theirs = tmp_path / "ours.onnx", tmp_path / "theirs.onnx"
    assert _script(ort_quantize_static, theirs, reader) is None
    # The same reader, already read to its end: the drop-in rewinds it.
    summary = _script(quantize_static, ours, reader)
    assert isinstance(summary, QuantizeSummary) and summary.num_calib == CALIB
    assert summary.options.method == "nearest" and summary.options.exclude == ()

    fp = make_session(onnx.load(str(CLEAN)), "all", "cpu").run(data["held"]).argmax(1)
    preds = {
        name: make_session(onnx.load(str(p)), "all", "cpu").run(data["held"]).argmax(1)
        for name, p in (("ours", ours), ("theirs", theirs))
    }
    for pred in preds.values():
        assert (pred == fp).mean() >= MIN_AGREEMENT_WITH_FP
    assert (preds["ours"] == preds["theirs"]).mean() >= MIN_AGREEMENT_WITH_EACH_OTHER
    # Nearest rounding on onnxruntime's grids, with its calibrated ranges: the same integers.
    a, b = _integers(ours), _integers(theirs)
    assert a.keys() == b.keys() and len(a) == 10
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_enum_names_as_strings_give_the_same_bytes(data: dict[str, np.ndarray], tmp_path: Path) -> None:
    reader = Reader(data["calib"][:64])
    _script(quantize_static, tmp_path / "enums.onnx", reader)
    quantize_static(
        CLEAN,
        tmp_path / "names.onnx",
        reader,
        quant_format="QDQ",
        per_channel=True,
        activation_type="QInt8",
        weight_type="QInt8",
        calibrate_method="MinMax",
    )
    assert (tmp_path / "enums.onnx").read_bytes() == (tmp_path / "names.onnx").read_bytes()


def test_exclusions_and_op_types_keep_layers_in_float(data: dict[str, np.ndarray], tmp_path: Path) -> None:
    reader = Reader(data["calib"][:64])
    quantize_static(CLEAN, tmp_path / "ex.onnx", reader, nodes_to_exclude=["/features.0/Conv"])
    quantize_static(CLEAN, tmp_path / "conv.onnx", reader, op_types_to_quantize=["Conv", "Relu", "MaxPool"])
    quantize_static(CLEAN, tmp_path / "only.onnx", reader, nodes_to_quantize=["/classifier.3/Gemm"])
    layers = {
        name: {k.split(":")[0] for k in _integers(tmp_path / f"{name}.onnx")}
        for name in ("ex", "conv", "only")
    }
    assert "/features.0/Conv" not in layers["ex"] and "/features.4/Conv" in layers["ex"]
    assert layers["conv"] == {"/features.0/Conv", "/features.4/Conv", "/features.8/Conv"}
    assert layers["only"] == {"/classifier.3/Gemm"}


def test_int4_weights_are_packed_as_onnxruntime_writes_them(
    data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    summary = quantize_static(
        CLEAN,
        tmp_path / "w4.onnx",
        Reader(data["calib"][:64]),
        per_channel=True,
        weight_type=QuantType.QInt4,
        activation_type=QuantType.QUInt8,
    )
    assert summary.options.weight_storage == "int4"
    assert summary.options.scheme.weight.bits == 4 and summary.options.scheme.weight.qrange == (-8, 7)
    kinds = {i.data_type for i in onnx.load(str(tmp_path / "w4.onnx")).graph.initializer}
    assert onnx.TensorProto.INT4 in kinds


def test_rounding_efrap_is_the_defense(data: dict[str, np.ndarray], tmp_path: Path) -> None:
    out = tmp_path / "efrap.onnx"
    summary = quantize_static(
        CLEAN, out, Reader(data["calib"][:64]), per_channel=True, rounding="efrap", iters=10, scheme="w4a4"
    )
    assert summary.options.method == "efrap" and summary.options.config.iters == 10
    assert summary.options.config.prune_rare == 0.03  # the default preset: the project's rule
    assert get_metadata(onnx.load(str(out)))["efrap.method"] == "efrap"


# ------------------------------------------------------------------------------- refusals

REFUSALS: dict[str, tuple[dict[str, object], type[Exception], str]] = {
    "qoperator": ({"quant_format": QuantFormat.QOperator}, ValueError, "quant_format=QOperator"),
    "unknown extra option": (
        {"extra_options": {"SmoothQuant": True}},
        ValueError,
        "extra_options['SmoothQuant']",
    ),
    "fixed extra option": (
        {"extra_options": {"CalibMovingAverage": True}},
        ValueError,
        "extra_options['CalibMovingAverage']=True",
    ),
    "reduce_range": ({"reduce_range": True}, ValueError, "reduce_range=True"),
    "entropy": ({"calibrate_method": CalibrationMethod.Entropy}, ValueError, "calibrate_method=Entropy"),
    "int16": ({"weight_type": QuantType.QInt16}, ValueError, "weight_type=QInt16"),
    "bad name": ({"activation_type": "int8"}, ValueError, "activation_type"),
    "external data": ({"use_external_data_format": True}, ValueError, "use_external_data_format"),
    "cache": ({"calibration_cache_path": "c.json"}, ValueError, "calibration_cache_path"),
    "provider": (
        {"calibration_providers": ["TensorrtExecutionProvider"]},
        ValueError,
        "calibration_providers",
    ),
    "unknown node": ({"nodes_to_exclude": ["/nope/Conv"]}, ValueError, "nodes_to_exclude"),
    "op type": ({"op_types_to_quantize": ["Sigmoid"]}, ValueError, "op_types_to_quantize"),
    "op types as a string": ({"op_types_to_quantize": "Conv"}, TypeError, "op_types_to_quantize"),
    "per_channel not a bool": ({"per_channel": "yes"}, TypeError, "per_channel"),
    "rounding": ({"rounding": "stochastic"}, ValueError, "rounding"),
    "iters with nearest": ({"iters": 10}, ValueError, "iters"),
    "scheme disagrees": (
        {
            "scheme": "w4a4",
            "weight_type": QuantType.QInt8,
            "per_channel": True,
            "extra_options": {"WeightSymmetric": True},
        },
        ValueError,
        "scheme 'w4a4'",
    ),
    "symmetric unsigned": (
        {"activation_type": QuantType.QUInt8, "extra_options": {"ActivationSymmetric": True}},
        ValueError,
        "ActivationSymmetric",
    ),
    "empty reader": ({"calibration_data_reader": EmptyReader()}, ValueError, "calibration_data_reader"),
    "no reader": ({"calibration_data_reader": None}, ValueError, "calibration_data_reader"),
    "reader keys": (
        {"calibration_data_reader": Reader(np.zeros((4, 1, 28, 28), np.float32), "x")},
        ValueError,
        "no input 'input'",
    ),
    "output is the input": ({"model_output": "INPUT"}, ValueError, "model_output"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_argument_and_write_nothing(case: str, tmp_path: Path) -> None:
    model = tmp_path / "fp.onnx"
    model.write_bytes(CLEAN.read_bytes())
    before = model.read_bytes()
    kwargs, error, words = REFUSALS[case]
    args: dict[str, object] = {
        "model_input": str(model),
        "model_output": str(tmp_path / "q.onnx"),
        "calibration_data_reader": Reader(np.zeros((8, 1, 28, 28), np.float32)),
        **kwargs,
    }
    if args["model_output"] == "INPUT":
        args["model_output"] = str(model)
    with pytest.raises(error) as info:
        quantize_static(**args)  # type: ignore[arg-type]
    message = str(info.value)
    assert words in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp.onnx"]
    assert model.read_bytes() == before


# ------------------------------------------------------------------------------ signature


def _default_name(value: object) -> object:
    return value.name if hasattr(value, "name") and not isinstance(value, str) else value


def test_signature_is_onnxruntimes_then_the_keyword_only_additions() -> None:
    theirs = inspect.signature(ort_quantize_static).parameters
    ours = inspect.signature(quantize_static).parameters
    names = list(ours)
    assert names[: len(theirs)] == list(theirs)
    assert all(ours[n].kind == theirs[n].kind for n in theirs)
    # The same defaults, onnxruntime's enums given by their names here.
    assert all(_default_name(theirs[n].default) == ours[n].default for n in theirs)
    extra = names[len(theirs) :]
    assert extra == ["rounding", "preset", "iters", "scheme", "seed", "weight_storage", "device"]
    assert all(ours[n].kind is inspect.Parameter.KEYWORD_ONLY for n in extra)
    assert ours["rounding"].default == "nearest"
    assert set(api.__all__) == {"DefendResult", "defend", "quantize_static", "scan", "verify"}


# ------------------------------------------------------------------ defend, scan, verify


def test_defend_then_verify_return_their_reports(tmp_path: Path, fashion_mnist: None) -> None:
    out = tmp_path / "defended.onnx"
    result = defend(CLEAN, out, num_calib=64, iters=20, holdout=200, max_agreement_drop="10%")
    assert isinstance(result, DefendResult) and isinstance(result.summary, QuantizeSummary)
    assert result.summary.options.method == "efrap" and result.summary.options.scheme.name == "w8a8"
    assert result.check.images == 200 and result.passed == result.check.passed
    assert out.exists() and "efrap.guard" in get_metadata(onnx.load(str(out)))

    report = verify(out, limit=300, min_accuracy=0.5, opt_level="all")
    assert isinstance(report, VerifyReport) and report.images == 300 and report.opt_level == "all"
    assert report.clean_accuracy is not None and report.gate is not None and report.gate.passed


def test_scan_returns_its_report(fashion_mnist: None) -> None:
    report = scan(CLEAN, scheme="w8a8", num_calib=32, holdout=50, steps=4)
    assert isinstance(report, ScanReport)
    assert report.verdict.verdict in ("clean", "qcb", "fp-backdoor", "inconclusive")


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda p: defend(p, p), ValueError, "model_output"),
        (lambda p: defend(p, p.with_name("d.onnx"), preset="fastest"), ValueError, "preset"),
        (
            lambda p: defend(p, p.with_name("d.onnx"), max_agreement_drop="2"),
            ValueError,
            "max_agreement_drop",
        ),
        (lambda p: verify(p, opt_level="fastest"), ValueError, "opt_level"),
        (lambda p: verify(p.with_name("missing.onnx")), ValueError, "model_input"),
        (lambda p: scan(p, scheme="w9a9"), ValueError, "scheme"),
        (lambda p: scan(p, scheme="w8a8", steps=0), ValueError, "steps"),
    ],
)
def test_the_plain_functions_check_their_arguments(
    call: Callable[[Path], object], error: type[Exception], words: str, tmp_path: Path
) -> None:
    model = tmp_path / "fp.onnx"
    model.write_bytes(CLEAN.read_bytes())
    with pytest.raises(error) as info:
        call(model)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp.onnx"]
