"""Q's integers against nearest rounding of the FP weight on Q's own grid, per layer.

Legitimate learned rounding (AdaRound, EFRAP, LAC) moves several percent of the weights
one step off nearest, and so do rounding-only attacks (QuRA): these statistics are the
audit's context, never its verdict (`pipeline.audit`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import onnx

from pipeline.base.errors import EfrapError
from pipeline.base.scheme import Scheme, TensorQuant
from pipeline.graph import analyze
from pipeline.observers import observe_weight
from pipeline.prepare import prepare_model
from pipeline.qdq_weights import StoredWeight, stored_weights
from pipeline.qmath import QParams, quantize_np
from pipeline.standard_grids import GridCheck, channel_match, check_grid

#: Distance (in steps) from a rounding tie under which another tool may round either way.
TIE_EPS = 1e-4


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
            channel_match(stored, observe_weight(w, claimed, channel_axis)).all())
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
