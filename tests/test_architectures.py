"""Every architecture builds for grey 28x28 and RGB 32x32 inputs and exports cleanly."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from converters.export import export_onnx
from models.architectures import ARCHITECTURES, build_model
from models.train import load_checkpoint, save_checkpoint
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import get_metadata
from pipeline.base.runtime import make_session


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_builds(arch: str, channels: int, size: int) -> None:
    model = build_model(arch, channels, 7, 0.25, size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_export_folds_bn_and_keeps_batch_dynamic(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 1, 10, 0.25, 28)
    model.train()
    with torch.no_grad():
        for _ in range(2):  # non-trivial running statistics
            model(torch.randn(16, 1, 28, 28))
    out = tmp_path / f"{arch}.onnx"
    diff = export_onnx(model, (1, 28, 28), str(out), normalization=([0.286], [0.353]),
                       metadata={"efrap.arch": arch})
    assert diff < 1e-4
    proto = onnx.load(str(out))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["BatchNormalization"] == 0 and ops["Conv"] > 0
    assert proto.opset_import[0].version == 21
    meta = get_metadata(proto)
    assert meta["efrap.arch"] == arch and "efrap.normalization" in meta
    sess = make_session(proto, "faithful", "cpu")
    for batch in (1, 5):
        assert sess.run(np.zeros((batch, 1, 28, 28), np.float32)).shape == (batch, 10)


def test_checkpoint_roundtrip_weights_only(tmp_path: Path) -> None:
    model = build_model("small_cnn")
    meta = {"arch": "small_cnn", "in_channels": 1, "num_classes": 10, "width": 1.0, "image_size": 28,
            "normalization": {"mean": [0.286], "std": [0.353]}}
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, meta)
    loaded, meta2 = load_checkpoint(path)
    assert meta2 == meta
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {}, "meta": {"arch": "nope"}}, bad)
    with pytest.raises(EfrapError, match=r"unknown architecture|bad\.pt"):
        load_checkpoint(bad)
