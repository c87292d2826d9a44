"""Trigger-guided repair: prune the input units a flagging trigger drives apart from FP.

A quantization-conditioned backdoor is a difference between the FP model and its deployed
form that a trigger opens: on clean images the two compute nearly the same thing, on
triggered images a few units of some layer's input differ by far more than quantization
noise (the `pruneaware` zoo model's 8 carriers: a gap 0.125 of their size on clean images,
9.84 on triggered ones). When the self-check's audit flags a candidate with a trigger it
recovered itself (mask, pattern, target: `pipeline.audit.FlaggingTrigger`), this module
measures, at the input of every quantized Conv/Gemm/MatMul of the candidate's QDQ model,
each unit's (a conv's input channel, a Gemm's or MatMul's input feature) FP-vs-deployed
gap on the triggered images divided by its gap on the same images clean, picks the units
whose ratio is an outlier of their layer (`outlier_units`, the rule of docs/DEFENSE.md
"The self-check"), and sets every integer weight that reads them to its grid's zero
point, as rare-unit pruning does (`pipeline/rare_units.py`).

Both models run in onnxruntime, the deployed QDQ graph as written (the check's
optimization level, `faithful` by default), with the tensors every layer reads as extra
outputs: the FP side is the prepared FP model (BatchNorm folded, the graph the candidate
was written from, so node names pair), and each layer's input is what the same-named node
reads in each model. Sums run in float64 in a fixed order: the same inputs and thread
count give the same bytes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.audit import FlaggingTrigger
from pipeline.base import checks
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import load_model
from pipeline.base.preprocess import PreparedImages
from pipeline.base.runtime import make_session
from pipeline.prepare import prepare_model
from pipeline.qdq_weights import StoredWeight, stored_weights
from pipeline.rare_units import unit_axis
from pipeline.scan.images import batch_for

#: The modified z-score's constant (Iglewicz and Hoaglin): 0.6745 * (x - median) / MAD is a
#: standard normal's z for normal data.
MAD_Z = 0.6745


@dataclass(frozen=True)
class RepairSettings:
    """The repair's rule (docs/DEFENSE.md, "The self-check"), checked when built.

    Attributes:
        images: Held-out images measured: the first this many of the check's held-out
            images, clean and stamped with each flagging trigger.
        min_ratio: Smallest ratio (gap on triggered images over gap on clean ones) at which
            a unit can be pruned.
        z_threshold: A unit is an outlier when the modified z-score of its log ratio
            over its layer's units is above this.
        max_share: Most units of one layer pruned, as a share of its units (the largest
            ratios first).
        min_units: Layers reading fewer units are not judged (no outlier test on a handful).
        floor: Share of the layer's mean clean gap added to both gaps of every unit (a unit
            both models leave at the same value on every image has ratio 1).
    """

    images: int = 256
    min_ratio: float = 4.0
    z_threshold: float = 3.5
    max_share: float = 0.25
    min_units: int = 8
    floor: float = 0.01

    def __post_init__(self) -> None:
        checks.integer(self.images, "repair images", low=1)
        checks.finite(self.min_ratio, "repair minimum ratio", low=1.0)
        checks.finite(self.z_threshold, "repair z-score threshold", low=0.0)
        checks.finite(self.max_share, "repair share of a layer's units", low=0.0, high=1.0, low_open=True)
        checks.integer(self.min_units, "repair minimum units per layer", low=3)
        checks.finite(self.floor, "repair gap floor", low=0.0, low_open=True, high=1.0)


@dataclass(frozen=True)
class Tap:
    """One quantized layer of the deployed model and the tensors its node reads.

    Attributes:
        node: The Conv/Gemm/MatMul node (the same name in both models).
        weight: Its stored integer weight.
        fp_tensor: What the node reads in the FP model.
        q_tensor: What it reads in the deployed model.
        axis: The axis of that input holding its units.
    """

    node: str
    weight: StoredWeight
    fp_tensor: str
    q_tensor: str
    axis: int


@dataclass(frozen=True)
class LayerGaps:
    """Per unit of one layer's input, the mean |deployed - FP| over images and positions.

    Attributes:
        node: The layer's node.
        clean: [units] on the clean images.
        triggered: [units] on the triggered images.
    """

    node: str
    clean: np.ndarray
    triggered: np.ndarray

    def ratios(self, floor: float) -> np.ndarray:
        """[units] (triggered + f) / (clean + f), f = `floor` times the layer's mean clean gap."""
        f = floor * float(self.clean.mean()) if self.clean.size else 0.0
        f = f if f > 0.0 else float(np.finfo(np.float64).tiny)
        return (self.triggered + f) / (self.clean + f)


@dataclass(frozen=True)
class LayerPrune:
    """The units pruned at one layer's input.

    Attributes:
        node: The layer's node.
        units: Total units of its input.
        pruned: The pruned units, ascending.
        ratios: Their ratios, in the same order.
        median_ratio: The median ratio over the layer's units.
        zeroed: Integer weights set to the zero point that were not there already.
    """

    node: str
    units: int
    pruned: tuple[int, ...]
    ratios: tuple[float, ...]
    median_ratio: float
    zeroed: int

    def to_json(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"node": self.node, "units": self.units, "pruned": list(self.pruned),
                "ratios": [round(r, 3) for r in self.ratios], "median_ratio": round(self.median_ratio, 4),
                "zeroed_weights": self.zeroed}


@dataclass(frozen=True)
class RepairRecord:
    """What one repair measured and pruned (the repaired model's `efrap.repair` metadata).

    Attributes:
        triggers: The flagging triggers it was guided by (summaries, no arrays).
        images: Clean held-out images measured (each also stamped with every trigger).
        judged: Layers whose units were judged.
        layers: The layers where units were pruned.
        notes: Layers not judged and why.
        settings: The rule's settings.
        seconds: Wall time of the measurement and the pruning.
    """

    triggers: tuple[dict, ...]
    images: int
    judged: int
    layers: tuple[LayerPrune, ...]
    notes: tuple[str, ...]
    settings: RepairSettings
    seconds: float = 0.0

    @property
    def pruned_units(self) -> int:
        """Units pruned over every layer."""
        return sum(len(layer.pruned) for layer in self.layers)

    def to_json(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"triggers": list(self.triggers), "images": self.images, "judged_layers": self.judged,
                "pruned_units": self.pruned_units, "layers": [layer.to_json() for layer in self.layers],
                "notes": list(self.notes), "settings": asdict(self.settings),
                "seconds": round(self.seconds, 1)}


def _consumers(model: onnx.ModelProto, name: str) -> int:
    return sum(1 for n in model.graph.node for i in n.input if i == name)


def taps(fp: onnx.ModelProto, q: onnx.ModelProto) -> tuple[list[Tap], list[str]]:
    """The quantized layers of `q` paired with the prepared FP model's nodes, and notes on those
    left out (a layout without units, no FP node of that name, a shared integer weight)."""
    fp_nodes = {n.name: n for n in fp.graph.node if n.name}
    q_nodes = {n.name: n for n in q.graph.node if n.name}
    out, notes = [], []
    for weight in stored_weights(q, "candidate"):
        node = q_nodes[weight.node]
        axis = unit_axis(node)
        partner = fp_nodes.get(weight.node)
        if axis is None:
            notes.append(f"{weight.node}: its input has no unit axis the repair reads (transA)")
        elif partner is None or partner.op_type != node.op_type:
            notes.append(f"{weight.node}: no {node.op_type} of that name in the FP model")
        elif _consumers(q, weight.name) != 1:
            notes.append(f"{weight.node}: its integer weight is shared")
        else:
            out.append(Tap(weight.node, weight, partner.input[0], node.input[0], axis))
    return out, notes


class _Reader:
    """An onnxruntime session returning the named tensors (a graph input is the feed itself)."""

    def __init__(self, model: onnx.ModelProto, names: list[str], opt_level: str, provider: str) -> None:
        inputs = {i.name for i in model.graph.input}
        outputs = {o.name for o in model.graph.output}
        extended = onnx.ModelProto()
        extended.CopyFrom(model)
        for name in dict.fromkeys(names):
            if name not in inputs and name not in outputs:
                extended.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                                None))
        self.session = make_session(extended, opt_level, provider)
        self.names = list(dict.fromkeys(n for n in names if n not in inputs))
        self.inputs = inputs

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        values = self.session.session.run(self.names, {self.session.input_name: x})
        out = dict(zip(self.names, values, strict=True))
        out.update({name: x for name in self.inputs})
        return out


def _sums(fp: dict[str, np.ndarray], q: dict[str, np.ndarray], tap: Tap) -> tuple[np.ndarray, int]:
    a, b = q[tap.q_tensor], fp[tap.fp_tensor]
    if a.shape != b.shape:
        raise EfrapError(f"{tap.node}: the deployed input is {a.shape}, the FP input {b.shape}")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    diff = np.moveaxis(diff, tap.axis, 0).reshape(diff.shape[tap.axis], -1)
    return diff.sum(axis=1), diff.shape[1]


def measure_gaps(fp: onnx.ModelProto, q: onnx.ModelProto, found: list[Tap], clean: Iterable[np.ndarray],
                 triggered: Iterable[np.ndarray], opt_level: str = "faithful",
                 provider: str = "auto") -> list[LayerGaps]:
    """Each tap's per-unit mean |deployed - FP| on the clean and on the triggered batches.

    Args:
        fp: The prepared FP model.
        q: The deployed QDQ model.
        found: Its layers (`taps`).
        clean: Model-ready clean batches.
        triggered: Model-ready triggered batches.
        opt_level: onnxruntime optimization level of both sessions.
        provider: onnxruntime provider.
    """
    fp_reader = _Reader(fp, [t.fp_tensor for t in found], opt_level, provider)
    q_reader = _Reader(q, [t.q_tensor for t in found], opt_level, provider)

    def mean_gap(batches: Iterable[np.ndarray]) -> list[np.ndarray]:
        sums: list[np.ndarray | None] = [None] * len(found)
        counts = [0] * len(found)
        for x in batches:
            a, b = fp_reader.run(x), q_reader.run(x)
            for i, tap in enumerate(found):
                s, n = _sums(a, b, tap)
                sums[i] = s if sums[i] is None else sums[i] + s
                counts[i] += n
        if any(s is None for s in sums):
            raise EfrapError("the repair measured no image")
        return [s / max(1, n) for s, n in zip(sums, counts, strict=True)]  # type: ignore[operator]

    on_clean, on_triggered = mean_gap(clean), mean_gap(triggered)
    return [LayerGaps(t.node, c, g) for t, c, g in zip(found, on_clean, on_triggered, strict=True)]


def outlier_units(ratios: np.ndarray, settings: RepairSettings) -> np.ndarray:
    """The units of one layer the rule prunes (ascending indices).

    With l the log ratios of the layer's units, MAD = median(|l - median(l)|) and z =
    0.6745 (l - median(l)) / MAD (a unit above the median is infinitely far when MAD is
    0), a unit qualifies when its ratio is at least `min_ratio` and z is above
    `z_threshold`; of those, at most floor(`max_share` x units), the largest ratios first
    (ties: the lower index). A layer of fewer than `min_units` units is not judged.
    """
    n = len(ratios)
    if n < settings.min_units:
        return np.zeros(0, np.int64)
    logs = np.log(ratios)
    med = float(np.median(logs))
    mad = float(np.median(np.abs(logs - med)))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = MAD_Z * (logs - med) / mad if mad > 0 else np.where(logs > med, np.inf, 0.0)
    chosen = np.flatnonzero((ratios >= settings.min_ratio) & (z > settings.z_threshold))
    cap = math.floor(settings.max_share * n)
    order = sorted(chosen.tolist(), key=lambda j: (-float(ratios[j]), j))[:cap]
    return np.asarray(sorted(order), np.int64)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == name), default)


def reading_mask(node: onnx.NodeProto, shape: tuple[int, ...], units: np.ndarray) -> np.ndarray:
    """Bool mask (the weight's shape) of the weights of `node` that read input `units`.

    Conv [O, C/g, k...]: unit j is in-channel j mod C/g of group j div C/g, read by that
    group's output channels; Gemm: column j of B (transB) or row j; MatMul [..., I, O]: row j.
    """
    mask = np.zeros(shape, bool)
    if node.op_type == "Conv":
        per_group = shape[1]
        groups = _attr(node, "group", 1)
        out_per_group = shape[0] // groups
        for j in units.tolist():
            g = j // per_group
            mask[g * out_per_group:(g + 1) * out_per_group, j % per_group] = True
    elif node.op_type == "Gemm" and _attr(node, "transB", 0):
        mask[:, units] = True
    elif node.op_type in ("Gemm", "MatMul"):
        mask[..., units, :] = True
    else:
        raise EfrapError(f"{node.name}: the repair prunes Conv, Gemm and MatMul inputs, not {node.op_type}")
    return mask


def prune_units(q: onnx.ModelProto, chosen: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of `q` whose integer weights reading the chosen units of each node are its grid's
    zero point (so they dequantize to 0), and per node how many integers changed.

    Args:
        q: The deployed QDQ model.
        chosen: Node name -> input units to prune.
    """
    out = onnx.ModelProto()
    out.CopyFrom(q)
    nodes = {n.name: n for n in out.graph.node if n.name}
    weights = {w.node: w for w in stored_weights(out, "candidate")}
    index = {init.name: i for i, init in enumerate(out.graph.initializer)}
    zeroed = {}
    for name, units in chosen.items():
        if len(units) == 0:
            continue
        w = weights[name]
        mask = reading_mask(nodes[name], w.q.shape, units)
        zp = w.zero_point
        if w.per_channel:
            shape = [1] * w.q.ndim
            shape[w.axis] = zp.size
            zp = zp.reshape(shape)
        new = np.where(mask, np.broadcast_to(zp, w.q.shape), w.q)
        zeroed[name] = int((new != w.q).sum())
        i = index[w.name]
        stored = numpy_helper.to_array(out.graph.initializer[i])
        out.graph.initializer[i].CopyFrom(numpy_helper.from_array(new.astype(stored.dtype), w.name))
    return out, zeroed


@dataclass(frozen=True)
class Decision:
    """The rule's choice over every judged layer.

    Attributes:
        chosen: Node -> pruned units (every judged layer, empty where none).
        ratios: Node -> its units' ratios.
        judged: Layers with at least `min_units` units.
    """

    chosen: dict[str, np.ndarray]
    ratios: dict[str, np.ndarray] = field(default_factory=dict)
    judged: int = 0


def choose_units(gaps: list[LayerGaps], settings: RepairSettings) -> Decision:
    """`outlier_units` on every layer's ratios."""
    ratios = {g.node: g.ratios(settings.floor) for g in gaps}
    chosen = {node: outlier_units(r, settings) for node, r in ratios.items()}
    return Decision(chosen, ratios, sum(1 for r in ratios.values() if len(r) >= settings.min_units))


def _stamped(images: PreparedImages, count: int, triggers: tuple[FlaggingTrigger, ...] | None
             ) -> Iterator[np.ndarray]:
    """Model-ready batches of the first `count` images, clean (None) or stamped with each trigger."""
    step = batch_for(tuple(images.shape[1:]))
    for t in (None,) if triggers is None else tuple(f.trigger for f in triggers):
        for start in range(0, count, step):
            raw = images.dataset.take(images.index[start:min(count, start + step)])
            yield images.pre.apply(raw if t is None else t.apply(raw))


def repair_model(fp_path: str, q_path: str, triggers: tuple[FlaggingTrigger, ...], images: object,
                 settings: RepairSettings, opt_level: str = "faithful", provider: str = "auto"
                 ) -> tuple[onnx.ModelProto, RepairRecord]:
    """Measure the gaps on clean and triggered held-out images, prune the outlier units.

    Args:
        fp_path: The FP model.
        q_path: The flagged candidate (a QDQ model of it).
        triggers: The triggers its audit flagged it with.
        images: Held-out images as a data set's (`PreparedImages`: the triggers are stamped on
            its images in [0, 1] before preprocessing).
        settings: The rule.
        opt_level: onnxruntime optimization level.
        provider: onnxruntime provider.

    Returns:
        The repaired model (a copy; the candidate's metadata kept) and what was done.

    Raises:
        EfrapError: no trigger, model-ready arrays instead of a data set, unreadable models.
    """
    if not triggers:
        raise EfrapError("the repair needs a trigger that flags the candidate")
    if not isinstance(images, PreparedImages):
        raise EfrapError("the repair stamps triggers on images in [0, 1] before preprocessing; give a "
                         "data set, not model-ready arrays")
    t0 = time.perf_counter()
    fp = prepare_model(load_model(fp_path), fp_path)
    q = load_model(q_path)
    found, notes = taps(fp, q)
    count = min(settings.images, len(images))
    gaps = measure_gaps(fp, q, found, _stamped(images, count, None), _stamped(images, count, triggers),
                        opt_level, provider)
    decision = choose_units(gaps, settings)
    repaired, zeroed = prune_units(q, decision.chosen)
    layers = tuple(LayerPrune(node, len(decision.ratios[node]), tuple(int(j) for j in units),
                              tuple(float(decision.ratios[node][j]) for j in units),
                              float(np.median(decision.ratios[node])), zeroed.get(node, 0))
                   for node, units in decision.chosen.items() if len(units))
    notes += [f"{g.node}: {len(g.clean)} units, fewer than {settings.min_units}: not judged"
              for g in gaps if len(g.clean) < settings.min_units]
    record = RepairRecord(tuple(t.to_json() for t in triggers), count, decision.judged, layers, tuple(notes),
                          settings, time.perf_counter() - t0)
    return repaired, record
