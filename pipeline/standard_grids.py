"""Matching a stored weight grid against the standard ones (min-max, MSE, onnxruntime's).

A grid is a layer's scale and zero point. The standard grids are what a standard observer
gives for the FP weight: this pipeline's min-max and MSE observers for the common schemes
(symmetric or asymmetric, per channel or per tensor, 4 or 8 bits, full or restricted
symmetric ranges, reduced range), and onnxruntime's quantize_static grids computed by
onnxruntime's own functions. A layer whose grid matches none is reported by the audit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import onnx
from onnxruntime.quantization import quant_utils as ort_quant

from pipeline.base.scheme import TensorQuant
from pipeline.observers import WEIGHT_MSE_STEPS, observe_weight
from pipeline.qdq_weights import StoredWeight
from pipeline.qmath import QParams

#: Relative difference under which two scales are the same grid (float32 noise of tools
#: that compute in float64 or float32, or fold BatchNorm in another order).
SCALE_RTOL = 1e-5
_ORT_TYPES = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8,
              "int4": onnx.TensorProto.INT4, "uint4": onnx.TensorProto.UINT4}


@dataclass(frozen=True, eq=False)
class GridCandidate:
    """A grid a standard observer gives for a weight, computed only when asked for.

    Attributes:
        name: What produces it ("efrap mse 4-bit asymmetric per-channel", ...).
        qmin: Its lowest integer.
        qmax: Its highest integer.
        zero_point: Its zero point when fixed by the scheme (symmetric grids), else None.
        compute: Returns the grid's QParams.
        scale_bounds: (low, high) per-channel scales the grid can have, when known before
            computing it (the MSE search shrinks the min-max range by 1 down to 0.21).
    """

    name: str
    qmin: int
    qmax: int
    zero_point: int | None
    compute: Callable[[], QParams]
    scale_bounds: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None


def _mse_bounds(w: np.ndarray, tq: TensorQuant, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Scales the MSE search can pick: its factors 1 ... 0.21 times the min-max grid's scale."""
    scale = observe_weight(w, replace(tq, observer="minmax"), axis).scale
    return (1.0 - 0.01 * (WEIGHT_MSE_STEPS - 1)) * scale, scale


def _efrap_candidates(w: np.ndarray, axis: int, per_channel: bool) -> list[GridCandidate]:
    out = []
    for bits in (8, 4):
        for observer in ("minmax", "mse"):
            for symmetric, rng in ((False, "restricted"), (True, "restricted"), (True, "full")):
                for reduce in (False, True) if bits == 8 else (False,):
                    tq = TensorQuant(bits=bits, symmetric=symmetric, per_channel=per_channel,
                                     observer=observer, symmetric_range=rng, reduce_range=reduce)
                    kind = f"symmetric {rng}" if symmetric else "asymmetric"
                    name = (f"efrap {observer} {bits}-bit {kind} "
                            f"{'per-channel' if per_channel else 'per-tensor'}{' reduce-range' * reduce}")
                    bounds = partial(_mse_bounds, w, tq, axis) if observer == "mse" else None
                    out.append(GridCandidate(name, tq.qmin, tq.qmax, 0 if symmetric else None,
                                             partial(observe_weight, w, tq, axis), bounds))
    return out


def _ort_grid(flat: np.ndarray, lo: np.ndarray, hi: np.ndarray, symmetric: bool, axis: int | None) -> QParams:
    zps, scales = [], []
    for row in flat:
        zp, scale = ort_quant.compute_scale_zp(row.min(), row.max(), lo, hi, symmetric)
        zps.append(int(zp))
        scales.append(np.float32(scale))
    shape = (len(scales),) if axis is not None else ()
    return QParams(scale=np.asarray(scales, np.float32).reshape(shape),
                   zero_point=np.asarray(zps, np.int64).reshape(shape), qmin=int(lo), qmax=int(hi), axis=axis)


def _ort_candidates(w: np.ndarray, axis: int, per_channel: bool) -> list[GridCandidate]:
    """onnxruntime quantize_static's weight grids (min-max), from onnxruntime's own functions."""
    flat = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if per_channel else w.reshape(1, -1)
    out = []
    for type_name, qtype in _ORT_TYPES.items():
        for symmetric in (True, False):
            for reduce in (False, True):
                lo, hi = ort_quant.get_qmin_qmax_for_qType(qtype, reduce_range=reduce, symmetric=symmetric)
                qmin, qmax = int(lo), int(hi)
                kind = "symmetric" if symmetric else "asymmetric"
                name = (f"onnxruntime quantize_static {type_name} {kind} "
                        f"{'per-channel' if per_channel else 'per-tensor'}{' reduce-range' * reduce}")
                # Symmetric: onnxruntime's zero point is round((qmin + qmax) / 2) (0, or 128 for uint8).
                zp = int(np.round((qmin + qmax) / 2.0)) if symmetric else None
                out.append(GridCandidate(name, qmin, qmax, zp, partial(
                    _ort_grid, flat, lo, hi, symmetric, axis if per_channel else None)))
    return out


def standard_grids(w: np.ndarray, axis: int, per_channel: bool) -> list[GridCandidate]:
    """Every standard grid of a weight whose output channels lie on `axis` (not yet computed)."""
    w = np.asarray(w, np.float32)
    return _efrap_candidates(w, axis, per_channel) + _ort_candidates(w, axis, per_channel)


@dataclass(frozen=True)
class GridCheck:
    """How Q's grid of one layer compares with the standard ones.

    Attributes:
        standard: Whether some standard grid reproduces every channel's scale and zero point.
        matches: The standard grids that do.
        closest: The candidate matching the most channels.
        channels_matched: Share of channels the closest candidate reproduces.
        qmin: Lowest integer of the grid the rounding is measured on.
        qmax: Highest integer.
        range_from: "grid" (the matching grid's range) or "inferred" (from the stored type
            and values: a 4-bit range when every integer fits one).
        scheme_match: Whether the grid is the one the claimed scheme gives this layer
            (None when no scheme was given).
    """

    standard: bool
    matches: tuple[str, ...]
    closest: str
    channels_matched: float
    qmin: int
    qmax: int
    range_from: str
    scheme_match: bool | None = None


def channel_match(stored: StoredWeight, qp: QParams) -> np.ndarray:
    """Per channel, whether `qp` reproduces the stored scale (within SCALE_RTOL) and zero point."""
    s = np.asarray(qp.scale, np.float64).reshape(-1)
    z = np.asarray(qp.zero_point, np.int64).reshape(-1)
    ss = stored.scale.astype(np.float64).reshape(-1)
    zz = stored.zero_point.reshape(-1)
    if s.size != ss.size:
        return np.zeros(ss.size, bool)
    return (np.abs(ss - s) <= SCALE_RTOL * np.abs(s)) & (zz == z)


def _inferred_range(stored: StoredWeight) -> tuple[int, int]:
    lo = int(min(stored.q.min(), stored.zero_point.min()))
    hi = int(max(stored.q.max(), stored.zero_point.max()))
    for rng in ((-8, 7), (0, 15)):
        if stored.container[0] <= rng[0] and rng[1] <= stored.container[1] and rng[0] <= lo and hi <= rng[1]:
            return rng
    return stored.container


def check_grid(w: np.ndarray, stored: StoredWeight, channel_axis: int) -> GridCheck:
    """Compare Q's grid of a weight with every standard grid of the FP weight."""
    lo, hi = int(stored.q.min()), int(stored.q.max())
    best, best_share, matches, rng = "", -1.0, [], None
    for cand in standard_grids(w, channel_axis, stored.per_channel):
        if lo < cand.qmin or hi > cand.qmax:
            continue  # Q holds integers this grid never writes
        if cand.zero_point is not None and (stored.zero_point != cand.zero_point).all():
            continue  # a symmetric grid's zero point is fixed
        if cand.scale_bounds is not None:
            low, high = (np.asarray(b, np.float64).reshape(-1) for b in cand.scale_bounds())
            inside = (stored.scale >= low * (1 - SCALE_RTOL)) & (stored.scale <= high * (1 + SCALE_RTOL))
            if low.size != stored.scale.size or not inside.any():
                continue  # no channel's scale is one this search can pick
        ok = channel_match(stored, cand.compute())
        share = float(ok.mean()) if ok.size else 0.0
        if share > best_share:
            best, best_share = cand.name, share
        if ok.size and ok.all():
            matches.append(cand.name)
            if rng is None:
                rng = (cand.qmin, cand.qmax)
    qmin, qmax = rng if rng is not None else _inferred_range(stored)
    return GridCheck(standard=bool(matches), matches=tuple(matches), closest=best or "none",
                     channels_matched=max(best_share, 0.0), qmin=qmin, qmax=qmax,
                     range_from="grid" if rng is not None else "inferred")
