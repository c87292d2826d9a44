"""Shared fixtures: tiny models built in the tests, and the real data set."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from pipeline.base.progress import set_quiet

FASHION_DIR = Path(os.environ.get("EFRAP_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


@pytest.fixture(autouse=True, scope="session")
def _quiet_progress() -> None:
    set_quiet(True)


def require_fashion_mnist() -> None:
    """Fail under CI, skip elsewhere, when Fashion-MNIST is not installed."""
    if (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists() or (
        FASHION_DIR / "t10k-images-idx3-ubyte"
    ).exists():
        return
    message = f"Fashion-MNIST not found in {FASHION_DIR} (apt-get install dataset-fashion-mnist)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def fashion_mnist() -> None:
    """Require the real Fashion-MNIST files."""
    require_fashion_mnist()


class TinyNet(nn.Module):
    """Conv-relu-conv-relu-pool-conv-relu-flatten-fc-relu-fc: every rule of the plan."""

    def __init__(self, in_channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def export_tiny(path: Path, in_channels: int = 1, seed: int = 0) -> Path:
    """Export a seeded TinyNet (28x28 input) to ONNX."""
    torch.manual_seed(seed)
    model = TinyNet(in_channels).eval()
    x = torch.randn(2, in_channels, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(path), opset_version=20, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}},
                          dynamo=False)
    return path


@pytest.fixture
def tiny_onnx(tmp_path: Path) -> Path:
    """A tiny 1x28x28 CNN in ONNX."""
    return export_tiny(tmp_path / "tiny.onnx")


@pytest.fixture
def tiny_model(tiny_onnx: Path) -> onnx.ModelProto:
    """The tiny CNN loaded."""
    return onnx.load(str(tiny_onnx))


@pytest.fixture
def calib_images() -> np.ndarray:
    """256 seeded random inputs for the tiny model."""
    return np.random.default_rng(0).standard_normal((256, 1, 28, 28)).astype(np.float32)
