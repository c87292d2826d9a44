"""Observers: choose the range (hence scale and zero point) of a tensor.

Weight observers see the whole weight; activation observers see statistics
collected during calibration (exact min/max and a fixed-size random sample of
values). Each observer is a function in a registry, so adding one is adding one
function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.base.errors import EfrapError
from pipeline.base.scheme import TensorQuant
from pipeline.qmath import QParams, dequantize_np, qparams_from_range, quantize_np

# The release's MSE search: shrink the range by (1 - 0.01 k), k < 80 for weights, < 95 for
# activations, and keep the factor with the lowest squared error.
WEIGHT_MSE_STEPS = 80
ACTIVATION_MSE_STEPS = 95


@dataclass
class ActivationStats:
    """What calibration keeps about one activation tensor.

    Attributes:
        min: Smallest value seen.
        max: Largest value seen.
        sample: A uniform random sample of the values seen (float32, 1-D).
    """

    min: float
    max: float
    sample: np.ndarray


def _grid(tq: TensorQuant, lo: np.ndarray, hi: np.ndarray, axis: int | None) -> QParams:
    return qparams_from_range(lo, hi, tq.qmin, tq.qmax, tq.symmetric, tq.symmetric_range, axis)


def _channel_view(w: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def _weight_minmax(w: np.ndarray, tq: TensorQuant, axis: int) -> QParams:
    if tq.per_channel:
        flat = _channel_view(w, axis)
        return _grid(tq, flat.min(axis=1), flat.max(axis=1), axis)
    return _grid(tq, np.array(w.min()), np.array(w.max()), None)


def _weight_mse(w: np.ndarray, tq: TensorQuant, axis: int) -> QParams:
    flat = _channel_view(w, axis) if tq.per_channel else w.reshape(1, -1)
    lo0, hi0 = flat.min(axis=1), flat.max(axis=1)
    best_err = np.full(flat.shape[0], np.inf)
    best_lo, best_hi = lo0.copy(), hi0.copy()
    for k in range(WEIGHT_MSE_STEPS):
        factor = 1.0 - 0.01 * k
        lo, hi = lo0 * factor, hi0 * factor
        qp = _grid(tq, lo, hi, 0)
        err = ((dequantize_np(quantize_np(flat, qp), qp) - flat) ** 2).mean(axis=1)
        better = err < best_err
        best_err[better], best_lo[better], best_hi[better] = err[better], lo[better], hi[better]
    if tq.per_channel:
        return _grid(tq, best_lo, best_hi, axis)
    return _grid(tq, best_lo[0], best_hi[0], None)


WEIGHT_OBSERVERS: dict[str, Callable[[np.ndarray, TensorQuant, int], QParams]] = {
    "minmax": _weight_minmax,
    "mse": _weight_mse,
}


def observe_weight(w: np.ndarray, tq: TensorQuant, axis: int = 0) -> QParams:
    """QParams for a weight tensor whose output channels lie on `axis`."""
    if tq.observer not in WEIGHT_OBSERVERS:
        raise EfrapError(f"unknown weight observer '{tq.observer}'")
    return WEIGHT_OBSERVERS[tq.observer](np.asarray(w, dtype=np.float32), tq, axis)


def _act_minmax(stats: ActivationStats, tq: TensorQuant) -> QParams:
    return _grid(tq, np.array(stats.min), np.array(stats.max), None)


def _act_percentile(stats: ActivationStats, tq: TensorQuant) -> QParams:
    if stats.sample.size == 0:
        return _act_minmax(stats, tq)
    lo, hi = np.percentile(stats.sample.astype(np.float64), [100.0 - tq.percentile, tq.percentile])
    return _grid(tq, np.array(max(lo, stats.min)), np.array(min(hi, stats.max)), None)


def _act_mse(stats: ActivationStats, tq: TensorQuant) -> QParams:
    sample = stats.sample.astype(np.float32)
    if sample.size == 0:
        return _act_minmax(stats, tq)
    best, best_err = None, np.inf
    for k in range(ACTIVATION_MSE_STEPS):
        factor = 1.0 - 0.01 * k
        qp = _grid(tq, np.array(stats.min * factor), np.array(stats.max * factor), None)
        err = float(((dequantize_np(quantize_np(sample, qp), qp) - sample) ** 2).mean())
        if err < best_err:
            best, best_err = qp, err
    assert best is not None
    return best


ACTIVATION_OBSERVERS: dict[str, Callable[[ActivationStats, TensorQuant], QParams]] = {
    "minmax": _act_minmax,
    "percentile": _act_percentile,
    "mse": _act_mse,
}


def observe_activation(stats: ActivationStats, tq: TensorQuant) -> QParams:
    """Per-tensor QParams for an activation from its calibration statistics."""
    if tq.observer not in ACTIVATION_OBSERVERS:
        raise EfrapError(f"unknown activation observer '{tq.observer}'")
    return ACTIVATION_OBSERVERS[tq.observer](stats, tq)
