"""Reading an FP ONNX graph: which layers are quantized and where activations are.

Rules (the same ones the converter writes and the simulation runs):

1. A *layer* is a Conv, Gemm or MatMul node with a constant weight, plus a Relu or
   Clip that is the only consumer of its output.
2. The activation input of every layer is a quantization point.
3. The output of every layer is a quantization point unless it is a graph output
   (the logits stay float). With asymmetric activations onnxruntime drops the Relu
   in front of such a Q and fuses DQ -> Conv -> Q into QLinearConv.
4. A tensor produced from a quantization point by a range-preserving op (MaxPool,
   Flatten, Reshape, Identity, Transpose) shares that point's parameters: its Q/DQ
   is an exact identity, so no extra rounding happens.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.base.errors import EfrapError

QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")
FUSED_ACTIVATIONS = ("Relu", "Clip")
PASSTHROUGH_OPS = ("MaxPool", "Flatten", "Reshape", "Identity", "Transpose", "Squeeze", "Unsqueeze")


@dataclass(frozen=True)
class QuantLayer:
    """A quantized layer of the graph.

    Attributes:
        node: Name of the Conv/Gemm/MatMul node.
        op: Its op type.
        weight: Name of the weight initializer.
        bias: Name of the bias initializer, if any.
        weight_axis: Axis of the weight holding output channels.
        input: The activation tensor the layer reads.
        output: The layer's output tensor (after a fused Relu/Clip).
        nodes: Names of the nodes from the layer node to `output`.
        is_first: Whether the layer reads a graph input.
        is_last: Whether the layer's output is a graph output.
    """

    node: str
    op: str
    weight: str
    bias: str | None
    weight_axis: int
    input: str
    output: str
    nodes: tuple[str, ...]
    is_first: bool
    is_last: bool


@dataclass(frozen=True)
class QuantPlan:
    """Where the quantized graph has its quantizers.

    Attributes:
        layers: Quantized layers in topological order.
        points: Activation tensors with their own calibrated parameters, in order.
        shared: Tensor -> the point whose parameters it reuses (rule 4).
        point_layers: Point -> names of the layers that read it (directly or shared).
    """

    layers: tuple[QuantLayer, ...]
    points: tuple[str, ...]
    shared: dict[str, str] = field(default_factory=dict)
    point_layers: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def all_quantized_tensors(self) -> list[str]:
        """Points and shared tensors, i.e. every tensor that gets a Q/DQ pair."""
        return list(self.points) + [t for t in self.shared if t not in self.points]

    def root(self, tensor: str) -> str:
        """The point whose parameters `tensor` uses."""
        return self.shared.get(tensor, tensor)

    def layer(self, node: str) -> QuantLayer:
        """The layer whose Conv/Gemm/MatMul node is `node`."""
        return next(layer for layer in self.layers if layer.node == node)

    def point_is_edge(self, point: str) -> bool:
        """Whether the first or the last layer reads `point` (the scheme may give it more bits)."""
        readers = set(self.point_layers.get(point, ()))
        return any(layer.is_first or layer.is_last for layer in self.layers if layer.node in readers)


#: Opset every prepared graph is brought to: the QDQ writer needs 21 (INT4, per-channel DQ),
#: and converting first keeps old-style nodes (Clip with min/max attributes) valid there.
TARGET_OPSET = 21


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1:
            value = onnx.helper.get_attribute_value(node.attribute[0])
            name = node.attribute[0].name
            if name == "value":
                tensor = numpy_helper.to_array(value)
            elif name in ("value_float", "value_floats"):
                tensor = np.asarray(value, dtype=np.float32)
            elif name in ("value_int", "value_ints"):
                tensor = np.asarray(value, dtype=np.int64)
            else:
                kept.append(node)
                continue
            graph.initializer.append(numpy_helper.from_array(tensor, node.output[0]))
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def prepare_model(model: onnx.ModelProto, source: str = "model") -> onnx.ModelProto:
    """A copy at opset >= 21 with Constant nodes turned into initializers and every node named.

    Raises:
        EfrapError: the graph cannot be converted to opset 21.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if _default_opset(model) < TARGET_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, TARGET_OPSET)
        except Exception as exc:  # the converter raises RuntimeError and others
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EfrapError(f"{source}: cannot convert the graph from opset "
                             f"{_default_opset(model)} to {TARGET_OPSET} ({msg})") from None
        model.ir_version = max(model.ir_version, 10)
    graph = model.graph
    _constants_to_initializers(graph)
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    return model


def check_finite(model: onnx.ModelProto, source: str) -> None:
    """Refuse weights that hold NaN or Inf."""
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise EfrapError(f"{source}: initializer '{init.name}' holds NaN or Inf values")


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def assign_points(
    layer_io: Sequence[tuple[str, str]],
    outputs: Collection[str],
    upstream: Callable[[str], str | None],
) -> tuple[tuple[str, ...], dict[str, str]]:
    """Rules 2-4 over any graph representation (ONNX here, torch.fx in the attacks' QSim).

    Args:
        layer_io: (input tensor, output tensor) of every layer, in topological order.
        outputs: Graph outputs (never quantized).
        upstream: The data input of a tensor's producer when that producer is a
            range-preserving op, else None.

    Returns:
        The points with their own parameters, in order, and tensor -> point for the
        layer inputs/outputs that reuse a point's parameters.
    """
    candidates: list[str] = []
    for pair in layer_io:
        for t in pair:
            if t not in candidates and t not in outputs:
                candidates.append(t)
    roots = set(candidates)
    shared: dict[str, str] = {}
    for t in candidates:
        cur = upstream(t)
        while cur is not None:
            if cur in roots:
                shared[t] = cur
                break
            cur = upstream(cur)
    return tuple(t for t in candidates if t not in shared), shared


def analyze(model: onnx.ModelProto, source: str = "model") -> QuantPlan:
    """Find the quantized layers and activation points of a prepared FP model.

    Raises:
        EfrapError: the graph has no Conv/Gemm/MatMul with a constant weight.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input if i.name not in inits}
    graph_outputs = {o.name for o in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    producer: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
        for name in node.output:
            producer[name] = node

    layers: list[QuantLayer] = []
    for node in graph.node:
        if node.op_type not in QUANTIZABLE_OPS or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight not in inits or node.input[0] in inits:
            continue
        dims = len(inits[weight].dims)
        if node.op_type == "Conv":
            axis = 0
        elif node.op_type == "Gemm":
            plain = _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0
            if _attr(node, "transA", 0) or not plain:
                raise EfrapError(f"{source}: Gemm '{node.name}' uses transA/alpha/beta; not supported")
            axis = 0 if _attr(node, "transB", 0) else 1
        else:
            if dims != 2:
                continue
            axis = 1
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        out = node.output[0]
        nodes = [node.name]
        nxt = consumers.get(out, [])
        if len(nxt) == 1 and nxt[0].op_type in FUSED_ACTIVATIONS and out not in graph_outputs:
            out = nxt[0].output[0]
            nodes.append(nxt[0].name)
        layers.append(
            QuantLayer(
                node=node.name, op=node.op_type, weight=weight, bias=bias, weight_axis=axis,
                input=node.input[0], output=out, nodes=tuple(nodes),
                is_first=node.input[0] in graph_inputs, is_last=out in graph_outputs,
            )
        )
    if not layers:
        raise EfrapError(f"{source}: no Conv, Gemm or MatMul with a constant weight to quantize")

    def upstream(tensor: str) -> str | None:
        node = producer.get(tensor)
        return node.input[0] if node is not None and node.op_type in PASSTHROUGH_OPS else None

    points, shared = assign_points([(layer.input, layer.output) for layer in layers],
                                   graph_outputs, upstream)
    # Intermediate pass-through tensors between a root and a shared tensor get Q/DQ too
    # (exact identities) so that onnxruntime sees quantized values through pooling.
    for t in list(shared):
        cur = t
        while cur in producer and producer[cur].op_type in PASSTHROUGH_OPS:
            cur = producer[cur].input[0]
            if cur == shared[t]:
                break
            shared.setdefault(cur, shared[t])

    point_layers: dict[str, list[str]] = defaultdict(list)
    for layer in layers:
        point_layers[shared.get(layer.input, layer.input)].append(layer.node)
    return QuantPlan(
        layers=tuple(layers),
        points=points,
        shared=shared,
        point_layers={k: tuple(v) for k, v in point_layers.items()},
    )
