"""GPU path: learned rounding on CUDA (run with `python -m pytest -m gpu`; CI deselects it)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from pipeline.base.deployment import Deployment
from pipeline.base.runtime import make_session
from pipeline.base.scheme import PRESETS
from pipeline.quantize import QuantizeOptions, quantize_model
from pipeline.rounding.efrap import EFRAP_FAST, EFRAP_RELEASE

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("config", [replace(EFRAP_RELEASE, iters=300), replace(EFRAP_FAST, iters=300)],
                         ids=["release", "fast"])
def test_efrap_runs_on_cuda_and_writes_valid_qdq(tiny_model: onnx.ModelProto, calib_images: np.ndarray,
                                                 config: object) -> None:
    assert torch.cuda.is_available(), "the gpu marker needs a CUDA GPU"
    options = QuantizeOptions(Deployment(scheme=PRESETS["w4a4"]), method="efrap", device="cuda",
                              rounding=config)
    qdq, _, summary = quantize_model(tiny_model, calib_images, options)
    assert summary.device.startswith("cuda")
    onnx.checker.check_model(qdq)
    logits = make_session(qdq, "faithful", "cpu").run(calib_images)
    assert np.isfinite(logits).all()
    assert any(layer.flip_fraction > 0 for layer in summary.layers)


def test_cuda_and_cpu_round_a_layer_alike(tiny_model: onnx.ModelProto, calib_images: np.ndarray) -> None:
    # Float sums differ between devices, so integers may differ at ties; most must agree.
    assert torch.cuda.is_available(), "the gpu marker needs a CUDA GPU"
    config = replace(EFRAP_FAST, iters=200)
    runs = {d: quantize_model(tiny_model, calib_images,
                              QuantizeOptions(Deployment(scheme=PRESETS["w4a4"]), method="efrap", device=d,
                                              rounding=config))[1] for d in ("cpu", "cuda")}
    for name, layer in runs["cpu"].layers.items():
        same = (layer.q == runs["cuda"].layers[name].q).mean()
        assert same > 0.97, (name, same)
