"""torch -> ONNX: BatchNorm folded in torch, opset 21, dynamic batch, layer names kept.

BN is folded in torch first (the exported weights are exactly the folded torch
weights); the graph is exported with the TorchScript exporter (fast, names nodes
after modules) at opset 20 and converted to opset 21, which changes nothing for
the ops a CNN uses. The input normalisation and model facts go into metadata.

Folding scales each output channel of a conv by gamma / sqrt(var + eps). The
factors go into metadata ("efrap.bn_fold": ONNX conv node -> factors) so that a
defense whose loss is defined on the weight before folding (EFRAP's flip
penalty, as released) can measure it in those units; see pipeline.bn_fold.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn

from pipeline.bn_fold import BN_FOLD_KEY
from pipeline.errors import EfrapError
from pipeline.onnx_io import save_model, set_metadata
from validators.runtime import make_session

OPSET = 21
_TORCHSCRIPT_MAX_OPSET = 20


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every Conv -> BatchNorm pair folded into the conv."""
    return _fold(model)[0]


def _fold(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Folded copy and, per folded conv (module name), its per-channel BN factors."""
    from torch.fx import symbolic_trace
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval()
    try:
        traced = symbolic_trace(model)
        fused = fuse(model, inplace=False)
    except Exception as exc:  # tracing fails on data-dependent control flow
        raise EfrapError(f"cannot fold BatchNorm: the model is not traceable ({exc})") from None
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules()):
        raise EfrapError("a BatchNorm layer does not follow a conv and cannot be folded")
    modules = dict(traced.named_modules())
    factors: dict[str, torch.Tensor] = {}
    for node in traced.graph.nodes:
        # The same pattern fuse() folds: a BN module whose only input is a conv module.
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if isinstance(src, torch.fx.Node) and src.op == "call_module" and isinstance(
                modules[src.target], nn.modules.conv._ConvNd):
            bn = modules[node.target]
            assert bn.running_var is not None
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            factors[str(src.target)] = (gamma / torch.sqrt(bn.running_var + bn.eps)).detach().float()
    return fused, factors


def bn_fold_metadata(proto: onnx.ModelProto, folded: nn.Module,
                     factors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """ONNX conv node name -> BN factors, matching each node by its exported weight.

    Matching by value, not by name, keeps this independent of how the exporter
    names nodes and initializers: the exported weight is the folded torch weight.
    """
    inits = {t.name: t for t in proto.graph.initializer}
    modules = dict(folded.named_modules())
    weights = {name: modules[name].weight.detach().numpy() for name in factors}
    out: dict[str, list[float]] = {}
    for node in proto.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = onnx.numpy_helper.to_array(inits[node.input[1]])
        hits = [name for name, tw in weights.items() if tw.shape == w.shape and np.array_equal(tw, w)]
        if len(hits) == 1:
            out[node.name] = [float(v) for v in factors[hits[0]].tolist()]
    return out


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
    folded, factors = _fold(model)
    proto = to_onnx(folded, input_shape)
    mean, std = normalization
    extra: dict[str, object] = {"efrap.normalization": {"mean": list(mean), "std": list(std)}}
    bn = bn_fold_metadata(proto, folded, factors)
    if bn:
        extra[BN_FOLD_KEY] = bn
    set_metadata(proto, {**extra, **(metadata or {})})
    x = torch.randn((8, *input_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    got = make_session(proto, "faithful", "cpu").run(x.numpy())
    save_model(proto, out_path)
    return float(np.abs(expected - got).max())
