"""Fidelity of a quantized model to its FP model, every output: top-1 agreement, relative error."""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from pipeline.base.deployment import Deployment
from pipeline.base.errors import EfrapError
from pipeline.base.runtime import make_session
from pipeline.base.scheme import PRESETS
from pipeline.cli.main import main
from pipeline.quantize import QuantizeOptions, calibration_images, holdout_images, quantize_model
from tests.test_detector import INPUT as DETECTOR_INPUT
from tests.test_detector import detector_data, detector_onnx
from validators.fidelity import CLASSIFIER, OTHER, FidelityReport, measure_fidelity
from validators.guard import GuardLimits, check_defense

ZOO_CLEAN = "models/zoo/fmnist_small_cnn_clean.onnx"
W8A8 = QuantizeOptions(Deployment(scheme=PRESETS["w8a8"]), method="nearest")


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


def _detector_files(tmp_path: Path) -> tuple[Path, Path]:
    calib, test = detector_data()
    model = tmp_path / "det.onnx"
    onnx.save(detector_onnx(), str(model))
    data = tmp_path / "det.npz"
    np.savez(data, **{DETECTOR_INPUT: np.concatenate([calib, test])})
    return model, data


def test_every_quantize_measures_every_output_and_fails_its_limits(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`efrap quantize` (not only defend) measures fidelity on held-out inputs, prints it,
    records it, and a limit it breaks (or cannot measure) exits 1 with the model written."""
    model, data = _detector_files(tmp_path)
    out, summary = tmp_path / "q.onnx", tmp_path / "q.json"
    common = ["quantize", str(model), "-o", str(out), "--calib", f"npz:{data}", "--num-calib", "64",
              "--holdout", "16", "--summary", str(summary)]
    assert main(common) == 0
    text = capsys.readouterr().out
    assert "relative output error" in text and "output 'output0' 8x336: relative error" in text
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    guard = json.loads(meta["efrap.guard"])
    (fig,) = guard["fidelity"]["outputs"]
    assert guard["images"] == 16 and guard["agreement"] is None and fig["kind"] == OTHER
    assert 0.0 < fig["relative_error"] < 0.05 and guard["output_error"] == fig["relative_error"]
    assert json.loads(summary.read_text())["guard"]["output_error"] == guard["output_error"]

    assert main([*common, "--max-output-error", "1e-6"]) == 1
    text = capsys.readouterr().out
    assert "FAILED" in text and "relative output error" in text and "above the limit 1e-06" in text
    assert out.exists()
    # A detector has no top-1: an agreement limit cannot be judged, so it fails.
    assert main([*common, "--max-agreement-drop", "1%"]) == 1
    assert "agreement with FP is not measurable" in capsys.readouterr().out


def test_no_held_out_input_is_not_measured_and_fails_every_limit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, data = _detector_files(tmp_path)
    out = tmp_path / "q.onnx"
    every = ["quantize", str(model), "-o", str(out), "--calib", f"npz:{data}", "--num-calib", "80"]
    assert main(every) == 0
    assert "check: nothing measured (no image is left for a held-out check" in capsys.readouterr().out
    guard = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["efrap.guard"])
    assert guard["images"] == 0 and guard["fidelity"] is None and guard["output_error"] is None
    assert main([*every, "--max-output-error", "0.5"]) == 1
    assert "the output error is not measurable: no image is left" in capsys.readouterr().out


def test_guard_report_reads_accuracy_from_the_classifier_output(fashion_mnist: None) -> None:
    fp = onnx.load(ZOO_CLEAN)
    calib, pre = calibration_images(fp, "fashion-mnist", 128, 0, ZOO_CLEAN)
    held_out, labels = holdout_images(fp, "fashion-mnist", 128, 300, 0, ZOO_CLEAN)
    qdq, _, _ = quantize_model(fp, calib, W8A8, ZOO_CLEAN, pre)
    report = check_defense(fp, qdq, held_out, labels, GuardLimits(min_accuracy=0.999), "faithful", "cpu")
    session = make_session(qdq, "faithful", "cpu")
    direct = float((session.run(np.asarray(held_out)).argmax(1) == labels).mean())
    assert report.accuracy == pytest.approx(direct) and report.fidelity is not None
    assert not report.passed and "below the limit 99.90%" in report.why[0]
