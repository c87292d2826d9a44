"""The corpus architectures run in onnxruntime as in torch, through both ONNX exporters.

Each model (random init, width 1) takes one training-mode forward, so that BatchNorm
has non-trivial running statistics, and is then exported in eval mode with the
TorchScript exporter (opset 17) and the dynamo exporter (opset 21). Both graphs must
match torch on seeded inputs and keep the op types that make the architecture what it
is, so that a quantizer tested on this corpus meets them. All seven go through both
exporters: about 25 s on one thread.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models.architectures import build_model

# Op types each export must contain (TorchScript and dynamo write these the same way).
DISTINCTIVE: dict[str, set[str]] = {
    "mobilenet_v3_small": {"HardSwish", "HardSigmoid", "Mul", "Conv", "Gemm"},
    "efficientnet_b0": {"Sigmoid", "Mul", "Add", "Conv"},
    "shufflenet_v2": {"Concat", "Reshape", "Transpose", "Conv"},
    "regnet": {"Sigmoid", "Mul", "Add", "Conv"},
    "squeezenet": {"Concat", "MaxPool", "Relu", "Conv"},
    "vit_tiny": {"LayerNormalization", "MatMul", "Softmax", "Transpose", "Concat"},
    "convnext_tiny": {"LayerNormalization", "MatMul", "ReduceMean", "Sqrt", "Transpose"},
}
# Architectures with depthwise or group convs: some Conv has group > 1.
GROUPED = {"mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2", "regnet", "convnext_tiny"}


def _export(model: torch.nn.Module, x: torch.Tensor, path: Path, dynamo: bool) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            logging.disable(logging.WARNING)  # the dynamo exporter logs through `logging` as well
            try:
                program = torch.onnx.export(model, (x,), dynamo=True, opset_version=21, verbose=False)
            finally:
                logging.disable(logging.NOTSET)
            assert program is not None
            program.save(str(path))
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
    return onnx.load(str(path))


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _activation_matmuls(proto: onnx.ModelProto) -> int:
    """MatMuls whose two inputs are both computed (neither an initializer nor a Constant)."""
    constants = {t.name for t in proto.graph.initializer}
    constants |= {out for n in proto.graph.node if n.op_type == "Constant" for out in n.output}
    return sum(n.op_type == "MatMul" and not constants.intersection(n.input) for n in proto.graph.node)


@pytest.mark.parametrize("arch", sorted(DISTINCTIVE))
def test_exports_match_torch(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(arch, in_channels=3, num_classes=10, image_size=32)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    assert expected.shape == (4, 10)
    for dynamo in (False, True):
        path = tmp_path / f"{arch}_{'dynamo' if dynamo else 'torchscript'}.onnx"
        proto = _export(model, x, path, dynamo)
        got = _run(path, x.numpy())
        assert got.shape == (4, 10)
        assert np.abs(got - expected).max() < 1e-3, (arch, dynamo)
        ops = Counter(n.op_type for n in proto.graph.node)
        assert DISTINCTIVE[arch] <= set(ops), (arch, dynamo, DISTINCTIVE[arch] - set(ops))
        groups = [a.i for n in proto.graph.node if n.op_type == "Conv" for a in n.attribute
                  if a.name == "group"]
        assert (max(groups, default=1) > 1) == (arch in GROUPED), (arch, dynamo)
        if arch == "vit_tiny":  # q k^T and attn v in each of the 4 blocks
            assert _activation_matmuls(proto) == 8, dynamo


@pytest.mark.parametrize("arch", sorted(DISTINCTIVE))
@pytest.mark.parametrize(("channels", "size"), [(1, 32), (3, 28), (3, 64)])
def test_other_inputs(arch: str, channels: int, size: int) -> None:
    model = build_model(arch, in_channels=channels, num_classes=5, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, size, size)).shape == (2, 5)


def test_vit_needs_whole_patches() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model("vit_tiny", in_channels=3, num_classes=10, image_size=30)
