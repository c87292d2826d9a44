"""Fidelity of a quantized model to its FP model, every output: top-1 agreement, relative error."""

from __future__ import annotations

import dataclasses
import io
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from pipeline.base.errors import EfrapError
from pipeline.base.runtime import make_session
from pipeline.quantize import QuantizeOptions, calibration_images, holdout_images, quantize_model
from pipeline.scheme import PRESETS
from tests.test_detector import detector_data, detector_onnx
from validators.fidelity import CLASSIFIER, OTHER, FidelityReport, measure_fidelity
from validators.guard import GuardLimits, check_defense

ZOO_CLEAN = "models/zoo/fmnist_small_cnn_clean.onnx"
W8A8 = QuantizeOptions(scheme=PRESETS["w8a8"], method="nearest")


def test_the_stored_clean_model_agrees_and_its_logits_stay_close(fashion_mnist: None) -> None:
    fp = onnx.load(ZOO_CLEAN)
    calib, pre = calibration_images(fp, "fashion-mnist", 256, 0, ZOO_CLEAN)
    held_out, labels = holdout_images(fp, "fashion-mnist", 256, 500, 0, ZOO_CLEAN)
    qdq, _, _ = quantize_model(fp, calib, W8A8, ZOO_CLEAN, pre)
    report = measure_fidelity(fp, qdq, held_out, "faithful", "cpu")
    (out,) = report.outputs
    assert report.images == 500 and out.kind == CLASSIFIER and out.shape == (500, 10)
    assert out.top1_agreement is not None and out.top1_agreement >= 0.97
    assert out.relative_error is not None and 0.0 < out.relative_error < 0.05 and not out.why
    # The same agreement the defense's own check measures.
    guard = check_defense(fp, qdq, held_out, labels, GuardLimits(), "faithful", "cpu")
    assert out.top1_agreement == pytest.approx(guard.agreement)
    # A model against itself: no error, full agreement.
    (same,) = measure_fidelity(fp, fp, held_out, "faithful", "cpu").outputs
    assert same.relative_error == 0.0 and same.top1_agreement == 1.0 and same.max_abs_error == 0.0


def test_the_detector_is_measured_by_relative_error_only() -> None:
    fp = detector_onnx()
    calib, test = detector_data()
    qdq, _, _ = quantize_model(fp, calib, W8A8)
    report = measure_fidelity(fp, qdq, test, "all", "cpu", batch=None)
    (out,) = report.outputs
    assert out.kind == OTHER and out.top1_agreement is None and out.shape == (16, 8, 336)
    ref = make_session(fp, "all", "cpu").run(test)
    got = make_session(qdq, "all", "cpu").run(test)
    direct = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert out.relative_error == pytest.approx(direct, rel=1e-6) and out.relative_error < 0.05
    assert report.opt_level == "all"
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["outputs"][0]["shape"] == [16, 8, 336] and doc["outputs"][0]["top1_agreement"] is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.images = 0  # type: ignore[misc]


class TwoHeads(nn.Module):
    """A classifier that also returns its feature map (a second, non-classifier output)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.conv(x))
        return self.fc(f.mean((2, 3))), f


def test_every_output_is_measured_as_what_it_looks_like() -> None:
    torch.manual_seed(0)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TwoHeads().eval(), torch.randn(2, 3, 8, 8), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits", "features"],
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}, "features": {0: "n"}})
    fp = onnx.load_from_string(buf.getvalue())
    rng = np.random.default_rng(0)
    calib, test = (rng.standard_normal((n, 3, 8, 8)).astype(np.float32) for n in (64, 40))
    qdq, _, _ = quantize_model(fp, calib, W8A8)
    logits, features = measure_fidelity(fp, qdq, test, "faithful", "cpu").outputs
    assert (logits.name, logits.kind) == ("logits", CLASSIFIER)
    assert (features.name, features.kind) == ("features", OTHER)
    assert logits.top1_agreement is not None and logits.relative_error is not None
    assert features.top1_agreement is None and features.relative_error is not None
    assert features.relative_error < 0.05 and features.shape == (40, 8, 8, 8)


def _graph(op: str, batch: int | str = "n", **attrs: object) -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], name=op.lower(), **attrs)
    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, 3]) for name in "xy")
    graph = helper.make_graph([node], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_what_cannot_be_measured_is_none_with_the_reason() -> None:
    x = -np.ones((6, 3), np.float32)
    (nan,) = measure_fidelity(_graph("Log"), _graph("Log"), x, "faithful", "cpu").outputs
    assert nan.relative_error is None and nan.top1_agreement is None and "NaN" in nan.why
    zero = np.zeros((6, 3), np.float32)
    (flat,) = measure_fidelity(_graph("Relu"), _graph("Abs"), zero, "faithful", "cpu").outputs
    assert flat.relative_error is None and "all zeros" in flat.why and flat.top1_agreement == 1.0


def test_a_fixed_batch_is_padded_and_outputs_must_correspond() -> None:
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    report: FidelityReport = measure_fidelity(_graph("Relu", 4), _graph("Abs", 4), x, "faithful", "cpu", 4)
    (out,) = report.outputs
    assert report.images == 10 and out.shape == (10, 3)
    relu, absolute = np.maximum(x, 0), np.abs(x)
    assert out.relative_error == pytest.approx(np.linalg.norm(absolute - relu) / np.linalg.norm(relu))
    assert out.top1_agreement == pytest.approx(float((relu.argmax(1) == absolute.argmax(1)).mean()))
    other = _graph("Relu")
    other.graph.output[0].name = other.graph.node[0].output[0] = "z"
    with pytest.raises(EfrapError, match="not the FP model's"):
        measure_fidelity(_graph("Relu"), other, x, "faithful", "cpu")
