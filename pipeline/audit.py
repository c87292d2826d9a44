"""Audit a QDQ model that someone else quantized, against its FP source (`efrap audit`).

Rounding-only attacks exist: QuRA (Chen et al., "Rounding-Guided Backdoor Injection in
Deep Learning Model Quantization", NDSS 2026) leaves the FP model clean and writes a
backdoor into the integers alone, moving a few percent of the weights one step away
from nearest rounding. Legitimate learned rounding does the same kind of thing:
AdaRound (Nagel et al., ICML 2020) and EFRAP (Li et al., CVPR 2024) move several
percent of the weights one step, and LAC (Li et al., ICML 2024) further. So leaving
nearest is no evidence by itself. The audit gathers three kinds of facts:

1. Rounding, per layer: the share of integer weights of Q that are not nearest
   rounding of the FP weight on Q's own grid, how far they are (max and mean steps),
   how many are further than one step from the FP weight (neither floor nor ceiling),
   and how many sit within float noise of a rounding tie (another tool may round those
   either way).
2. Grids, per layer: whether Q's scale and zero point are what a standard observer
   gives for the FP weight: this pipeline's min-max and MSE observers for the common
   schemes (symmetric or asymmetric, per channel or per tensor, 4 or 8 bits, full or
   restricted symmetric ranges, reduced range), and onnxruntime's quantize_static grids
   computed by onnxruntime's own functions. A layer whose grid matches none is reported.
3. A scan of Q against FP (`pipeline.scan.scan_model(FP, options, defended=Q)`): the FP
   model's recovered trigger measured on Q, and a fresh differential trigger search
   where Q is the quantized side.

The verdict comes from the evidence that matters, the scan's differential evidence: a
trigger that works on Q and not on FP, with a large differential attack success.
Rounding and grid statistics, and what the scan says about the FP model alone, are
reported as context and warnings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx
from onnxruntime.quantization import quant_utils as ort_quant

from pipeline.base import checks
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import load_model
from pipeline.base.provenance import versions
from pipeline.base.safe_io import file_sha256
from pipeline.base.scheme import Scheme, TensorQuant
from pipeline.base.trigger import PatternTrigger
from pipeline.graph import analyze
from pipeline.observers import WEIGHT_MSE_STEPS, observe_weight
from pipeline.prepare import prepare_model
from pipeline.qmath import QParams, quantize_np

#: Relative difference under which two scales are the same grid (float32 noise of tools
#: that compute in float64 or float32, or fold BatchNorm in another order).
SCALE_RTOL = 1e-5
#: Distance (in steps) from a rounding tie under which another tool may round either way.
TIE_EPS = 1e-4
#: The verdicts, from the audit's point of view of Q.
VERDICTS = ("rounding-backdoor", "qcb", "inconclusive", "clean")

_CONTAINER_RANGES = {
    onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT4: (-8, 7), onnx.TensorProto.UINT4: (0, 15),
    onnx.TensorProto.INT16: (-32768, 32767), onnx.TensorProto.UINT16: (0, 65535),
}
_ORT_TYPES = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8,
              "int4": onnx.TensorProto.INT4, "uint4": onnx.TensorProto.UINT4}


# ---------------------------------------------------------------------------- Q's weights


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


# ---------------------------------------------------------------------------- grids


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


def _channel_match(stored: StoredWeight, qp: QParams) -> np.ndarray:
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
        ok = _channel_match(stored, cand.compute())
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


# ---------------------------------------------------------------------------- rounding


@dataclass(frozen=True)
class LayerRounding:
    """Q's integers of one layer against nearest rounding of the FP weight on Q's grid.

    Attributes:
        layer: The FP layer's node.
        weight: The FP weight initializer.
        stored: Q's integer initializer.
        weights: Number of weights.
        off_nearest: Integers that are not nearest rounding of the FP weight.
        near_tie: Of those, how many sit within TIE_EPS steps of a rounding tie.
        beyond_one_step: Integers neither the floor nor the ceiling of the FP weight on
            the grid (after clipping): no up/down rounding choice writes them.
        max_steps: Largest |q - nearest|.
        mean_steps: Mean |q - nearest| over the off-nearest integers (0 when none).
        grid: How the grid compares with the standard ones.
    """

    layer: str
    weight: str
    stored: str
    weights: int
    off_nearest: int
    near_tie: int
    beyond_one_step: int
    max_steps: int
    mean_steps: float
    grid: GridCheck

    @property
    def off_nearest_fraction(self) -> float:
        """Share of the layer's integers off nearest."""
        return self.off_nearest / self.weights if self.weights else 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {**asdict(self), "off_nearest_fraction": self.off_nearest_fraction}


def rounding_stats(layer: str, weight_name: str, w: np.ndarray, stored: StoredWeight,
                   channel_axis: int, claimed: TensorQuant | None = None) -> LayerRounding:
    """Rounding statistics and the grid check of one layer (`claimed`: the scheme's grid rule)."""
    w = np.asarray(w, np.float32)
    if w.shape != stored.q.shape:
        raise EfrapError(f"layer {layer}: the FP weight has shape {w.shape}, Q's integers {stored.q.shape}")
    grid = check_grid(w, stored, channel_axis)
    if claimed is not None:
        ok = claimed.per_channel == stored.per_channel and bool(
            _channel_match(stored, observe_weight(w, claimed, channel_axis)).all())
        grid = replace(grid, scheme_match=ok)
    axis = stored.axis % w.ndim if stored.per_channel else None
    qp = QParams(scale=stored.scale, zero_point=stored.zero_point, qmin=grid.qmin, qmax=grid.qmax, axis=axis)
    nearest = quantize_np(w, qp)
    s, z = qp.broadcast(w.ndim)
    ratio = w / np.asarray(s, np.float32)  # the same float32 quotient as QuantizeLinear
    floor = np.floor(ratio)
    down = np.clip(floor + z, grid.qmin, grid.qmax)
    up = np.clip(floor + 1 + z, grid.qmin, grid.qmax)
    steps = np.abs(stored.q - nearest)
    off = steps > 0
    tie = np.abs(ratio - floor - 0.5) < TIE_EPS
    beyond = (stored.q != down) & (stored.q != up)
    return LayerRounding(
        layer=layer, weight=weight_name, stored=stored.name, weights=int(w.size),
        off_nearest=int(off.sum()), near_tie=int((off & tie).sum()), beyond_one_step=int(beyond.sum()),
        max_steps=int(steps.max(initial=0)), mean_steps=float(steps[off].mean()) if off.any() else 0.0,
        grid=grid)


@dataclass(frozen=True)
class RoundingAudit:
    """Rounding and grid facts of every layer, and the layers that could not be paired.

    Attributes:
        layers: One entry per FP layer found in Q.
        float_in_q: FP layers with no integer weight in Q (kept in float, or not found).
        extra_in_q: Integer weights of Q that match no FP layer.
    """

    layers: tuple[LayerRounding, ...]
    float_in_q: tuple[str, ...] = ()
    extra_in_q: tuple[str, ...] = ()

    @property
    def weights(self) -> int:
        """Integer weights compared."""
        return sum(r.weights for r in self.layers)

    @property
    def off_nearest(self) -> int:
        """Integers off nearest in all layers."""
        return sum(r.off_nearest for r in self.layers)

    @property
    def off_nearest_fraction(self) -> float:
        """Share of all compared integers off nearest."""
        return self.off_nearest / self.weights if self.weights else 0.0

    @property
    def non_standard(self) -> tuple[str, ...]:
        """Layers whose grid no standard observer produces."""
        return tuple(r.layer for r in self.layers if not r.grid.standard)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "layers": [r.to_json() for r in self.layers], "float_in_q": list(self.float_in_q),
            "extra_in_q": list(self.extra_in_q), "weights": self.weights, "off_nearest": self.off_nearest,
            "off_nearest_fraction": self.off_nearest_fraction,
            "beyond_one_step": sum(r.beyond_one_step for r in self.layers),
            "max_steps": max((r.max_steps for r in self.layers), default=0),
            "non_standard_grids": list(self.non_standard),
        }


def audit_rounding(fp: onnx.ModelProto, q: onnx.ModelProto, fp_source: str = "FP model",
                   q_source: str = "quantized model", scheme: Scheme | None = None) -> RoundingAudit:
    """Pair Q's integer weights with the FP layers and measure each layer.

    The FP model is prepared as `efrap quantize` prepares it (BatchNorm folded), since
    a deployment rounds the folded weight. Pairs are found by the `<weight>_quantized`
    name that this pipeline and onnxruntime's quantize_static write, else by the
    consuming node's name, else in graph order among weights of the same shape. With
    `scheme`, each grid is also compared with the one the scheme gives the layer.
    """
    prepared = prepare_model(fp, fp_source)
    plan = analyze(prepared, fp_source)
    inits = {i.name: i for i in prepared.graph.initializer}
    stored = stored_weights(prepare_model(q, q_source), q_source)
    by_name = {s.name: s for s in stored}
    by_node = {s.node: s for s in stored}
    used: set[str] = set()
    pairs: dict[str, StoredWeight] = {}
    for layer in plan.layers:
        hit = by_name.get(f"{layer.weight}_quantized") or by_node.get(layer.node)
        if hit is not None and hit.name not in used and tuple(inits[layer.weight].dims) == hit.q.shape:
            pairs[layer.node] = hit
            used.add(hit.name)
    rest = [s for s in stored if s.name not in used]
    for layer in plan.layers:
        if layer.node in pairs:
            continue
        hit = next((s for s in rest if s.q.shape == tuple(inits[layer.weight].dims)), None)
        if hit is not None:
            pairs[layer.node] = hit
            rest.remove(hit)
    results = []
    for layer in plan.layers:
        if layer.node in pairs:
            w = np.asarray(onnx.numpy_helper.to_array(inits[layer.weight]), np.float32)
            claimed = scheme.weight_quant(layer.edge, layer.node) if scheme is not None else None
            results.append(rounding_stats(layer.node, layer.weight, w, pairs[layer.node], layer.weight_axis,
                                          claimed))
    if not results:
        raise EfrapError(f"{q_source}: no integer weight of it matches a layer of {fp_source}; is it a QDQ "
                         "model of that FP model?")
    return RoundingAudit(layers=tuple(results),
                         float_in_q=tuple(layer.node for layer in plan.layers if layer.node not in pairs),
                         extra_in_q=tuple(s.name for s in rest))


# ---------------------------------------------------------------------------- scan evidence


class ScanReportLike(Protocol):
    """What the audit reads of a `pipeline.scan.ScanReport`: its JSON form (`evidence_from_scan`)."""

    def to_json(self) -> dict: ...


@runtime_checkable
class TriggerSource(Protocol):
    """A scan report that also hands over its triggers' arrays (`pipeline.scan.ScanReport.triggers`):
    "recovered" (the FP model's) and "fresh" (the search against Q), those it has."""

    def triggers(self) -> dict[str, PatternTrigger]: ...


#: scan_model(FP path, options, defended=Q path) -> report.
ScanFunction = Callable[..., ScanReportLike]


@dataclass(frozen=True)
class ScanEvidence:
    """The scan's facts the verdict rests on.

    Attributes:
        scan_verdict: The scan's verdict on the FP model ("qcb", "fp-backdoor", "clean",
            "inconclusive").
        confidence: The scan's confidence in it.
        target: The class of the FP model's recovered trigger (None when none).
        asr_fp: The recovered trigger's attack success on the FP model.
        asr_nearest: On nearest rounding of the FP model.
        asr_quantized: On Q.
        fresh_found: Whether the fresh differential search with Q as the quantized side
            found a class with an anomalously small trigger (the scan's outlier test);
            None when the scan has no such search.
        fresh_target: That class.
        fresh_asr: Its strongest trigger's attack success on Q.
        fresh_asr_fp: On the FP model.
        fresh_asr_nearest: On nearest rounding.
        complete: Whether every search of the scan (the fresh search against Q included) ran
            to its end and its figures were measured within the budget; False also when the
            report does not say (fail closed).
        incomplete: Why not, when not complete (the scan's own account of what ran).
    """

    scan_verdict: str
    confidence: float | None
    target: int | None
    asr_fp: float | None
    asr_nearest: float | None
    asr_quantized: float | None
    fresh_found: bool | None
    fresh_target: int | None = None
    fresh_asr: float | None = None
    fresh_asr_fp: float | None = None
    fresh_asr_nearest: float | None = None
    complete: bool = False
    incomplete: str = ""


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _get(data: object, path: str) -> Any:
    """The value at a dotted `path` of nested dicts, or None."""
    cur: Any = data
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def evidence_from_scan(report: ScanReportLike) -> ScanEvidence:
    """The verdict's facts from a scan report run with `defended=Q` (read from its JSON form).

    The recovered trigger is the FP model's own (its differential search against nearest
    rounding, or Neural Cleanse's when the scan calls FP backdoored). The fresh search is
    the differential search with Q as the quantized side; it is read from its own outlier
    test (`defended.differential_test`), not from the defended part's verdict, which
    says "fp-backdoor" whenever the FP test flags a class, whatever Q does.
    """
    data = report.to_json()
    defended = data.get("defended") or {}
    recovered = _get(defended, "recovered_trigger.asr") or {}
    strongest = _get(defended, "strongest_trigger.figures.asr") or {}
    test = defended.get("differential_test")
    flagged = _get(test, "flagged")
    # Complete only when the report says so on both parts: a missing key is not a finished scan.
    complete = data.get("cut_short") is False and data.get("verdict") != "inconclusive" \
        and defended.get("verdict") != "inconclusive"
    incomplete = ""
    if not complete:
        reasons = [r for r in (data.get("reason") if data.get("verdict") == "inconclusive" else None,
                               defended.get("reason") if defended.get("verdict") == "inconclusive" else None)
                   if isinstance(r, str)]
        incomplete = "; ".join(reasons) or "the scan report does not say that every search ran to its end"
    return ScanEvidence(
        scan_verdict=str(data.get("verdict")),
        confidence=_number(data.get("confidence")),
        target=_int(data.get("target")) if data.get("target") is not None
        else _int(_get(data, "trigger.summary.target")),
        asr_fp=_number(recovered.get("fp")),
        asr_nearest=_number(recovered.get("nearest")),
        asr_quantized=_number(recovered.get("defended")),
        fresh_found=flagged if isinstance(flagged, bool) else None,
        fresh_target=_int(_get(test, "candidate")),
        fresh_asr=_number(strongest.get("defended")),
        fresh_asr_fp=_number(strongest.get("fp")),
        fresh_asr_nearest=_number(strongest.get("nearest")),
        complete=complete, incomplete=incomplete,
    )


@dataclass(frozen=True)
class AuditThresholds:
    """When a trigger counts as working on Q (fractions in (0, 1]).

    Attributes:
        min_asr: Attack success on Q at which a trigger works.
        min_differential: Attack success on Q minus on FP at which the difference is the
            quantizer's doing.
    """

    min_asr: float = 0.5
    min_differential: float = 0.4

    def __post_init__(self) -> None:
        checks.finite(self.min_asr, "min_asr", low=0.0, low_open=True, high=1.0)
        checks.finite(self.min_differential, "min_differential", low=0.0, low_open=True, high=1.0)


@dataclass(frozen=True)
class Verdict:
    """The audit's verdict on Q and why.

    Attributes:
        verdict: "rounding-backdoor" (a trigger works on Q, not on FP and not on nearest
            rounding: Q's own rounding planted it), "qcb" (it works on Q and on nearest
            rounding, not on FP: the FP source is a quantization-conditioned backdoor and
            Q's rounding does not defuse it), "inconclusive" (the scan did not finish within
            its budget, or measured nothing on Q; the audit fails closed) or "clean" (no
            trigger works on Q beyond FP).
        reasons: One line per fact that decided it.
    """

    verdict: str
    reasons: tuple[str, ...]

    @property
    def flagged(self) -> bool:
        """Whether Q must not ship (every verdict but "clean")."""
        return self.verdict != "clean"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _works(on_q: float | None, on_fp: float | None, t: AuditThresholds) -> bool:
    """Whether a trigger works on Q and not (as much) on FP."""
    return on_q is not None and on_q >= t.min_asr and on_q - (on_fp or 0.0) >= t.min_differential


#: Scan verdicts on the FP model under which its recovered trigger is evidence.
FLAGGED_SCAN_VERDICTS = ("qcb", "fp-backdoor")


def decide(evidence: ScanEvidence, thresholds: AuditThresholds) -> Verdict:
    """The verdict from the scan's differential evidence (rounding statistics never decide it).

    A scan that did not finish (a search cut short or never started, figures not measured)
    gives "inconclusive", whatever its partial evidence says. Otherwise
    Q is flagged when a trigger works on Q and not on FP: the FP model's recovered trigger
    when the scan flagged the FP model, or the strongest trigger of a class the fresh
    search against Q flags (a flagged class without figures counts: fail closed). Both
    rest on the scan's outlier test: when the scan calls the FP model clean, its
    "recovered trigger" is only the smallest of the unremarkable ones (at w4a8 a large
    pattern that moves the nearest model of the clean stored model 88% of the time and
    its FP model 36%), and it says nothing about Q. What the scan says about the FP
    model alone (a backdoor active in FP) is the same for every Q and is context here,
    for the gate.
    """
    t, ev = thresholds, evidence
    if not ev.complete:
        # A search that did not run found nothing: neither a flag nor "clean" rests on it.
        return Verdict("inconclusive", (f"the scan did not finish: {ev.incomplete}",
                                        "nothing clears Q until every search ran (run it with a larger "
                                        "budget or none)"))
    reasons: list[str] = []
    on_nearest: list[float | None] = []
    nearest = False
    if ev.scan_verdict in FLAGGED_SCAN_VERDICTS and _works(ev.asr_quantized, ev.asr_fp, t):
        reasons.append(f"the FP model's recovered trigger (class {ev.target}) succeeds on Q at "
                       f"{_pct(ev.asr_quantized)}, on FP at {_pct(ev.asr_fp)}")
        on_nearest.append(ev.asr_nearest)
        nearest |= _works(ev.asr_nearest, ev.asr_fp, t)
    if ev.fresh_found and (ev.fresh_asr is None or _works(ev.fresh_asr, ev.fresh_asr_fp, t)):
        reasons.append(f"the fresh search against Q flags class {ev.fresh_target}: its trigger succeeds on "
                       f"Q at {_pct(ev.fresh_asr)}, on FP at {_pct(ev.fresh_asr_fp)}")
        on_nearest.append(ev.fresh_asr_nearest)
        nearest |= _works(ev.fresh_asr_nearest, ev.fresh_asr_fp, t)
    if reasons:
        figures = ", ".join(_pct(v) for v in on_nearest)
        if nearest:
            reasons.append(f"nearest rounding of the FP model wakes it too ({figures}): the FP model is a "
                           "quantization-conditioned backdoor that Q's rounding does not defuse")
            return Verdict("qcb", tuple(reasons))
        reasons.append(f"nearest rounding of the FP model does not ({figures}): Q's own rounding put "
                       "it there")
        return Verdict("rounding-backdoor", tuple(reasons))
    if ev.asr_quantized is None and ev.fresh_found is None:
        return Verdict("inconclusive", ("the scan measured no trigger on Q and ran no search against it: "
                                        "nothing clears Q",))
    fresh = ("flags none" if not ev.fresh_found else
             f"flags class {ev.fresh_target}, whose trigger succeeds on Q at {_pct(ev.fresh_asr)} and on FP "
             f"at {_pct(ev.fresh_asr_fp)}: below the thresholds")
    return Verdict("clean", (f"no trigger works on Q beyond FP: the recovered trigger succeeds on Q at "
                             f"{_pct(ev.asr_quantized)} and on FP at {_pct(ev.asr_fp)}; the fresh search "
                             f"against Q {fresh}",))


@dataclass(frozen=True, eq=False)
class FlaggingTrigger:
    """A trigger that flags Q, with its arrays (what a repair can be guided by).

    Attributes:
        source: "recovered" (the FP model's recovered trigger) or "fresh" (the strongest
            trigger of the fresh search against Q).
        trigger: The trigger (mask, pattern, target).
        asr_quantized: Its attack success on Q (held-out images, onnxruntime).
        asr_fp: On the FP model.
    """

    source: str
    trigger: PatternTrigger
    asr_quantized: float
    asr_fp: float | None

    def to_json(self) -> dict[str, object]:
        """JSON-ready summary (no arrays)."""
        mask = self.trigger.mask
        return {"source": self.source, "target": self.trigger.target, "blend": round(self.trigger.blend, 5),
                "mask_mean": None if mask is None else round(float(mask.mean()), 5),
                "asr_quantized": round(self.asr_quantized, 4),
                "asr_fp": None if self.asr_fp is None else round(self.asr_fp, 4)}


def flagging_triggers(report: ScanReportLike, evidence: ScanEvidence,
                      thresholds: AuditThresholds) -> tuple[FlaggingTrigger, ...]:
    """The triggers `decide` flags Q with, in its order (the FP model's recovered one, then the
    fresh search's), each only when its figures on Q and FP were measured and it works on Q
    and not on FP; none when the scan did not finish or its report holds no arrays (a
    stand-in with only `to_json`)."""
    if not evidence.complete or not isinstance(report, TriggerSource):
        return ()
    arrays = report.triggers()
    ev, out = evidence, []
    recovered = arrays.get("recovered")
    if recovered is not None and ev.scan_verdict in FLAGGED_SCAN_VERDICTS \
            and ev.asr_quantized is not None and _works(ev.asr_quantized, ev.asr_fp, thresholds):
        out.append(FlaggingTrigger("recovered", recovered, ev.asr_quantized, ev.asr_fp))
    fresh = arrays.get("fresh")
    if fresh is not None and ev.fresh_found and ev.fresh_asr is not None \
            and _works(ev.fresh_asr, ev.fresh_asr_fp, thresholds):
        out.append(FlaggingTrigger("fresh", fresh, ev.fresh_asr, ev.fresh_asr_fp))
    return tuple(out)


def scan_warnings(evidence: ScanEvidence) -> tuple[str, ...]:
    """What the scan says about the FP model itself (the same for every Q)."""
    if evidence.scan_verdict in ("fp-backdoor", "qcb"):
        return (f"the scan calls the FP source itself {evidence.scan_verdict} (class {evidence.target}, "
                f"confidence {_pct(evidence.confidence)}): that is about the FP model, not Q's rounding; "
                "see efrap scan / efrap gate",)
    return ()


# ---------------------------------------------------------------------------- the audit


@dataclass(frozen=True)
class AuditReport:
    """Everything the audit found.

    Attributes:
        fp: FP model path.
        fp_sha256: Its sha256.
        quantized: Q's path.
        quantized_sha256: Its sha256.
        rounding: Per-layer rounding and grid facts.
        evidence: The scan's facts.
        verdict: The verdict and why.
        warnings: Context that did not decide the verdict (non-standard grids, integers
            beyond one step, layers that could not be paired).
        scan: The scan report's own JSON.
        thresholds: The thresholds used.
        triggers: The triggers that flag Q, with their arrays (`flagging_triggers`; not in
            the JSON, whose scan part summarises them).
    """

    fp: str
    fp_sha256: str
    quantized: str
    quantized_sha256: str
    rounding: RoundingAudit
    evidence: ScanEvidence
    verdict: Verdict
    warnings: tuple[str, ...]
    scan: dict
    thresholds: AuditThresholds
    versions: dict[str, str] = field(default_factory=versions)
    triggers: tuple[FlaggingTrigger, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (the `efrap audit --json` file)."""
        return {
            "fp": {"path": self.fp, "sha256": self.fp_sha256},
            "quantized": {"path": self.quantized, "sha256": self.quantized_sha256},
            "verdict": self.verdict.verdict, "flagged": self.verdict.flagged,
            "reasons": list(self.verdict.reasons), "warnings": list(self.warnings),
            "evidence": asdict(self.evidence), "thresholds": asdict(self.thresholds),
            "rounding": self.rounding.to_json(), "scan": self.scan, "versions": self.versions,
        }


def rounding_warnings(rounding: RoundingAudit) -> tuple[str, ...]:
    """Context lines: grids no standard observer gives, integers beyond one step, unpaired layers."""
    out = []
    off_scheme = [r.layer for r in rounding.layers if r.grid.scheme_match is False]
    if off_scheme:
        out.append(f"Q's grids are not the claimed scheme's on {len(off_scheme)} layer(s) "
                   f"({', '.join(off_scheme)}): the scan's nearest model uses the claimed scheme; give Q's "
                   "own with --scheme")
    for r in rounding.layers:
        if not r.grid.standard:
            out.append(f"layer {r.layer}: its grid matches no standard observer (closest: {r.grid.closest}, "
                       f"{100 * r.grid.channels_matched:.0f}% of channels)")
        if r.beyond_one_step:
            out.append(f"layer {r.layer}: {r.beyond_one_step} integers are more than one step from the FP "
                       "weight (no up/down rounding writes them)")
    if rounding.float_in_q:
        out.append(f"layers without integer weights in Q: {', '.join(rounding.float_in_q)}")
    if rounding.extra_in_q:
        out.append(f"integer weights of Q matching no FP layer: {', '.join(rounding.extra_in_q)}")
    return tuple(out)


def audit_models(fp_path: str, q_path: str, scan: ScanFunction, scan_options: object,
                 thresholds: AuditThresholds | None = None) -> AuditReport:
    """Audit Q (a QDQ model someone else quantized) against its FP source.

    Args:
        fp_path: The FP ONNX model.
        q_path: The QDQ ONNX model to audit.
        scan: `pipeline.scan.scan_model` (or a stand-in with its signature).
        scan_options: The scan's options (its data, budget, opt level, provider).
        thresholds: When a trigger counts as active.

    Raises:
        EfrapError: unreadable models, or a Q whose integer weights match no FP layer.
    """
    thresholds = thresholds or AuditThresholds()
    fp, q = load_model(fp_path), load_model(q_path)
    scheme = getattr(scan_options, "scheme", None)
    rounding = audit_rounding(fp, q, fp_path, q_path, scheme if isinstance(scheme, Scheme) else None)
    report = scan(fp_path, scan_options, defended=q_path)
    evidence = evidence_from_scan(report)
    return AuditReport(fp=str(fp_path), fp_sha256=file_sha256(fp_path), quantized=str(q_path),
                       quantized_sha256=file_sha256(q_path), rounding=rounding, evidence=evidence,
                       verdict=decide(evidence, thresholds),
                       warnings=rounding_warnings(rounding) + scan_warnings(evidence),
                       scan=report.to_json(), thresholds=thresholds,
                       triggers=flagging_triggers(report, evidence, thresholds))
