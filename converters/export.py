"""torch -> ONNX: BatchNorm folded in torch, opset 21, dynamic batch, layer names kept.

BN is folded in torch first with the pipeline's one folding rule
(`pipeline.bn_fold.fold_conv_bn`), so the exported weights are exactly the folded
torch weights the red team's simulation trains through; the graph is exported with
the TorchScript exporter (fast, names initializers after parameters) at opset 20
and converted to opset 21, which changes nothing for the ops a CNN uses. The input
normalisation and model facts go into metadata.

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
from torch import fx

from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import save_model, set_metadata
from pipeline.base.runtime import make_session
from pipeline.bn_fold import BN_FOLD_KEY, bn_factor, fold_conv_bn

OPSET = 21
_TORCHSCRIPT_MAX_OPSET = 20
_BN = nn.modules.batchnorm._BatchNorm


def fold_pairs(model: nn.Module) -> dict[str, str]:
    """Conv module path -> the BatchNorm module path folded into it.

    A BN folds into a conv when the conv's output feeds the BN and nothing else.

    Raises:
        EfrapError: the model cannot be traced, or a BN follows no conv.
    """
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:  # tracing fails on data-dependent control flow
        raise EfrapError(f"cannot fold BatchNorm: the model is not traceable ({exc})") from None
    modules = dict(model.named_modules())
    pairs: dict[str, str] = {}
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[str(node.target)], _BN):
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(modules[str(src.target)], nn.modules.conv._ConvNd)):
            pairs[str(src.target)] = str(node.target)
    folded = set(pairs.values())
    stray = [name for name, m in modules.items() if isinstance(m, _BN) and name not in folded]
    if stray:
        raise EfrapError(f"BatchNorm '{stray[0]}' does not follow a conv and cannot be folded")
    return pairs


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """An eval-mode copy of `model` with every Conv -> BatchNorm pair folded into the conv.

    Returns:
        The folded copy and, per folded conv (module path), its BN factors.
    """
    model = copy.deepcopy(model).eval()
    pairs = fold_pairs(model)
    factors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for conv_path, bn_path in pairs.items():
            conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
            w, b = fold_conv_bn(conv, bn)  # type: ignore[arg-type]
            factors[conv_path] = bn_factor(bn).detach().float()  # type: ignore[arg-type]
            conv.weight = nn.Parameter(w.detach().clone())
            conv.bias = nn.Parameter(b.detach().clone()) if b is not None else None
            _replace(model, bn_path, nn.Identity())
    return model, factors


def bn_fold_metadata(proto: onnx.ModelProto, folded: nn.Module,
                     factors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """ONNX conv node name -> BN factors, matching each node by its exported weight.

    Matching by value, not by name, keeps this independent of how the exporter
    names nodes and initializers: the exported weight is the folded torch weight.
    """
    inits = {t.name: t for t in proto.graph.initializer}
    weights = {name: folded.get_submodule(name).weight.detach().numpy() for name in factors}
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
    folded, factors = fold_batchnorm(model)
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
