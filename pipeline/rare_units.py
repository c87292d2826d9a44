"""Units that clean data rarely wakes, and the weights that read them.

A layer-wise reconstruction on clean data gets no gradient from a weight whose input
is zero on every clean image, so any rounding it learns leaves such a weight where the
attacker planted it; the `dormant` and `adaptive` attacks (docs/ZOO.md) put their
whole backdoor there. A unit of a layer's input (a channel of a conv's input, a feature
of a Gemm's or MatMul's) "fires" on an image when any of its quantized values is not
zero. Rare-unit pruning sets to the grid's zero every weight that reads the units firing
on the fewest calibration images, as many as fit a budget: together they fire on at
most `budget` of the images. So the layer computes exactly what it computed before on
all other calibration images, and the pruning can change the layer's output on at most
that share of them.
"""

from __future__ import annotations

import math
from dataclasses import replace

import onnx
import torch

from pipeline.graph import QuantLayer
from pipeline.qmath import QParams
from pipeline.reconstruct import layer_model
from pipeline.rounding.base import Rows
from pipeline.torch_graph import TorchGraph


def layer_node(model: onnx.ModelProto, layer: QuantLayer) -> onnx.NodeProto:
    """The layer's Conv/Gemm/MatMul node."""
    return next(n for n in model.graph.node if n.name == layer.node)


def unit_axis(node: onnx.NodeProto) -> int | None:
    """Axis of the weight node's input that holds its units (None: a layout pruning skips).

    Conv reads channels (axis 1); Gemm (without transA) and MatMul read the last axis.
    """
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        return None if trans_a else -1
    return -1 if node.op_type == "MatMul" else None


def firing(inputs: Rows, axis: int, chunk: int = 256) -> torch.Tensor:
    """[N, units] bool: whether each unit has a nonzero value on each cached sample."""
    out = []
    for i in range(0, len(inputs), chunk):
        x = inputs[torch.arange(i, min(i + chunk, len(inputs)))]
        size = x.shape[axis]
        x = x.movedim(axis, 1).reshape(x.shape[0], size, -1)
        out.append((x != 0).any(dim=2).cpu())
    return torch.cat(out)


def rare_units(fires: torch.Tensor, budget: float) -> torch.Tensor:
    """[units] bool: the rarest units that together fire on at most `budget` of the samples.

    Units are taken in order of how many samples they fire on (ties by index), and
    taking stops at the first unit that would push the union past the budget; units that
    never fire are always taken.
    """
    n, units = fires.shape
    allowed = math.floor(budget * n)
    counts = fires.sum(dim=0)
    chosen = torch.zeros(units, dtype=torch.bool)
    union = torch.zeros(n, dtype=torch.bool)
    for j in torch.argsort(counts, stable=True).tolist():
        grown = union | fires[:, j]
        if int(grown.sum()) > allowed:
            break
        union, chosen[j] = grown, True
    return chosen


def reading_mask(model: onnx.ModelProto, layer: QuantLayer, node: onnx.NodeProto, units: torch.Tensor,
                 axis: int, sample_shape: tuple[int, ...], weight: torch.Tensor) -> torch.Tensor:
    """Bool mask of the weight's elements that read any of `units` (weight's shape).

    The layer's own weight node is linear in its weight, so the gradient of its summed
    output on an input that is 1 on the chosen units and 0 elsewhere is positive exactly
    at the weights that read them, whatever the op's groups, strides or transposes.
    """
    only = replace(layer, nodes=(layer.node,), output=node.output[0])
    graph = TorchGraph(layer_model(model, only), weight.device)
    shape = [1, *sample_shape[1:]]
    probe = torch.zeros(shape, device=weight.device)
    index = [slice(None)] * len(shape)
    index[axis] = units.to(weight.device)
    probe[tuple(index)] = 1.0
    w = torch.zeros_like(weight, requires_grad=True)
    out = graph.run({layer.input: probe}, [only.output], weights={layer.weight: w})[only.output]
    (grad,) = torch.autograd.grad(out.sum(), w)
    return grad != 0


def prune(q: torch.Tensor, qparams: QParams, mask: torch.Tensor) -> torch.Tensor:
    """The integers with every masked weight set to its grid's zero point (dequantizes to 0)."""
    _, zero = qparams.torch(q.dim(), q.device)
    return torch.where(mask, zero.to(q.dtype).expand_as(q), q)


def prune_rare_inputs(model: onnx.ModelProto, layer: QuantLayer, inputs: Rows, q: torch.Tensor,
                      qparams: QParams, weight: torch.Tensor, budget: float
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """Rare-unit pruning of one layer's integers (see the module docstring).

    Args:
        model: The prepared FP model.
        layer: The layer.
        inputs: Its cached inputs in the partly quantized network, [N, ...].
        q: Its integers as the rounding method chose them.
        qparams: Its weight grid.
        weight: Its float weight (shape, device).
        budget: Share of the samples on which the pruned units may fire together.

    Returns:
        The integers after pruning, and stats: pruned_units (count), pruned_fraction
        (share of the weights set to zero) and pruned_fires (share of the samples on which
        a pruned unit fires).
    """
    node = layer_node(model, layer)
    axis = unit_axis(node)
    if axis is None or len(inputs) == 0:
        return q, {"pruned_units": 0.0, "pruned_fraction": 0.0, "pruned_fires": 0.0}
    fires = firing(inputs, axis)
    units = rare_units(fires, budget)
    stats = {"pruned_units": float(units.sum()), "pruned_fraction": 0.0,
             "pruned_fires": float(fires[:, units].any(dim=1).float().mean()) if units.any() else 0.0}
    if not units.any():
        return q, stats
    sample_shape = tuple(inputs[torch.arange(1)].shape)
    mask = reading_mask(model, layer, node, units, axis, sample_shape, weight)
    stats["pruned_fraction"] = float(mask.float().mean())
    return prune(q, qparams, mask), stats
