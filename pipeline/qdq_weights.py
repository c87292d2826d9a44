"""Reading a QDQ model's integer weights back: what DequantizeLinear feeds each Conv/Gemm/MatMul.

The audit (`pipeline.audit`) and the trigger-guided repair (`pipeline.repair`) read the
integers, scales and zero points a quantizer stored, whatever tool wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from pipeline.base.errors import EfrapError

#: (lowest, highest) integer of each stored integer type a weight may have.
_CONTAINER_RANGES = {
    onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT4: (-8, 7), onnx.TensorProto.UINT4: (0, 15),
    onnx.TensorProto.INT16: (-32768, 32767), onnx.TensorProto.UINT16: (0, 65535),
}


@dataclass(frozen=True, eq=False)
class StoredWeight:
    """An integer weight of Q feeding DequantizeLinear into a Conv/Gemm/MatMul.

    Attributes:
        node: The consuming node.
        name: The integer initializer.
        q: The integers (int64).
        scale: float32 scale (() or (C,)).
        zero_point: int64 zero point, shape of `scale`.
        axis: DequantizeLinear's axis (ONNX default 1), used when `scale` is a vector.
        container: (lowest, highest) integer of the stored type.
    """

    node: str
    name: str
    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    container: tuple[int, int]

    @property
    def per_channel(self) -> bool:
        """Whether the grid has one scale per channel."""
        return self.scale.ndim == 1 and self.scale.size > 1


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(onnx.helper.get_attribute_value(a))
    return default


def stored_weights(q_model: onnx.ModelProto, source: str = "quantized model") -> list[StoredWeight]:
    """Q's integer weights, in graph order (Q prepared: constants as initializers, nodes named)."""
    inits = {i.name: i for i in q_model.graph.initializer}
    producer = {o: n for n in q_model.graph.node for o in n.output}
    out = []
    for node in q_model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        raw = inits[dq.input[0]]
        if raw.data_type not in _CONTAINER_RANGES:
            continue
        if len(dq.input) < 2 or dq.input[1] not in inits:
            raise EfrapError(f"{source}: weight '{dq.input[0]}' has no constant scale")
        scale = np.asarray(onnx.numpy_helper.to_array(inits[dq.input[1]]), np.float32)
        has_zp = len(dq.input) > 2 and dq.input[2] in inits
        zp = np.asarray(onnx.numpy_helper.to_array(inits[dq.input[2]])).astype(np.int64) if has_zp \
            else np.zeros(scale.shape, np.int64)
        q = np.asarray(onnx.numpy_helper.to_array(raw)).astype(np.int64)
        if scale.ndim > 1 or zp.shape != scale.shape or not np.all(np.isfinite(scale)) or (scale <= 0).any():
            raise EfrapError(f"{source}: weight '{raw.name}' has an unusable scale or zero point")
        out.append(StoredWeight(node=node.name, name=raw.name, q=q, scale=scale, zero_point=zp,
                                axis=_attr(dq, "axis", 1), container=_CONTAINER_RANGES[raw.data_type]))
    return out
