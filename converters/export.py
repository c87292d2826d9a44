"""torch -> ONNX: BatchNorm folded in torch, opset 21, dynamic batch, layer names kept.

BN is folded in torch first (the exported weights are exactly the folded torch
weights); the graph is exported with the TorchScript exporter (fast, names nodes
after modules) at opset 20 and converted to opset 21, which changes nothing for
the ops a CNN uses. The input normalisation and model facts go into metadata.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn

from pipeline.errors import EfrapError
from pipeline.onnx_io import save_model, set_metadata
from validators.runtime import make_session

OPSET = 21
_TORCHSCRIPT_MAX_OPSET = 20


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every Conv -> BatchNorm pair folded into the conv."""
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval()
    try:
        fused = fuse(model, inplace=False)
    except Exception as exc:  # tracing fails on data-dependent control flow
        raise EfrapError(f"cannot fold BatchNorm: the model is not traceable ({exc})") from None
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules()):
        raise EfrapError("a BatchNorm layer does not follow a conv and cannot be folded")
    return fused


def to_onnx(model: nn.Module, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """Export a (folded, eval-mode) model with input 'input' and output 'logits'."""
    x = torch.zeros((2, *input_shape))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, buf, opset_version=_TORCHSCRIPT_MAX_OPSET, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"},
                                                                 "logits": {0: "batch"}},
                          do_constant_folding=True, dynamo=False)
    exported = onnx.load_from_string(buf.getvalue())
    converted = onnx.version_converter.convert_version(exported, OPSET)
    converted.ir_version = 10
    onnx.checker.check_model(converted)
    return converted


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], out_path: str, *,
                normalization: tuple[list[float], list[float]],
                metadata: dict[str, object] | None = None) -> float:
    """Fold BN, export, record metadata, write atomically; returns max |ONNX - torch|.

    Args:
        model: The trained model.
        input_shape: (C, H, W) of one input.
        out_path: Where to write the .onnx file.
        normalization: Per-channel (mean, std) the model's input expects.
        metadata: Extra metadata_props (arch, dataset, ...).
    """
    folded = fold_batchnorm(model)
    proto = to_onnx(folded, input_shape)
    mean, std = normalization
    set_metadata(proto, {"efrap.normalization": {"mean": list(mean), "std": list(std)},
                         **(metadata or {})})
    x = torch.randn((8, *input_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    got = make_session(proto, "faithful", "cpu").run(x.numpy())
    save_model(proto, out_path)
    return float(np.abs(expected - got).max())
