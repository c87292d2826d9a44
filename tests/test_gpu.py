"""GPU path: learned rounding on CUDA (run with `python -m pytest -m gpu`; CI deselects it)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from pipeline.base.runtime import make_session
from pipeline.quantize import QuantizeOptions, quantize_model
from pipeline.rounding.efrap import EFRAP_RELEASE
from pipeline.scheme import PRESETS

pytestmark = pytest.mark.gpu


def test_efrap_runs_on_cuda_and_writes_valid_qdq(tiny_model: onnx.ModelProto,
                                                 calib_images: np.ndarray) -> None:
    assert torch.cuda.is_available(), "the gpu marker needs a CUDA GPU"
    options = QuantizeOptions(scheme=PRESETS["w4a4"], method="efrap", device="cuda",
                              rounding=replace(EFRAP_RELEASE, iters=300))
    qdq, _, summary = quantize_model(tiny_model, calib_images, options)
    assert summary["device"].startswith("cuda")
    onnx.checker.check_model(qdq)
    logits = make_session(qdq, "faithful", "cpu").run(calib_images)
    assert np.isfinite(logits).all()
    assert any(layer["flip_fraction"] > 0 for layer in summary["layers"])
