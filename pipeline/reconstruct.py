"""Layer-wise reconstruction problems, driven from the ONNX graph.

For each layer, in topological order, the driver builds a `LayerProblem`:

- inputs: the tensor the layer reads in the partly quantized network (earlier layers
  already fixed to their integer weights, every activation quantizer on), and
- targets: the FP network's output of the same layer on the same images,
  both computed by onnxruntime running the graphs themselves (`pipeline.sampler`);
- forward: the layer's own nodes (Conv/Gemm/MatMul and its fused Relu/Clip) and its
  output quantizer, run in PyTorch with a trainable weight by the pipeline's
  simulation of just those nodes.

So no op list limits the graphs learned rounding accepts. Losses that look past the
layer (Fisher-weighted, prediction difference) also need the rest of the FP network
in PyTorch; they work where the simulation covers the graph and say which op it
lacks where it does not.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from pipeline.base.errors import EfrapError, NotSupported
from pipeline.graph import QuantLayer
from pipeline.positions import position_problem
from pipeline.qmath import QParams, fake_quant
from pipeline.rounding.base import LayerProblem, Rows
from pipeline.torch_graph import TorchGraph


def as_patch_conv(node: onnx.NodeProto) -> onnx.NodeProto:
    """The same conv as a 1 x 1 conv with the same groups, for rows of flattened patches."""
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return onnx.helper.make_node("Conv", list(node.input), list(node.output), name=node.name,
                                 kernel_shape=[1, 1], group=group)


def layer_model(model: onnx.ModelProto, layer: QuantLayer, patches: bool = False) -> onnx.ModelProto:
    """The layer's own nodes as a graph from its input to its output.

    With `patches`, the Conv reads rows of flattened input patches ([M, K, 1, 1], see
    pipeline.positions) as a 1 x 1 conv; the nodes after it are unchanged.
    """
    graph = model.graph
    names = set(layer.nodes)
    nodes = [as_patch_conv(n) if patches and n.name == layer.node else n
             for n in graph.node if n.name in names]
    used = {i for n in nodes for i in n.input}
    out = onnx.helper.make_graph(
        nodes, f"layer {layer.node}", [onnx.helper.make_empty_tensor_value_info(layer.input)],
        [onnx.helper.make_empty_tensor_value_info(layer.output)],
        [i for i in graph.initializer if i.name in used])
    sub = onnx.helper.make_model(out, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub


def layer_forward(model: onnx.ModelProto, layer: QuantLayer, bias: torch.Tensor | None,
                  out_qp: QParams | None, device: torch.device, patches: bool = False
                  ) -> Callable[..., torch.Tensor]:
    """(input batch, float weight[, output step size]) -> the layer's output, quantized.

    The output quantizer uses its calibrated grid, or the given step size (a tensor, so
    that a method can learn it) with the calibrated zero point. With `patches`, the
    input is rows of patches and the weight is flattened to [C_out, K, 1, 1].
    """
    graph = TorchGraph(layer_model(model, layer, patches), device)
    static = {layer.bias: bias} if layer.bias is not None and bias is not None else {}
    act_quant = {layer.output: out_qp} if out_qp is not None else None

    def forward(x: torch.Tensor, w: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        weights = {layer.weight: w, **static}
        if out_scale is None or out_qp is None:
            return graph.run({layer.input: x}, [layer.output], weights=weights,
                             act_quant=act_quant)[layer.output]
        y = graph.run({layer.input: x}, [layer.output], weights=weights)[layer.output]
        zero = torch.as_tensor(np.float32(np.asarray(out_qp.zero_point).reshape(())), device=y.device)
        return fake_quant(y, out_scale, zero, out_qp.qmin, out_qp.qmax)

    return forward


class Head:
    """The rest of the FP network in PyTorch, from a layer's output to the logits.

    Only losses that look past the layer need it (see the module docstring).

    Args:
        model: The prepared FP model.
        logits: Its FP logits on the calibration images (from onnxruntime).
        device: The working device.
        loss: The loss's name, for the error message.

    Raises:
        EfrapError: the PyTorch simulation does not cover the graph.
    """

    def __init__(self, model: onnx.ModelProto, logits: Rows, device: torch.device, loss: str) -> None:
        try:
            self.graph = TorchGraph(model, device)
        except NotSupported as exc:
            raise EfrapError(f"loss '{loss}' needs the rest of the network in PyTorch, and {exc}; "
                             "use --loss mse") from None
        self.logits = logits
        self.name = self.graph.outputs[0]

    def run(self, layer: QuantLayer, y: torch.Tensor) -> torch.Tensor:
        """Logits from the layer's output `y` through the rest of the FP network."""
        return self.graph.run({layer.output: y}, [self.name])[self.name]


def build_problem(model: onnx.ModelProto, layer: QuantLayer, weight: torch.Tensor, qparams: QParams,
                  bias: torch.Tensor | None, out_qp: QParams | None, inputs: Rows, targets: Rows,
                  head: Head | None = None, needs: frozenset[str] = frozenset(),
                  chunk: int = 128) -> LayerProblem:
    """The reconstruction problem of one layer.

    Args:
        model: The prepared FP model.
        layer: The layer to round.
        weight: Its FP weight on the working device.
        qparams: Its weight grid.
        bias: Its dequantized int32 bias on the working device, or None.
        out_qp: Parameters of its output quantizer (None when the output stays float).
        inputs: Its cached inputs in the partly quantized network.
        targets: Its FP outputs on the same images.
        head: The rest of the FP network, for losses that need "head" or "output_grads".
        needs: What the loss reads beyond the layer.
        chunk: Samples per pass when computing output gradients.
    """
    problem = LayerProblem(
        name=layer.node, weight=weight, qparams=qparams, channel_axis=layer.weight_axis,
        forward=layer_forward(model, layer, bias, out_qp, weight.device),
        inputs=inputs, targets=targets, output_qparams=out_qp,
    )
    if not needs & {"head", "output_grads"}:
        node = next(n for n in model.graph.node if n.name == layer.node)
        if layer.op == "Conv" and weight.dim() == 4:
            patch_fwd = layer_forward(model, layer, bias, out_qp, weight.device, patches=True)
            problem.positions = lambda rows, seed: position_problem(problem, node, patch_fwd, rows, seed)
        return problem
    assert head is not None
    problem.head = lambda y: head.run(layer, y)
    problem.head_targets = head.logits
    if "output_grads" in needs:
        grads = []
        for i in range(0, len(targets), chunk):
            idx = torch.arange(i, min(i + chunk, len(targets)))
            y = targets[idx].to(weight.device).clone().requires_grad_(True)
            logits = head.run(layer, y)
            # Unlabelled data: the FP model's own prediction stands in for the label.
            loss = F.cross_entropy(logits, logits.argmax(dim=1), reduction="sum")
            (g,) = torch.autograd.grad(loss, y)
            grads.append(g.detach())
        problem.output_grads = torch.cat(grads)
    return problem

