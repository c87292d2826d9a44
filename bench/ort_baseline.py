"""onnxruntime's own quantize_static: the baseline that docs/COVERAGE.md and docs/ZOO.md compare with.

One setup for both benchmarks, so that their "quantize_static" columns mean the same
thing: quant_pre_process first (again without symbolic shape inference where that gives
up on a graph), then QDQ, per-channel, MinMax calibration on model-ready inputs the
caller prepared (the pipeline's own calibration images), at the settings closest to a
scheme of ours:

- w8a8: uint8 activations, int8 symmetric weights;
- w4a8: int4 symmetric weights, uint8 activations (quantize_static's own int4 grid);
- w4a4 (and any other scheme): uint4 asymmetric weights with uint4 activations (uint8
  for other schemes), the first and last layers and their inputs at 8 bits through
  TensorQuantOverrides.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process


class _Batches(CalibrationDataReader):
    """`images` in batches of `batch` under the input `name`."""

    def __init__(self, images: np.ndarray, name: str, batch: int) -> None:
        self.images, self.name, self.batch = images, name, batch
        self.starts = iter(range(0, len(images), batch))

    def get_next(self) -> dict | None:
        start = next(self.starts, None)
        return None if start is None else {self.name: np.asarray(self.images[start : start + self.batch])}


def _settings(scheme: str, pre: onnx.ModelProto) -> tuple[QuantType, QuantType, dict, str]:
    """(activation type, weight type, extra options, a note saying what was used) for `scheme`."""
    if scheme == "w8a8":
        return QuantType.QUInt8, QuantType.QInt8, {}, ""
    if scheme == "w4a8":
        return QuantType.QUInt8, QuantType.QInt4, {}, "int4 symmetric weights, uint8 activations"
    act = QuantType.QUInt4 if scheme == "w4a4" else QuantType.QUInt8
    layers = [n for n in pre.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    first, last = layers[0], layers[-1]
    overrides: dict = {first.input[0]: [{"quant_type": QuantType.QUInt8}],
                       last.input[0]: [{"quant_type": QuantType.QUInt8}]}
    weights = {i.name: i for i in pre.graph.initializer}
    for node in (first, last):
        overrides[node.input[1]] = [{"quant_type": QuantType.QUInt8}] * weights[node.input[1]].dims[0]
    note = (f"uint4 asymmetric weights (MinMax, no MSE search), {act.name} activations, "
            "first/last layers at 8 bits")
    return act, QuantType.QUInt4, {"WeightSymmetric": False, "TensorQuantOverrides": overrides}, note


def ort_quantize_static(model: str | Path, out: str | Path, images: np.ndarray, input_name: str,
                        batch: int, scheme: str = "w8a8") -> str:
    """Quantize `model` into `out` with onnxruntime's quantize_static, calibrated on `images`.

    Args:
        model: The FP ONNX model.
        out: Where the QDQ model goes.
        images: Model-ready calibration inputs (N x ...), fed `batch` at a time.
        input_name: The model's image input.
        batch: Images per calibration batch (a model with a fixed batch needs exactly it).
        scheme: Our scheme whose settings are matched (see the module docstring).

    Returns:
        A note on the settings where they are not the scheme's own ("" for w8a8).
    """
    model, out = str(Path(model).resolve()), str(Path(out).resolve())
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        # chdir: quant_pre_process leaves a temporary file in the working folder.
        pre = str(Path(tmp) / "pre.onnx")
        try:
            quant_pre_process(model, pre)
        except Exception as exc:  # its symbolic shape inference gives up on some graphs
            print(f"quant_pre_process: {type(exc).__name__}: {exc}; again without symbolic shape "
                  "inference", flush=True)
            quant_pre_process(model, pre, skip_symbolic_shape=True)
        act, weight, extra, note = _settings(scheme, onnx.load(pre))
        quantize_static(pre, out, _Batches(images, input_name, batch), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=act, weight_type=weight,
                        calibrate_method=CalibrationMethod.MinMax, extra_options=extra)
    return note
