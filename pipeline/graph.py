"""Reading a prepared FP ONNX graph: which layers are quantized and where activations are.

Any graph onnxruntime runs is accepted: the plan names what is quantized and every
other op stays in float. The rules (the QDQ writer writes them, onnxruntime fuses
them, the simulations run them) follow onnxruntime's QDQ conventions:

1. A *layer* is a Conv (grouped and depthwise included), a Gemm, or a MatMul whose
   second input is a constant 2-D weight, plus a Relu or Clip that is the only
   consumer of its output. Its weight gets integers and a DequantizeLinear; a
   constant bias gets int32.
2. Integer ops: onnxruntime runs Add, Mul, MatMul and Concat of activations, and
   average pooling, on integers (QLinearAdd, QLinearMul, QLinearMatMul, QLinearConcat,
   QLinearAveragePool) when each activation input and the output have Q/DQ; a Relu or
   Clip that is the only consumer of such an op is fused, as for layers.
3. Every activation input and output of a layer or an integer op is a quantization
   point, unless it is a graph output (logits stay float). A tensor read by several
   consumers (a residual branch) has one quantizer that all of them read.
4. A tensor produced from a point by a range-preserving op (MaxPool, Flatten,
   Reshape, Identity, Transpose, Squeeze, Unsqueeze, Slice, Split) shares that
   point's parameters: its Q/DQ is an exact identity, so no extra rounding happens,
   and onnxruntime drops the pair and runs the op on the integers (the channel split
   of a ShuffleNet, for one).
5. The first layers (no layer upstream) and the last layers (no layer downstream)
   are the "edge" layers a scheme may give more bits.
6. Only tensors whose values depend on the graph input's values are activations.
   What a Shape or Size (or a subgraph of constants) computes, a detector's anchor
   grid and strides for one, is the same for every input: it stays float, gets no
   quantizer, and an Add, Mul or Concat that mixes it with activations stays a
   float op (onnxruntime's quantize_static folds such subgraphs into constants).

Layers can be kept in float by node name or op type (`exclude`, onnxruntime's
`nodes_to_exclude`). A Conv or Gemm whose weight is not a constant cannot be
quantized and is refused by name.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import onnx

from pipeline.base.errors import EfrapError

QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")
FUSED_ACTIVATIONS = ("Relu", "Clip")
PASSTHROUGH_OPS = ("MaxPool", "Flatten", "Reshape", "Identity", "Transpose", "Squeeze", "Unsqueeze",
                   "Slice", "Split")
INTEGER_OPS = ("Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool")
#: Ops whose output depends on their input's shape, never on its values.
SHAPE_OPS = ("Shape", "Size", "EyeLike")


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
        is_first: Whether no other layer is upstream of it.
        is_last: Whether no other layer is downstream of it.
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

    @property
    def edge(self) -> bool:
        """Whether the layer is first or last (a scheme may give it more bits)."""
        return self.is_first or self.is_last


@dataclass(frozen=True)
class QuantPlan:
    """Where the quantized graph has its quantizers.

    Attributes:
        layers: Quantized layers in topological order.
        points: Activation tensors with their own calibrated parameters, in order.
        shared: Tensor -> the point whose parameters it reuses (rule 4).
        point_layers: Point -> names of the layers that read it (directly or shared).
        excluded: Layer-like nodes kept in float -> why.
        constants: Constant operands of integer Add/Mul ops (a bias or a scale after a
            layer), quantized per tensor like an activation so that onnxruntime runs
            the op on integers (QLinearAdd, QLinearMul), as its quantize_static does.
    """

    layers: tuple[QuantLayer, ...]
    points: tuple[str, ...]
    shared: dict[str, str] = field(default_factory=dict)
    point_layers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    constants: tuple[str, ...] = ()

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
        return any(layer.edge for layer in self.layers if layer.node in readers)


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def assign_points(
    candidates: Sequence[str],
    outputs: Collection[str],
    upstream: Callable[[str], str | None],
) -> tuple[tuple[str, ...], dict[str, str]]:
    """Rules 3-4: which candidate tensors get their own parameters and which share.

    Args:
        candidates: Tensors to quantize, in topological order (repeats ignored).
        outputs: Graph outputs (never quantized).
        upstream: The data input of a tensor's producer when that producer is a
            range-preserving op, else None.

    Returns:
        The points with their own parameters, in order, and tensor -> point for the
        candidates that reuse a point's parameters.
    """
    ordered: list[str] = []
    for t in candidates:
        if t not in ordered and t not in outputs:
            ordered.append(t)
    roots = set(ordered)
    shared: dict[str, str] = {}
    for t in ordered:
        cur = upstream(t)
        while cur is not None:
            if cur in roots:
                shared[t] = cur
                break
            cur = upstream(cur)
    return tuple(t for t in ordered if t not in shared), shared


class _Graph:
    """Producers, consumers and constants of a graph, read once."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.inits = {i.name: i for i in graph.initializer}
        self.inputs = {i.name for i in graph.input if i.name not in self.inits}
        self.outputs = {o.name for o in graph.output}
        self.types = _elem_types(model)
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)
            for name in node.output:
                self.producer[name] = node
        self.dynamic = self._value_dependent()

    def _value_dependent(self) -> set[str]:
        """Tensors whose values depend on the graph input's values.

        A detector's anchor grid (Shape, Gather, Range, ... on a feature map) and any
        subgraph of constants are the same for every input: onnxruntime's calibration
        sees one value per element of them, and quantize_static folds them to
        constants, so they keep no quantizer and no op mixing them with activations
        runs on a shared integer grid.
        """
        seen: set[str] = set()
        # A node with a subgraph (If, Loop, Scan) may read the input's values without
        # naming them as inputs: its outputs count as value-dependent, as before this rule.
        stack = [*self.inputs, *(o for n in self.nodes if _has_subgraph(n) for o in n.output if o)]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            for node in self.consumers.get(name, []):
                if node.op_type not in SHAPE_OPS:
                    stack.extend(o for o in node.output if o)
        return seen

    def is_activation(self, name: str) -> bool:
        """Whether a tensor is float data computed from the input's values (not a constant or a shape)."""
        return (bool(name) and name in self.dynamic and name not in self.inits
                and self.types.get(name, _FLOAT) == _FLOAT)


_FLOAT = onnx.TensorProto.FLOAT
_SUBGRAPH_ATTRS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in _SUBGRAPH_ATTRS for a in node.attribute)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor shape inference can tell (shape arithmetic is int64)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is a help here, not a requirement
        inferred = model
    graph = inferred.graph
    out = {}
    for value in [*graph.value_info, *graph.input, *graph.output]:
        if value.type.tensor_type.elem_type:
            out[value.name] = value.type.tensor_type.elem_type
    return out


def _layer_of(node: onnx.NodeProto, g: _Graph, source: str) -> tuple[int, str | None] | str:
    """(weight axis, bias) when `node` is a quantizable layer, else why it stays float."""
    if len(node.input) < 2 or not g.is_activation(node.input[0]):
        return "its data input is a constant"
    weight = node.input[1]
    if weight not in g.inits:
        if node.op_type == "MatMul":
            return "it multiplies two activations"
        producer = g.producer.get(weight)
        if producer is not None and producer.op_type == "DequantizeLinear":
            raise EfrapError(f"{source}: {node.op_type} '{node.name}' already reads a quantized weight; "
                             "give the full-precision model")
        raise EfrapError(f"{source}: {node.op_type} '{node.name}' has a weight that is not a constant "
                         f"('{weight}'); it cannot be quantized")
    dims = len(g.inits[weight].dims)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and bias not in g.inits:
        return "its bias is not a constant"
    if node.op_type == "Conv":
        return 0, bias
    if node.op_type == "Gemm":
        plain = _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0
        if _attr(node, "transA", 0) or not plain or dims != 2:
            return "it uses transA, alpha or beta"
        if bias is not None and len(g.inits[bias].dims) != 1:
            return "its bias is not one value per output"
        return (0 if _attr(node, "transB", 0) else 1), bias
    if dims != 2:
        return "its weight is not 2-D"
    return 1, None


def _find_layers(g: _Graph, exclude: Collection[str], source: str) -> tuple[list[dict], dict[str, str]]:
    found: list[dict] = []
    excluded: dict[str, str] = {}
    for node in g.nodes:
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        if node.name in exclude or node.op_type in exclude:
            excluded[node.name] = "excluded on request"
            continue
        kind = _layer_of(node, g, source)
        if isinstance(kind, str):
            excluded[node.name] = kind
            continue
        axis, bias = kind
        out = node.output[0]
        nodes = [node.name]
        nxt = g.consumers.get(out, [])
        if len(nxt) == 1 and nxt[0].op_type in FUSED_ACTIVATIONS and out not in g.outputs:
            out = nxt[0].output[0]
            nodes.append(nxt[0].name)
        found.append({"node": node.name, "op": node.op_type, "weight": node.input[1], "bias": bias,
                      "weight_axis": axis, "input": node.input[0], "output": out, "nodes": tuple(nodes)})
    return found, excluded


def _reach(g: _Graph, starts: set[str], forward: bool) -> set[str]:
    """Tensors reachable from `starts` (downstream when forward, else upstream)."""
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if forward:
            stack.extend(o for n in g.consumers.get(t, []) for o in n.output if o)
        elif t in g.producer:
            stack.extend(i for i in g.producer[t].input if i and i not in g.inits)
    return seen


def _integer_op_tensors(g: _Graph, exclude: Collection[str],
                        region: set[str]) -> tuple[list[str], list[str]]:
    """Activation tensors and constant operands of the integer ops (rule 2).

    `region` starts as the layers' outputs and grows with each integer op's output:
    an Add or Mul with one constant operand (a bias or a scale) is an integer op only
    right after a quantized op, so float regions (a LayerNorm written out as Sub, Pow,
    ReduceMean, Add(eps), ...) stay float.
    """
    tensors: list[str] = []
    constants: list[str] = []
    uses = defaultdict(int)
    for node in g.nodes:
        for name in node.input:
            uses[name] += 1
    for node in g.nodes:
        if node.op_type not in (*INTEGER_OPS, "MatMul") or node.name in exclude or node.op_type in exclude:
            continue
        acts = [i for i in node.input if g.is_activation(i)]
        if node.op_type in ("Add", "Mul"):
            consts = [i for i in node.input if i in g.inits]
            scalar_like = len(consts) == 1 and uses[consts[0]] == 1 and len(acts) == 1 and (
                acts[0] in region) and g.inits[consts[0]].data_type == _FLOAT
            if len(acts) != 2 and not scalar_like:
                continue
            if scalar_like:
                constants.append(consts[0])
        elif node.op_type == "MatMul" and len(acts) != 2:
            continue  # a constant weight makes it a layer
        elif node.op_type == "Concat" and len(acts) != len([i for i in node.input if i]):
            continue
        tensors += acts if node.op_type in ("Add", "Mul", "MatMul", "Concat") else acts[:1]
        out = node.output[0]
        nxt = g.consumers.get(out, [])
        if len(nxt) == 1 and nxt[0].op_type in FUSED_ACTIVATIONS and out not in g.outputs:
            out = nxt[0].output[0]  # as for layers: onnxruntime drops the Relu in front of the Q
        tensors.append(out)
        region.add(out)
    return tensors, constants


def analyze(model: onnx.ModelProto, source: str = "model", exclude: Collection[str] = ()) -> QuantPlan:
    """Find the quantized layers and activation points of a prepared FP model.

    Args:
        model: The prepared FP model (pipeline.prepare.prepare_model).
        source: Name used in error messages.
        exclude: Node names or op types to keep in float.

    Raises:
        EfrapError: a Conv/Gemm weight is not a constant, or nothing is left to quantize.
    """
    g = _Graph(model)
    found, excluded = _find_layers(g, set(exclude), source)
    if not found:
        why = f" ({len(excluded)} kept in float: {', '.join(sorted(excluded)[:3])})" if excluded else ""
        raise EfrapError(f"{source}: no Conv, Gemm or MatMul with a constant weight to quantize{why}")
    layer_inputs = {f["input"] for f in found}
    layer_outputs = {f["output"] for f in found}
    layers = []
    for f in found:
        upstream = _reach(g, {f["input"]}, forward=False)
        downstream = _reach(g, {f["output"]}, forward=True)
        first = not (upstream & (layer_outputs - {f["output"]}))
        last = not (downstream & (layer_inputs - {f["input"]}))
        layers.append(QuantLayer(**f, is_first=first, is_last=last))

    candidates = [t for layer in layers for t in (layer.input, layer.output)]
    op_tensors, constants = _integer_op_tensors(g, set(exclude), {layer.output for layer in layers})
    candidates += op_tensors
    order = {t: i for i, t in enumerate([*g.inputs, *(o for n in g.nodes for o in n.output)])}
    candidates = sorted(dict.fromkeys(candidates), key=lambda t: order.get(t, len(order)))

    def upstream_of(tensor: str) -> str | None:
        node = g.producer.get(tensor)
        return node.input[0] if node is not None and node.op_type in PASSTHROUGH_OPS else None

    points, shared = assign_points(candidates, g.outputs, upstream_of)
    # Intermediate pass-through tensors between a root and a shared tensor get Q/DQ too
    # (exact identities) so that onnxruntime sees quantized values through pooling.
    for t in list(shared):
        cur = t
        while cur in g.producer and g.producer[cur].op_type in PASSTHROUGH_OPS:
            cur = g.producer[cur].input[0]
            if cur == shared[t]:
                break
            shared.setdefault(cur, shared[t])

    point_layers: dict[str, list[str]] = defaultdict(list)
    for layer in layers:
        point_layers[shared.get(layer.input, layer.input)].append(layer.node)
    return QuantPlan(
        layers=tuple(layers), points=points, shared=shared,
        point_layers={k: tuple(v) for k, v in point_layers.items()}, excluded=excluded,
        constants=tuple(constants),
    )
