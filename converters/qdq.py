"""Rewrite an FP ONNX graph into QDQ ONNX from a QuantResult.

Weights become integer initializers feeding DequantizeLinear (axis set for
per-channel grids), biases int32 initializers with scale s_in * s_w, and every
quantized activation tensor gets a QuantizeLinear -> DequantizeLinear pair that
all its consumers read (a Shape or Size reads the QuantizeLinear's output). For W8A8
(int8 weights, uint8 activations) this is the pattern onnxruntime fuses into
QLinearConv.

Integer storage: "int8" keeps 4-bit values in 8-bit containers (the fast form on
CPU); "int4" writes packed INT4/UINT4 initializers (the small form). Activations
below 8 bits are 8-bit Q/DQ followed by a Clip to the narrower grid (see
`_clip_to_grid`). onnx-graphsurgeon cannot write 4-bit constants, so they are
converted after export.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from pipeline.base.errors import EfrapError
from pipeline.qmath import QParams
from pipeline.quantized import QuantResult

QDQ_OPSET = 21
WEIGHT_STORAGES = ("int8", "int4")
SHAPE_OPS = ("Shape", "Size")


def _container(qp: QParams) -> type:
    return np.int8 if qp.signed else np.uint8


def _four_bit(qp: QParams) -> type:
    return ml_dtypes.int4 if qp.signed else ml_dtypes.uint4


def _check_range(values: np.ndarray, qp: QParams, what: str) -> None:
    if values.size and (values.min() < qp.qmin or values.max() > qp.qmax):
        raise EfrapError(f"{what}: integers outside [{qp.qmin}, {qp.qmax}]")


def _clip_to_grid(graph: gs.Graph, name: str, value: gs.Variable, qp: QParams) -> gs.Variable:
    """Clip a dequantized 8-bit-container activation to its narrower grid's ends.

    onnxruntime 1.31 fuses Q/DQ with UINT4 activations into QLinearConv at the
    default optimization level and then rejects the graph; 8-bit Q/DQ followed by a
    Clip at the dequantized grid ends computes exactly clamp(round(x/s)+z, qmin, qmax)
    and loads at every level.
    """
    s = np.float32(qp.scale)
    z = np.float32(qp.zero_point)
    lo = gs.Constant(f"{name}_act_clip_min", np.array((np.float32(qp.qmin) - z) * s, np.float32))
    hi = gs.Constant(f"{name}_act_clip_max", np.array((np.float32(qp.qmax) - z) * s, np.float32))
    out = gs.Variable(f"{name}_dequantized_clipped", dtype=np.float32)
    graph.nodes.append(gs.Node("Clip", name=f"{name}_grid_clip", inputs=[value, lo, hi],
                               outputs=[out]))
    return out


def _quantize_weights(graph: gs.Graph, result: QuantResult, to_four_bit: dict[str, type],
                      weight_storage: str) -> None:
    """Integer weights and int32 biases feeding DequantizeLinear, for every rounded layer."""
    nodes = {n.name: n for n in graph.nodes}
    for layer in result.plan.layers:
        ql = result.layers.get(layer.node)
        if ql is None:
            continue  # not rounded yet (a partial model for sampling): the weight stays float
        node = nodes[layer.node]
        qp = ql.qparams
        _check_range(ql.q, qp, f"layer {layer.node}")
        w_q = gs.Constant(f"{layer.weight}_quantized", np.ascontiguousarray(ql.q.astype(_container(qp))))
        scale = gs.Constant(f"{layer.weight}_scale", np.asarray(qp.scale, np.float32))
        zp = gs.Constant(f"{layer.weight}_zero_point", np.asarray(qp.zero_point).astype(_container(qp)))
        if weight_storage == "int4" and qp.bits <= 4:
            to_four_bit[w_q.name] = _four_bit(qp)
            to_four_bit[zp.name] = _four_bit(qp)
        w_deq = gs.Variable(f"{layer.weight}_dequantized", dtype=np.float32, shape=list(ql.q.shape))
        attrs = {"axis": layer.weight_axis} if qp.axis is not None else {}
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"{layer.node}_weight_dq",
                                   inputs=[w_q, scale, zp], outputs=[w_deq], attrs=attrs))
        node.inputs[1] = w_deq
        if layer.bias is not None and ql.bias_q is not None and ql.bias_scale is not None:
            b_q = gs.Constant(f"{layer.bias}_quantized", ql.bias_q.astype(np.int32))
            b_s = gs.Constant(f"{layer.bias}_scale", ql.bias_scale.astype(np.float32))
            b_z = gs.Constant(f"{layer.bias}_zero_point", np.zeros_like(ql.bias_q, dtype=np.int32))
            b_deq = gs.Variable(f"{layer.bias}_dequantized", dtype=np.float32, shape=list(ql.bias_q.shape))
            graph.nodes.append(gs.Node("DequantizeLinear", name=f"{layer.node}_bias_dq",
                                       inputs=[b_q, b_s, b_z], outputs=[b_deq], attrs={"axis": 0}))
            node.inputs[2] = b_deq


def _quantize_constants(graph: gs.Graph, result: QuantResult) -> None:
    """Per-tensor integers for the constant operands of integer Add/Mul ops."""
    tensors = graph.tensors()
    for name, const in result.constants.items():
        qp = const.qparams
        _check_range(const.q, qp, f"constant {name}")
        values = tensors[name]
        q = gs.Constant(f"{name}_quantized", np.ascontiguousarray(const.q.astype(_container(qp))))
        scale = gs.Constant(f"{name}_scale", np.asarray(qp.scale, np.float32).reshape(()))
        zp = gs.Constant(f"{name}_zero_point", np.asarray(qp.zero_point).astype(_container(qp)).reshape(()))
        deq = gs.Variable(f"{name}_dequantized", dtype=np.float32, shape=list(const.q.shape))
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"{name}_dq", inputs=[q, scale, zp],
                                   outputs=[deq]))
        for consumer in list(values.outputs):
            for i, inp in enumerate(consumer.inputs):
                if inp is values:
                    consumer.inputs[i] = deq


def _quantize_activations(graph: gs.Graph, result: QuantResult) -> None:
    """One QuantizeLinear -> DequantizeLinear pair per quantized activation, read by every consumer."""
    tensors = graph.tensors()
    for name in result.plan.all_quantized_tensors():
        qp = result.act_qparams[name]
        var = tensors[name]
        consumers = list(var.outputs)
        scale = gs.Constant(f"{name}_act_scale", np.asarray(qp.scale, np.float32).reshape(()))
        zp = gs.Constant(f"{name}_act_zero_point",
                         np.asarray(qp.zero_point).astype(_container(qp)).reshape(()))
        q_out = gs.Variable(f"{name}_quantized")
        dq_out = gs.Variable(f"{name}_dequantized", dtype=np.float32)
        graph.nodes.append(gs.Node("QuantizeLinear", name=f"{name}_q", inputs=[var, scale, zp],
                                   outputs=[q_out]))
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"{name}_dq", inputs=[q_out, scale, zp],
                                   outputs=[dq_out]))
        if qp.bits < 8:
            dq_out = _clip_to_grid(graph, name, dq_out, qp)
        for consumer in consumers:
            # A Shape or Size reads the integer tensor: same shape, and no DequantizeLinear
            # has to run for it once onnxruntime fuses the producer into an integer op.
            read = q_out if consumer.op in SHAPE_OPS else dq_out
            for i, inp in enumerate(consumer.inputs):
                if inp is var:
                    consumer.inputs[i] = read


def _export(graph: gs.Graph, source: onnx.ModelProto, to_four_bit: dict[str, type]) -> onnx.ModelProto:
    """The ModelProto at opset >= 21, 4-bit initializers packed, the source's metadata kept."""
    graph.opset = max(graph.opset, QDQ_OPSET)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = max(out.ir_version, 10)
    others = [o for o in out.opset_import if o.domain not in ("", "ai.onnx")]
    del out.opset_import[:]
    out.opset_import.extend([onnx.helper.make_opsetid("", max(graph.opset, QDQ_OPSET)), *others])
    for i, init in enumerate(out.graph.initializer):
        if init.name in to_four_bit:
            arr = numpy_helper.to_array(init).astype(np.int64).astype(to_four_bit[init.name])
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
    for prop in source.metadata_props:
        out.metadata_props.add(key=prop.key, value=prop.value)
    out.producer_name = "efrap-onnx"
    return out


def to_qdq(
    model: onnx.ModelProto,
    result: QuantResult,
    weight_storage: str = "int8",
) -> onnx.ModelProto:
    """Build the QDQ model.

    Args:
        model: The prepared FP model the result was computed on.
        result: Integer weights, their grids and activation parameters.
        weight_storage: "int8" (containers) or "int4" (packed 4-bit where the grid
            has 4 bits).

    A layer missing from `result.layers` keeps its float weight (the learned-rounding
    driver samples layer inputs from such partly rounded graphs).

    Returns:
        A new ModelProto (opset 21); the input model is not modified.
    """
    if weight_storage not in WEIGHT_STORAGES:
        raise EfrapError(f"unknown weight storage '{weight_storage}': use int8 or int4")
    graph = gs.import_onnx(model)
    to_four_bit: dict[str, type] = {}
    _quantize_weights(graph, result, to_four_bit, weight_storage)
    _quantize_constants(graph, result)
    _quantize_activations(graph, result)
    return _export(graph, model, to_four_bit)
