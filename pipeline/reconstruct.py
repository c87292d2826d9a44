"""Layer-wise reconstruction driven from the ONNX graph.

For each layer, in topological order, the driver builds a `LayerProblem`:

- inputs: the layer's input in the partly quantized network (earlier layers
  already fixed to their integer weights, every activation quantizer on), computed
  by the PyTorch simulation, which equals onnxruntime's QDQ semantics;
- targets: the FP network's output of the same layer on the same images;
- forward: the layer's own nodes (Conv/Gemm/MatMul and its fused Relu/Clip) and
  the output quantizer, re-run in PyTorch with a trainable weight.

Only those few nodes are re-implemented for the optimization; the graph stays the
single source of truth.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.graph import QuantLayer
from pipeline.qmath import QParams
from pipeline.rounding.base import LayerProblem
from pipeline.torch_graph import TorchGraph


def _batched(graph: TorchGraph, images: torch.Tensor, output: str, batch_size: int,
             weights: dict[str, torch.Tensor] | None,
             act_quant: dict[str, QParams] | None) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            feeds = {graph.inputs[0]: images[i : i + batch_size]}
            outs.append(graph.run(feeds, [output], weights=weights, act_quant=act_quant)[output])
    return torch.cat(outs)


def build_problem(
    graph: TorchGraph,
    layer: QuantLayer,
    qparams: QParams,
    images: torch.Tensor,
    fixed_weights: dict[str, torch.Tensor],
    act_qparams: dict[str, QParams],
    bias: torch.Tensor | None,
    needs: frozenset[str] = frozenset(),
    batch_size: int = 128,
) -> LayerProblem:
    """The reconstruction problem of one layer.

    Args:
        graph: The FP graph as a TorchGraph on the working device.
        layer: The layer to round.
        qparams: Its weight grid.
        images: Preprocessed calibration images on the working device.
        fixed_weights: Dequantized weights and biases of the layers already rounded.
        act_qparams: Parameters of every quantized activation tensor.
        bias: The layer's dequantized int32 bias, or None.
        needs: Extra fields the loss needs ("output_grads", "head").
        batch_size: Images per simulation call while caching.
    """
    device = images.device
    inputs = _batched(graph, images, layer.input, batch_size, fixed_weights, act_qparams)
    targets = _batched(graph, images, layer.output, batch_size, None, None)
    out_qp = act_qparams.get(layer.output)
    layer_quant = {layer.output: out_qp} if out_qp is not None else {}
    static = {layer.bias: bias} if layer.bias is not None and bias is not None else {}

    def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        weights = {layer.weight: w, **static}
        return graph.run({layer.input: x}, [layer.output], weights=weights,
                         act_quant=layer_quant)[layer.output]

    logits_name = graph.outputs[0]

    def head(y: torch.Tensor) -> torch.Tensor:
        return graph.run({layer.output: y}, [logits_name])[logits_name]

    problem = LayerProblem(
        name=layer.node,
        weight=graph.initializers[layer.weight].to(device),
        qparams=qparams,
        channel_axis=layer.weight_axis,
        forward=forward,
        inputs=inputs,
        targets=targets,
    )
    if "head" in needs or "output_grads" in needs:
        head_targets = _batched(graph, images, logits_name, batch_size, None, None)
        problem.head = head
        problem.head_targets = head_targets
    if "output_grads" in needs:
        grads = []
        for i in range(0, len(targets), batch_size):
            y = targets[i : i + batch_size].clone().requires_grad_(True)
            logits = head(y)
            # Unlabelled data: the FP model's own prediction stands in for the label.
            loss = F.cross_entropy(logits, logits.argmax(dim=1), reduction="sum")
            (g,) = torch.autograd.grad(loss, y)
            grads.append(g.detach())
        problem.output_grads = torch.cat(grads)
    return problem


def as_numpy_int(q: torch.Tensor) -> np.ndarray:
    """Integer tensor -> int64 numpy array on the CPU."""
    return q.detach().to("cpu", torch.int64).numpy()
