"""The result of quantization: what the converter writes and the simulation runs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from pipeline.base.scheme import Scheme
from pipeline.calibration import constant_qparams
from pipeline.graph import QuantPlan
from pipeline.qmath import QParams, bias_scale, dequantize_np, quantize_bias, quantize_np
from pipeline.torch_graph import TorchGraph


@dataclass
class QuantizedLayer:
    """Integer weight, its grid and the int32 bias of one layer.

    Attributes:
        q: Integer weights (int64 array, shape of the FP weight).
        qparams: The weight grid.
        bias_q: int32 bias, or None.
        bias_scale: float32 per-channel scale of the int32 bias.
        stats: What the rounding method measured (flip fraction, losses).
    """

    q: np.ndarray
    qparams: QParams
    bias_q: np.ndarray | None = None
    bias_scale: np.ndarray | None = None
    stats: dict[str, float] = field(default_factory=dict)

    def dequantized_weight(self) -> np.ndarray:
        """float32 weight exactly as DequantizeLinear produces it."""
        return dequantize_np(self.q, self.qparams)

    def dequantized_bias(self) -> np.ndarray | None:
        """float32 bias exactly as DequantizeLinear produces it."""
        if self.bias_q is None or self.bias_scale is None:
            return None
        return (self.bias_q.astype(np.float32) * self.bias_scale).astype(np.float32)


def make_bias(bias: np.ndarray | None, act_qp: QParams, weight_qp: QParams,
              channels: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """int32 bias and its float32 scale (input scale x weight scale)."""
    if bias is None:
        return None, None
    ws = np.broadcast_to(np.asarray(weight_qp.scale, np.float32), (channels,))
    scale = bias_scale(np.asarray(act_qp.scale, np.float32), ws)
    return quantize_bias(bias, scale), scale


@dataclass(frozen=True)
class QuantizedConstant:
    """A constant operand of an integer op, quantized per tensor (see QuantPlan.constants)."""

    q: np.ndarray
    qparams: QParams

    @classmethod
    def of(cls, values: np.ndarray, qparams: QParams) -> QuantizedConstant:
        """Round `values` to nearest on `qparams`' grid."""
        return cls(quantize_np(values, qparams), qparams)

    def dequantized(self) -> np.ndarray:
        """float32 values exactly as DequantizeLinear produces them."""
        return dequantize_np(self.q, self.qparams)


@dataclass
class QuantResult:
    """A fully quantized network on top of its FP graph.

    Attributes:
        plan: Where the quantizers are.
        act_qparams: Every quantized activation tensor -> its parameters (shared
            tensors carry their point's parameters).
        layers: Layer node name -> its quantized weight.
        constants: Constant operand -> its integers and grid.
    """

    plan: QuantPlan
    act_qparams: dict[str, QParams]
    layers: dict[str, QuantizedLayer]
    constants: dict[str, QuantizedConstant] = field(default_factory=dict)

    def weight_overrides(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Initializer overrides (dequantized weights and biases) for TorchGraph."""
        out: dict[str, torch.Tensor] = {}
        for layer in self.plan.layers:
            ql = self.layers.get(layer.node)
            if ql is None:
                continue
            out[layer.weight] = torch.from_numpy(ql.dequantized_weight()).to(device)
            bias = ql.dequantized_bias()
            if layer.bias is not None and bias is not None:
                out[layer.bias] = torch.from_numpy(bias).to(device)
        for name, const in self.constants.items():
            out[name] = torch.from_numpy(const.dequantized()).to(device)
        return out


def quantized_constants(model: onnx.ModelProto, plan: QuantPlan,
                        scheme: Scheme) -> dict[str, QuantizedConstant]:
    """The plan's constant operands, rounded to nearest on their per-tensor grids."""
    inits = {i.name: i for i in model.graph.initializer}
    return {name: QuantizedConstant.of(onnx.numpy_helper.to_array(inits[name]).astype(np.float32), qp)
            for name, qp in constant_qparams(model, plan, scheme).items()}


def simulate(model: onnx.ModelProto, result: QuantResult, images: np.ndarray,
             batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """Logits of the quantized network computed by the PyTorch simulation."""
    graph = TorchGraph(model, device)
    weights = result.weight_overrides(device)
    outs = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i : i + batch_size]).to(device)
            y = graph.run({graph.inputs[0]: x}, weights=weights, act_quant=result.act_qparams)
            outs.append(y[graph.outputs[0]].cpu().numpy())
    return np.concatenate(outs)
