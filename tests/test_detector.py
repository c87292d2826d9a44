"""A YOLOv8-style detector: its anchor grid comes from the feature maps' shapes.

The head builds anchor points and strides with Shape, Gather, Range, Expand, ... on
its own feature maps, decodes distances into boxes with them and concatenates boxes
and class scores. Those tensors are the same for every input, so they must stay float
(onnxruntime's quantize_static folds them into constants); on one integer grid with
the activations, boxes of 160 pixels came out around 12. The pipeline's nearest W8A8
is held to quantize_static's output error on held-out inputs, same calibration data.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from pipeline.base.deployment import Deployment
from pipeline.base.runtime import make_session
from pipeline.base.scheme import PRESETS
from pipeline.graph import analyze
from pipeline.prepare import prepare_model
from pipeline.quantize import QuantizeOptions, quantize_model

SIZE = 128
INPUT = "images"
#: Boxes (cx, cy, w, h) first, then class scores, as YOLOv8's output0.
BOX_ROWS = 4


class TinyYolo(nn.Module):
    """Backbone of strided convs with SiLU, three 1x1 heads, DFL and YOLOv8's decoding."""

    def __init__(self, classes: int = 4, reg_max: int = 8) -> None:
        super().__init__()
        self.classes, self.reg_max = classes, reg_max
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.SiLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.SiLU())
        self.p3 = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.SiLU())
        self.p4 = nn.Sequential(nn.Conv2d(16, 24, 3, 2, 1), nn.SiLU())
        self.p5 = nn.Sequential(nn.Conv2d(24, 32, 3, 2, 1), nn.SiLU())
        self.heads = nn.ModuleList(nn.Conv2d(c, 4 * reg_max + classes, 1) for c in (16, 24, 32))
        # DFL: the expectation of a softmax over distance bins, a 1x1 conv with weights 0..reg_max-1.
        self.dfl = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1)
        self.strides = (8, 16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        feats = [head(p) for head, p in zip(self.heads, (p3, p4, p5), strict=True)]
        n, rows = feats[0].shape[0], 4 * self.reg_max + self.classes
        anchors, strides = [], []
        for f, stride in zip(feats, self.strides, strict=True):  # ultralytics' make_anchors
            h, w = f.shape[2], f.shape[3]
            sy, sx = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5,
                                    torch.arange(w, dtype=torch.float32) + 0.5, indexing="ij")
            anchors.append(torch.stack((sx, sy), -1).view(-1, 2))
            strides.append(torch.full((h * w, 1), stride, dtype=torch.float32))
        anchor = torch.cat(anchors).transpose(0, 1).unsqueeze(0)
        stride_row = torch.cat(strides).transpose(0, 1)
        flat = torch.cat([f.view(n, rows, -1) for f in feats], 2)
        box, cls = flat.split((4 * self.reg_max, self.classes), 1)
        a = box.shape[2]
        dist = self.dfl(box.view(n, 4, self.reg_max, a).transpose(2, 1).softmax(1)).view(n, 4, a)
        lt, rb = dist.chunk(2, 1)
        x1y1, x2y2 = anchor - lt, anchor + rb
        boxes = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * stride_row
        return torch.cat((boxes, cls.sigmoid()), 1)


def detector_onnx(seed: int = 0) -> onnx.ModelProto:
    """The seeded TinyYolo exported as ultralytics exports it (TorchScript, dynamic batch)."""
    torch.manual_seed(seed)
    model = TinyYolo().eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.rand(2, 3, SIZE, SIZE), buf, dynamo=False, opset_version=17,
                          input_names=[INPUT], output_names=["output0"],
                          dynamic_axes={INPUT: {0: "n"}, "output0": {0: "n"}})
    return onnx.load_from_string(buf.getvalue())


def detector_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Model-ready calibration inputs and held-out inputs (images in [0, 1], as YOLOv8 takes)."""
    rng = np.random.default_rng(seed)
    return (rng.random((64, 3, SIZE, SIZE), dtype=np.float32),
            rng.random((16, 3, SIZE, SIZE), dtype=np.float32))


def _quantize_static(fp: onnx.ModelProto, calib: np.ndarray, work: Path) -> onnx.ModelProto:
    """onnxruntime's nearest-rounding peer: QDQ, per channel, u8 activations, s8 weights, MinMax."""

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, len(calib), 16))

        def get_next(self) -> dict | None:
            start = next(self.starts, None)
            return None if start is None else {INPUT: calib[start : start + 16]}

    onnx.save(fp, str(work / "fp.onnx"))
    quant_pre_process(str(work / "fp.onnx"), str(work / "pre.onnx"))
    quantize_static(str(work / "pre.onnx"), str(work / "qs.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return onnx.load(str(work / "qs.onnx"))


def _relative_error(model: onnx.ModelProto, x: np.ndarray, ref: np.ndarray, level: str) -> float:
    got = make_session(model, level, "cpu").run(x)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _value_dependent(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from the input's values (not through Shape), read off the graph here."""
    seen = {i.name for i in model.graph.input}
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if node.op_type != "Shape" and any(i in seen for i in node.input):
            seen.update(node.output)
    return seen


def test_the_detector_builds_its_anchors_from_shapes() -> None:
    ops = {n.op_type for n in detector_onnx().graph.node}
    assert {"Shape", "Gather", "Range", "Expand", "Concat", "Softmax"} <= ops


def test_nearest_w8a8_is_as_close_to_fp_as_quantize_static(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # quant_pre_process leaves a temporary file in the working folder
    fp = detector_onnx()
    calib, test = detector_data()
    qdq, result, _ = quantize_model(fp, calib,
                                    QuantizeOptions(Deployment(scheme=PRESETS["w8a8"]), method="nearest"))
    onnx.checker.check_model(qdq)
    qs = _quantize_static(fp, calib, tmp_path)
    ref = make_session(fp, "faithful", "cpu").run(test)
    for level in ("faithful", "all"):
        ours, theirs = _relative_error(qdq, test, ref, level), _relative_error(qs, test, ref, level)
        assert ours <= theirs, (level, ours, theirs)
    # The boxes keep their size (they came out an order of magnitude small before).
    boxes = make_session(qdq, "faithful", "cpu").run(test)[:, :BOX_ROWS]
    assert np.abs(boxes).mean() == pytest.approx(np.abs(ref[:, :BOX_ROWS]).mean(), rel=0.02)
    # No quantizer on the anchor grid, the strides or anything else shape-derived.
    dynamic = _value_dependent(qdq)
    inits = {i.name for i in qdq.graph.initializer}
    for node in qdq.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            assert node.input[0] in dynamic, node.input[0]
    assert result.plan.layers and len(result.plan.points) > 10


def _shape_grid_graph() -> onnx.ModelProto:
    """conv -> x; a grid from x's shape (Shape, Gather, Range, Cast); x + grid, concat(x, grid), x * x."""
    w = numpy_helper.from_array(np.full((4, 4, 1, 1), 0.25, np.float32), "w")
    consts = [numpy_helper.from_array(np.asarray(v, np.int64), name)
              for name, v in (("idx", 3), ("zero", 0), ("one", 1), ("shape", [1, 1, 1, 8]))]
    heads = ("shifted", "joined", "square")
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["x"], name="conv"),
        helper.make_node("Shape", ["x"], ["s"], name="shape_of"),
        helper.make_node("Gather", ["s", "idx"], ["width"], name="width"),
        helper.make_node("Range", ["zero", "width", "one"], ["r"], name="range"),
        helper.make_node("Cast", ["r"], ["rf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["rf", "shape"], ["grid"], name="grid"),
        helper.make_node("Add", ["x", "grid"], ["shifted"], name="add_grid"),
        helper.make_node("Concat", ["x", "grid"], ["joined"], name="concat_grid", axis=1),
        helper.make_node("Mul", ["x", "x"], ["square"], name="square"),
        *(helper.make_node("Sigmoid", [t], [f"{t}_out"], name=f"{t}_out") for t in heads),
    ]
    outputs = [helper.make_tensor_value_info(f"{t}_out", TensorProto.FLOAT, None) for t in heads]
    graph = helper.make_graph(nodes, "grid", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            [1, 4, 8, 8])],
                              outputs, [w, *consts])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_a_shape_derived_grid_gets_no_quantizer_and_ops_mixing_it_stay_float() -> None:
    plan = analyze(prepare_model(_shape_grid_graph()))
    quantized = set(plan.all_quantized_tensors())
    assert {"rf", "grid"}.isdisjoint(quantized)
    # Mixed with the grid, Add and Concat stay float ops: their outputs get no quantizer.
    assert {"shifted", "joined"}.isdisjoint(quantized)
    # An op of activations only is still an integer op.
    assert {"x", "square"} <= quantized
