"""Bring an FP ONNX graph, whatever exported it, into the form the plan reads.

- Opset: graphs below opset 21 are converted to 21 (the QDQ writer's INT4 and
  per-channel DQ need it, and converting first keeps old-style nodes such as Clip
  with min/max attributes valid there).
- Constants: `Constant` nodes become initializers, so a weight exported as a
  Constant is a weight like any other.
- Names: every node gets a unique name (error messages and metadata use them).
- HardSwish: written as HardSigmoid(alpha 1/6, beta 1/2) times its input, the form
  onnxruntime itself runs it in; the product is then an integer Mul of two quantized
  activations (QLinearMul), as in onnxruntime's quantize_static output, instead of a
  float op between a DequantizeLinear and a QuantizeLinear.
- BatchNorm: a BatchNormalization whose input is a Conv's output (read by nothing
  else) is folded into that Conv, as `efrap export` folds it in torch; each folded
  conv's factor gamma / sqrt(var + eps) is added to the model's `efrap.bn_fold`
  metadata, so that EFRAP weighs its truncation errors in pre-BN units whichever
  tool folded the model.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import get_metadata, set_metadata
from pipeline.bn_fold import BN_FOLD_KEY

TARGET_OPSET = 21


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    kept = []
    inits = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in (
                o.name for o in graph.output):
            # Exporters share equal constants through Identity nodes: give each reader its own.
            source = next(i for i in graph.initializer if i.name == node.input[0])
            copy = onnx.TensorProto()
            copy.CopyFrom(source)
            copy.name = node.output[0]
            graph.initializer.append(copy)
            inits.add(copy.name)
            continue
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


def _name_nodes(graph: onnx.GraphProto) -> None:
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _split_hardswish(graph: onnx.GraphProto) -> None:
    nodes = []
    for node in graph.node:
        if node.op_type != "HardSwish" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        gate = f"{node.output[0]}_hardsigmoid"
        nodes.append(onnx.helper.make_node("HardSigmoid", [node.input[0]], [gate],
                                           name=f"{node.name}_hardsigmoid", alpha=1.0 / 6, beta=0.5))
        nodes.append(onnx.helper.make_node("Mul", [node.input[0], gate], list(node.output),
                                           name=node.name))
    del graph.node[:]
    graph.node.extend(nodes)


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def fold_batchnorm(model: onnx.ModelProto) -> dict[str, list[float]]:
    """Fold every Conv -> BatchNormalization pair in place; returns conv node -> BN factors."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    uses.update(o.name for o in graph.output)
    producer = {out: node for node in graph.node for out in node.output}
    factors: dict[str, list[float]] = {}
    removed = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len([o for o in bn.output if o]) != 1:
            continue
        conv = producer.get(bn.input[0])
        params = bn.input[1:5]
        if (conv is None or conv.op_type != "Conv" or uses[conv.output[0]] != 1
                or len(conv.input) < 2 or conv.input[1] not in inits
                or any(p not in inits for p in params)
                or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits)):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float32) for p in params)
        eps = np.float32(_attr(bn, "epsilon", 1e-5))
        f = (gamma / np.sqrt(var + eps)).astype(np.float32)
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float32)
        b = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float32)
             if len(conv.input) > 2 and conv.input[2] else np.zeros_like(mean))
        w_name, b_name = f"{conv.name}_folded_weight", f"{conv.name}_folded_bias"
        graph.initializer.append(numpy_helper.from_array(
            (w * f.reshape([-1] + [1] * (w.ndim - 1))).astype(np.float32), w_name))
        graph.initializer.append(numpy_helper.from_array(((b - mean) * f + beta).astype(np.float32), b_name))
        data_input = conv.input[0]
        del conv.input[:]
        conv.input.extend([data_input, w_name, b_name])
        conv.output[0] = bn.output[0]
        removed.append(bn.name)
        factors[conv.name] = [float(v) for v in f]
    kept = [n for n in graph.node if n.name not in set(removed)]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    stale = {i.name for i in unused}
    for value in [v for v in graph.input if v.name in stale]:
        graph.input.remove(value)
    return factors


def prepare_model(model: onnx.ModelProto, source: str = "model") -> onnx.ModelProto:
    """A copy at opset >= 21, constants as initializers, nodes named, HardSwish split, Conv+BN folded.

    Raises:
        EfrapError: the graph cannot be converted to opset 21.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if default_opset(model) < TARGET_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, TARGET_OPSET)
        except Exception as exc:  # the converter raises RuntimeError and others
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EfrapError(f"{source}: cannot convert the graph from opset "
                             f"{default_opset(model)} to {TARGET_OPSET} ({msg})") from None
        model.ir_version = max(model.ir_version, 10)
    _constants_to_initializers(model.graph)
    _name_nodes(model.graph)
    _split_hardswish(model.graph)
    folded = fold_batchnorm(model)
    if folded:
        raw = get_metadata(model).get(BN_FOLD_KEY)
        try:
            recorded = json.loads(raw) if raw else {}
        except ValueError:
            raise EfrapError(f"{source}: metadata '{BN_FOLD_KEY}' is not valid JSON") from None
        if not isinstance(recorded, dict):
            raise EfrapError(f"{source}: metadata '{BN_FOLD_KEY}' must be a JSON object")
        set_metadata(model, {BN_FOLD_KEY: {**recorded, **folded}})
    return model


def check_finite(model: onnx.ModelProto, source: str) -> None:
    """Refuse weights that hold NaN or Inf."""
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise EfrapError(f"{source}: initializer '{init.name}' holds NaN or Inf values")
