"""Quantization arithmetic with onnxruntime's exact semantics.

QuantizeLinear computes ``saturate(round_half_even(x / scale) + zero_point)`` and
DequantizeLinear ``(q - zero_point) * scale``, both in float32. Everything here
divides (never multiplies by 1/scale) and rounds half to even, so a simulation
built from these functions matches the deployed QDQ model. Gradients pass
through the rounding unchanged (straight-through) and stop outside the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient in the backward pass."""
    return _RoundSTE.apply(x)


@dataclass(frozen=True, eq=False)
class QParams:
    """Scale and zero point of one quantized tensor.

    Attributes:
        scale: float32 array, shape () for per-tensor or (C,) for per-channel.
        zero_point: int64 array with the shape of `scale`.
        qmin: Smallest integer of the grid.
        qmax: Largest integer of the grid.
        axis: Channel axis of the tensor for per-channel parameters, else None.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    axis: int | None = None

    @property
    def signed(self) -> bool:
        """Whether the grid holds negative integers."""
        return self.qmin < 0

    @property
    def bits(self) -> int:
        """Bit-width of the storage type."""
        return int(np.ceil(np.log2(self.qmax - self.qmin + 1)))

    def broadcast(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point reshaped to broadcast over a tensor of rank `ndim`."""
        if self.axis is None or self.scale.ndim == 0:
            return self.scale, self.zero_point
        shape = [1] * ndim
        shape[self.axis] = -1
        return self.scale.reshape(shape), self.zero_point.reshape(shape)

    def torch(self, ndim: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (float32) and zero point (float32) as broadcastable torch tensors."""
        s, z = self.broadcast(ndim)
        return (
            torch.as_tensor(np.asarray(s, dtype=np.float32), device=device),
            torch.as_tensor(np.asarray(z, dtype=np.float32), device=device),
        )

    def to_json(self) -> dict[str, object]:
        """JSON-ready form (scales as exact float32 values)."""
        return {
            "scale": np.asarray(self.scale, dtype=np.float32).tolist(),
            "zero_point": np.asarray(self.zero_point).tolist(),
            "qmin": self.qmin,
            "qmax": self.qmax,
            "axis": self.axis,
        }


_MIN_SCALE = np.float64(1e-8)


def qparams_from_range(
    lo: np.ndarray | float,
    hi: np.ndarray | float,
    qmin: int,
    qmax: int,
    symmetric: bool,
    symmetric_range: str = "restricted",
    axis: int | None = None,
) -> QParams:
    """Scale and zero point for a value range, per tensor or per channel.

    The range always includes 0 so that zero is exactly representable. Scales are
    computed in float64 and stored as float32 (as onnxruntime's tools do); the
    zero point is derived from the stored float32 scale.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        scale = 2.0 * amax / (qmax - qmin) if symmetric_range == "full" else amax / qmax
        scale32 = np.maximum(scale, _MIN_SCALE).astype(np.float32)
        zp = np.zeros(scale32.shape, dtype=np.int64)
    else:
        scale = (hi - lo) / (qmax - qmin)
        scale32 = np.maximum(scale, _MIN_SCALE).astype(np.float32)
        zp = qmin - np.rint(lo / scale32.astype(np.float64))
        zp = np.clip(zp, qmin, qmax).astype(np.int64)
    return QParams(scale=scale32, zero_point=zp, qmin=qmin, qmax=qmax, axis=axis)


def quantize_np(x: np.ndarray, qp: QParams) -> np.ndarray:
    """Integers of `x` on the grid (float32 division, round half to even, saturate)."""
    s, z = qp.broadcast(x.ndim)
    q = np.rint(np.asarray(x, dtype=np.float32) / np.asarray(s, dtype=np.float32))
    return np.clip(q + z, qp.qmin, qp.qmax).astype(np.int64)


def dequantize_np(q: np.ndarray, qp: QParams) -> np.ndarray:
    """Float32 values of integers `q` (as DequantizeLinear computes them)."""
    s, z = qp.broadcast(q.ndim)
    return (q.astype(np.float32) - np.asarray(z, dtype=np.float32)) * np.asarray(s, np.float32)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
             qmin: int, qmax: int) -> torch.Tensor:
    """Integer values (as float32) of `x`, with a straight-through gradient."""
    return torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Float values of integers `q`."""
    return (q - zero_point) * scale


class _FakeQuantSTE(torch.autograd.Function):
    """`fake_quant_composed` in one pass: the same values and the same gradient, computed
    with fewer temporaries (learned rounding runs it on every layer output, every step)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor,  # type: ignore[override]
                zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        q = torch.round(x / scale).add_(zero_point)
        inside = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(inside, scale)
        return q.clamp_(qmin, qmax).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        inside, scale = ctx.saved_tensors
        # The composition's chain rule in its own order (x scale, clamp's mask, / scale), so
        # the gradient is bit-identical to `fake_quant_composed`'s.
        return torch.where(inside, grad * scale / scale, 0.0), None, None, None, None


def fake_quant_composed(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        qmin: int, qmax: int) -> torch.Tensor:
    """QuantizeLinear followed by DequantizeLinear as composed torch ops (the reference;
    differentiable in the scale and zero point too)."""
    return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               qmin: int, qmax: int) -> torch.Tensor:
    """QuantizeLinear followed by DequantizeLinear, differentiable (STE).

    One fused pass unless the scale or zero point is being learned (then the composition,
    which also differentiates them); both give the same values and input gradients.
    """
    if scale.requires_grad or zero_point.requires_grad:
        return fake_quant_composed(x, scale, zero_point, qmin, qmax)
    return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax)


def fake_quant_qp(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """`fake_quant` with parameters from a QParams, broadcast over `x`."""
    s, z = qp.torch(x.dim(), x.device)
    return fake_quant(x, s, z, qp.qmin, qp.qmax)


def bias_scale(act_scale: np.ndarray, weight_scale: np.ndarray) -> np.ndarray:
    """float32 scale of an int32 bias: input scale times weight scale, in float32."""
    return (np.float32(act_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)


def quantize_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int32 bias integers: round half to even of bias / scale, saturated to int32."""
    q = np.rint(np.asarray(bias, dtype=np.float64) / np.asarray(scale, dtype=np.float64))
    info = np.iinfo(np.int32)
    return np.clip(q, info.min, info.max).astype(np.int32)


def fake_quant_bias(bias: torch.Tensor, act_scale: np.ndarray, weight_scale: np.ndarray) -> torch.Tensor:
    """The int32 bias of `quantize_bias`, dequantized, with a straight-through gradient.

    The same integers and float32 values as `quantize_bias` and DequantizeLinear (for
    |q| < 2^24, where float32 holds the integer exactly).
    """
    scale = torch.from_numpy(bias_scale(np.asarray(act_scale), np.asarray(weight_scale))).to(bias.device)
    info = np.iinfo(np.int32)
    q = round_ste(bias.double() / scale.double()).clamp(int(info.min), int(info.max))
    return q.float() * scale
