"""Orchestration: FP ONNX -> calibration -> rounding -> QDQ ONNX.

`quantize_file` is the whole `efrap quantize` job; `quantize_model` is the same on
in-memory objects for library use. The orchestrator knows no method's internals: a
method declares what it needs (`RoundingMethod.needs`: cached data, BN factors, what
its loss reads) and returns notes about what it did, which go into the metadata.

Every random choice derives from the one seed in `QuantizeOptions`
(`pipeline.base.seeds.derive`): which calibration images, which activation values
the observers sample, and each layer's batches during learned rounding.

A run that reads data keeps a per-layer checkpoint beside its output
(`pipeline.checkpoint`); a killed run resumes from its last finished layer and writes
the same bytes as one that was never interrupted.

A method that needs "search" (QVec) has one setting chosen on the whole quantized model
(`pipeline.rounding.search`): calibration runs once, every layer is rounded at each
candidate value, each candidate's QDQ model is measured on clean held-out images in
onnxruntime, and the method's rule keeps one; the orchestrator never learns what the
setting means.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch

from converters.qdq import WEIGHT_STORAGES, to_qdq
from pipeline.base import checks
from pipeline.base import data as data_mod
from pipeline.base.deployment import Deployment, DeploymentViews
from pipeline.base.device import DEVICES
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import fixed_batch, image_input, load_model, model_files, save_model, set_metadata
from pipeline.base.preprocess import (
    PreparedImages,
    Preprocess,
    announce_warnings,
    ready,
    resolve,
    resolve_with_warnings,
)
from pipeline.base.progress import Progress, RunClock, format_seconds, log, warn_once
from pipeline.base.provenance import versions
from pipeline.base.runtime import pick_provider
from pipeline.base.safe_io import check_outputs
from pipeline.base.seeds import derive
from pipeline.base.threads import session_threads
from pipeline.bn_fold import pre_bn_error_scale, read_bn_factors
from pipeline.calibration import (
    NoHoldout,
    activation_qparams,
    calibrate,
    holdout_indices,
    image_indices,
    sample_seed,
    search_indices,
)
from pipeline.checkpoint import (
    LayerRecord,
    LayerStore,
    array_sha256,
    check_folder,
    checkpoint_folder,
    code_sha256,
    file_sha256,
    remove_folder,
    rng_state,
    set_rng_state,
)
from pipeline.graph import QuantLayer, QuantPlan, analyze
from pipeline.observers import observe_weight
from pipeline.prepare import check_finite, prepare_model
from pipeline.qmath import QParams
from pipeline.quantized import QuantizedConstant, QuantizedLayer, QuantResult, make_bias, quantized_constants
from pipeline.rare_units import prune_rare_inputs
from pipeline.reconstruct import Head, build_problem
from pipeline.rounding import RoundingMethod, RoundingSettings, get_method, run_needs
from pipeline.rounding.base import LayerProblem, RoundingResult
from pipeline.rounding.search import SearchRecord, SearchTrial, clean_figure, searched
from pipeline.sampler import OrtSampler
from pipeline.torch_backend import pick_device
from validators.guard import GuardLimits, GuardReport, check_defense, unmeasured


@dataclass(frozen=True)
class QuantizeOptions(DeploymentViews):
    """Settings of one quantization run, checked when built.

    Attributes:
        deployment: The settings every step shares (scheme, data, calibration images, seed,
            provider, preprocessing), checked there; it must name a scheme.
        method: Rounding method name (nearest, adaround, efrap, ...).
        weight_storage: "int8" containers or packed "int4".
        rounding: The method's settings, of its own settings class (None: its defaults).
        device: "auto" (CUDA when torch sees a GPU), "cpu" or "cuda".
        exclude: Node names or op types to keep in float (onnxruntime's nodes_to_exclude).
    """

    deployment: Deployment
    method: str = "nearest"
    weight_storage: str = "int8"
    rounding: RoundingSettings | None = None
    device: str = "auto"
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.deployment, Deployment):
            raise EfrapError(f"deployment must be a Deployment, got {self.deployment!r}")
        self.deployment.quantized()
        get_method(self.method)
        needs = run_needs(self.method, self.config)
        if "search" in needs and "data" in needs:
            raise EfrapError(f"method '{self.method}' searches its setting by rounding every layer again "
                             "for each candidate, without data: rare-unit pruning is not combined with it")
        checks.string(self.weight_storage, "weight storage", WEIGHT_STORAGES)
        checks.string(self.device, "device", DEVICES)

    @property
    def config(self) -> RoundingSettings:
        """The rounding settings in force: the given ones or the method's defaults."""
        return self.rounding or get_method(self.method).defaults


@dataclass(frozen=True)
class LayerSummary:
    """What happened to one layer.

    Attributes:
        layer: Its Conv/Gemm/MatMul node.
        op: The op type.
        bits: Bit-width of its weight grid.
        seconds: Time spent rounding it.
        stats: What the method measured (flip fraction, losses).
        notes: Facts about how the method treated it (EFRAP: error units).
    """

    layer: str
    op: str
    bits: int
    seconds: float
    stats: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def flip_fraction(self) -> float:
        """Share of integers that differ from nearest rounding."""
        return self.stats.get("flip_fraction", 0.0)


@dataclass(frozen=True)
class QuantizeSummary:
    """A run's settings, per-layer results and timings (reports and metadata).

    Attributes:
        threads: torch's intra-op threads during the run (float sums depend on it).
        session_threads: onnxruntime sessions' threads (0: onnxruntime's default).
        resumed: Layers restored from a checkpoint (their seconds are those they took
            when they ran; `rounding_seconds` counts them too).
        search: What a searched method's setting search measured and kept (None: the
            method has no search); `layers` are then the kept candidate's and
            `rounding_seconds` counts every candidate with its measurement.
        unpacked_four_bit: Weights on grids of 4 bits or fewer written one to a byte
            (int8 weight storage); 0 with int4 storage, which packs two to a byte.
    """

    options: QuantizeOptions
    num_calib: int
    preprocess: Preprocess
    device: str
    layers: tuple[LayerSummary, ...]
    calibration_seconds: float
    rounding_seconds: float
    threads: int = 0
    session_threads: int = 0
    resumed: int = 0
    search: SearchRecord | None = None
    unpacked_four_bit: int = 0

    @property
    def learned(self) -> bool:
        """Whether the rounding read data: a learned method, or rare-unit pruning."""
        return "data" in run_needs(self.options.method, self.options.config)

    def to_json(self) -> dict:
        """JSON-ready dict (the `--summary` file)."""
        o = self.options
        return {
            "method": o.method, "scheme": o.scheme.to_json(), "seed": o.seed,
            "num_calib": self.num_calib, "calib": o.calib, "weight_storage": o.weight_storage,
            "rounding": asdict(o.config) if self.learned else {}, "device": self.device,
            "preprocessing": self.preprocess.to_json(), "exclude": list(o.exclude),
            "layers": [{"layer": s.layer, "op": s.op, "bits": s.bits, "seconds": round(s.seconds, 3),
                        **s.stats, **s.notes} for s in self.layers],
            "calibration_seconds": round(self.calibration_seconds, 3),
            "rounding_seconds": round(self.rounding_seconds, 3),
            "threads": {"torch": self.threads, "onnxruntime": self.session_threads},
            "resumed_layers": self.resumed,
            **({"search": self.search.to_json()} if self.search is not None else {}),
            "versions": versions(),
        }

    def metadata(self) -> dict[str, object]:
        """The output model's efrap.* metadata entries."""
        o = self.options
        out: dict[str, object] = {
            "efrap.method": o.method,
            "efrap.scheme": o.scheme.to_json(),
            "efrap.seed": str(o.seed),
            "efrap.calibration": {"data": o.calib, "images": self.num_calib},
            "efrap.preprocessing": self.preprocess.to_json(),
            "efrap.weight_storage": o.weight_storage,
            "efrap.rounding": asdict(o.config) if self.learned else {},
            "efrap.flip_fraction": {s.layer: round(s.flip_fraction, 6) for s in self.layers},
            **({"efrap.search": self.search.metadata()} if self.search is not None else {}),
            "efrap.versions": versions(),
        }
        for key in sorted({k for s in self.layers for k in s.notes}):
            out[f"efrap.{key}"] = {s.layer: s.notes[key] for s in self.layers if key in s.notes}
        return out


Inputs = np.ndarray | PreparedImages


def _data_images(model: onnx.ModelProto, spec: str, choose: Callable[[int], np.ndarray], source: str,
                 preprocess: dict | None, announce: bool = True
                 ) -> tuple[Inputs, np.ndarray | None, Preprocess]:
    """Model-ready inputs of data set `spec` at the indices `choose(total)`, with their labels
    (None: model-ready arrays, or images without labels)."""
    image = image_input(model, source)
    ready_arrays = data_mod.model_inputs(spec, image.name)
    if ready_arrays is not None:
        if ready_arrays.ndim != 4 or any(want is not None and want != got for want, got in
                                         zip(image.shape[1:], ready_arrays.shape[1:], strict=True)):
            raise EfrapError(f"{spec}: array '{image.name}' has shape {ready_arrays.shape[1:]}, the "
                             f"model's input {image.shape[1:]}")
        pre = ready(resolve(model, image, preprocess, source, announce=False))
        return ready_arrays[choose(len(ready_arrays))], None, pre
    pre, warnings = resolve_with_warnings(model, image, preprocess, source)
    # The resize is known first: an image folder of mixed sizes is resized as it is read.
    dataset = data_mod.load_images(spec, "train", pre.resize)
    data_mod.check_fits(dataset, pre.nchw_shape(image), source)
    if announce:
        # The preprocessing's warnings once the data are read: a mistake in them is one line alone.
        announce_warnings(warnings, source)
    idx = choose(len(dataset))
    labels = dataset.labels[idx] if isinstance(dataset, data_mod.Dataset) else None
    return PreparedImages(dataset, idx, pre), labels, pre


def calibration_images(model: onnx.ModelProto, spec: str, n: int, seed: int, source: str = "model",
                       preprocess: dict | None = None) -> tuple[np.ndarray | PreparedImages, Preprocess]:
    """`n` model-ready calibration inputs from data set `spec`, chosen with the run's seed.

    An npz keyed by the model's input name is taken as it is (modelopt's convention);
    any other data set's training split is preprocessed as the model expects. No labels
    are needed. Where the data hold fewer than `n` images, all of them are used, with
    one warning saying how many.

    Returns:
        The inputs and the preprocessing they went through (origin "data" for ready arrays).
    """
    checks.integer(n, "number of calibration images", low=1)

    def choose(total: int) -> np.ndarray:
        if total < n:
            warn_once(f"{source}: {n:,} calibration images asked for, {spec} has {total:,}: "
                      f"calibrating on those {total:,}")
        return image_indices(total, n, seed)

    images, _, pre = _data_images(model, spec, choose, source, preprocess)
    return images, pre


def holdout_images(model: onnx.ModelProto, spec: str, num_calib: int, n: int, seed: int,
                   source: str = "model", preprocess: dict | None = None, announce: bool = True
                   ) -> tuple[np.ndarray | PreparedImages, np.ndarray | None]:
    """`n` model-ready training images of `spec` that calibration did not use, and their labels.

    `announce`: print the preprocessing's warnings (False where calibration already did).
    """
    checks.integer(n, "number of held-out images", low=1)
    images, labels, _ = _data_images(model, spec, lambda total: holdout_indices(total, num_calib, n, seed),
                                     source, preprocess, announce)
    return images, labels


@dataclass(frozen=True)
class SearchImages:
    """Clean held-out images a searched method's candidates are measured on.

    Attributes:
        images: Model-ready inputs, neither calibration's nor the output check's.
        labels: Their labels (None: unlabelled; the search then compares agreement with FP).
        opt_level: onnxruntime optimization level of the measurement.
    """

    images: Inputs
    labels: np.ndarray | None
    opt_level: str = "faithful"


def search_images(model: onnx.ModelProto, spec: str, num_calib: int, holdout: int, n: int, seed: int,
                  source: str = "model", preprocess: dict | None = None) -> SearchImages:
    """`n` model-ready training images of `spec` for a setting search: neither calibration's
    nor those of the held-out check of `holdout` images (`pipeline.calibration.search_indices`).

    Raises:
        NoHoldout: none is left.
    """
    checks.integer(n, "number of search images", low=1)
    images, labels, _ = _data_images(
        model, spec, lambda total: search_indices(total, num_calib, holdout, n, seed), source, preprocess,
        announce=False)
    return SearchImages(images, labels)


def calibration_array(data: object, input_name: str) -> np.ndarray | PreparedImages:
    """Model-ready calibration inputs from what a library caller has.

    Args:
        data: An array (N x ...); an onnxruntime `CalibrationDataReader` (anything with
            `get_next()` returning {input name: batch} until None; its `rewind()`, when it
            has one, is called first); or any iterable of batches or of such dicts.
        input_name: The model's input name (the key of dict batches).

    Raises:
        EfrapError: no batches, a dict batch without `input_name`, or batches that are
            not float arrays of one shape.
    """
    if isinstance(data, np.ndarray | PreparedImages):
        return data  # type: ignore[return-value]
    if hasattr(data, "get_next"):
        if callable(getattr(data, "rewind", None)):
            data.rewind()  # type: ignore[attr-defined]  # a reader another quantizer read to its end
        source = iter(data.get_next, None)  # type: ignore[attr-defined]
    else:
        source = data  # type: ignore[assignment]
    batches = []
    for batch in source:  # type: ignore[union-attr]
        if isinstance(batch, dict):
            if input_name not in batch:
                raise EfrapError(f"calibration data: a batch has no input '{input_name}' (it has "
                                 f"{', '.join(map(str, batch)) or 'no keys'})")
            batch = batch[input_name]
        batches.append(batch)
    if not batches:
        raise EfrapError("calibration data: no batches")
    try:
        out = np.concatenate([np.asarray(b, dtype=np.float32) for b in batches])
    except ValueError as exc:
        raise EfrapError(f"calibration data: batches do not stack ({exc})") from None
    return out


@dataclass
class _Rounder:
    """What rounding every layer of one run shares (built once by `_rounder`)."""

    prepared: onnx.ModelProto
    plan: QuantPlan
    options: QuantizeOptions
    method: RoundingMethod
    needs: frozenset[str]
    act_qp: dict[str, QParams]
    inits: dict[str, np.ndarray]
    device: torch.device
    sampler: OrtSampler | None
    head: Head | None
    bn_factors: dict[str, np.ndarray]
    constants: dict[str, QuantizedConstant]
    done: dict[str, QuantizedLayer] = field(default_factory=dict)
    store: LayerStore | None = None
    clock: RunClock | None = None

    def problem(self, layer: QuantLayer, wqp: QParams, bias: torch.Tensor | None) -> LayerProblem:
        """The layer's problem, holding what the method asked for."""
        weight = torch.from_numpy(self.inits[layer.weight]).to(self.device)
        if "data" in self.needs:
            assert self.sampler is not None
            targets = self.sampler.run(self.prepared, layer.output, lineage="fp")
            # The graph so far: the layers already rounded carry their integers, the rest
            # (none of them upstream of this one) stay float, every activation is quantized.
            partial = to_qdq(self.prepared, QuantResult(self.plan, self.act_qp, dict(self.done),
                                                        self.constants))
            reads = next(n for n in partial.graph.node if n.name == layer.node).input[0]
            inputs = self.sampler.run(partial, reads, lineage="partial")
            problem = build_problem(self.prepared, layer, weight, wqp, bias, self.act_qp.get(layer.output),
                                    inputs, targets, self.head, self.needs)
        else:
            problem = LayerProblem(layer.node, weight, wqp, channel_axis=layer.weight_axis)
        problem.seed = derive(self.options.seed, "rounding", layer.node)
        if layer.node in self.bn_factors:
            problem.error_scale = torch.from_numpy(pre_bn_error_scale(self.bn_factors[layer.node])).to(
                self.device)
        return problem

    def round(self, index: int, layer: QuantLayer) -> tuple[QuantizedLayer, LayerSummary]:
        """Round one layer; its integers then feed the layers after it."""
        start = time.perf_counter()
        weight = self.inits[layer.weight]
        tq = self.options.scheme.weight_quant(layer.edge, layer.node)
        wqp = observe_weight(weight, tq, layer.weight_axis)
        bias_q, bias_scale = make_bias(self.inits.get(layer.bias) if layer.bias else None,
                                       self.act_qp[layer.input], wqp, weight.shape[layer.weight_axis])
        ql = QuantizedLayer(q=np.zeros(0), qparams=wqp, bias_q=bias_q, bias_scale=bias_scale)
        bias = ql.dequantized_bias()
        bias_t = torch.from_numpy(bias).to(self.device) if bias is not None else None
        problem = self.problem(layer, wqp, bias_t)
        result = self._run_method(index, layer, tq.bits, problem)
        q, stats = result.q.detach(), dict(result.stats)
        budget = self.options.config.prune_rare
        if budget > 0:
            assert problem.inputs is not None
            q, pruned = prune_rare_inputs(self.prepared, layer, problem.inputs, q, wqp, problem.weight,
                                          budget)
            stats.update(pruned)
        ql.q = q.cpu().numpy().astype(np.int64)
        ql.stats = {k: float(v) for k, v in stats.items()}
        self.done[layer.node] = ql
        if result.output_scale is not None:
            self._set_output_scale(layer, result.output_scale)
        summary = LayerSummary(layer.node, layer.op, tq.bits, time.perf_counter() - start,
                               dict(ql.stats), dict(result.notes))
        if self.clock is not None:
            self.clock.finish(index - 1, summary.seconds)
        if self.store is not None:
            self.store.save(index, LayerRecord(
                layer.node, ql, result.output_scale,
                {"op": summary.op, "bits": summary.bits, "seconds": summary.seconds,
                 "stats": summary.stats, "notes": summary.notes},
                rng_state(self.device)))
        return ql, summary

    def restore(self, index: int, layer: QuantLayer) -> tuple[QuantizedLayer, LayerSummary] | None:
        """Layer `index` as the checkpoint holds it, put in place as `round` would leave it
        (None: not in the checkpoint)."""
        record = self.store.load(index, layer.node) if self.store is not None else None
        if record is None:
            return None
        self.done[layer.node] = record.quantized
        if record.output_scale is not None:
            self._set_output_scale(layer, record.output_scale)
        set_rng_state(record.rng, self.device)
        if self.clock is not None:
            self.clock.finish(index - 1)
        s = record.summary
        return record.quantized, LayerSummary(
            layer.node, str(s["op"]), int(s["bits"]), float(s["seconds"]),  # type: ignore[arg-type]
            {k: float(v) for k, v in s["stats"].items()},  # type: ignore[union-attr]
            {k: str(v) for k, v in s["notes"].items()})  # type: ignore[union-attr]

    def _set_output_scale(self, layer: QuantLayer, scale: float) -> None:
        """Use a learned output step size from now on: in later layers' inputs and biases,
        and in the written model (every tensor that shares the point's grid)."""
        old = self.act_qp[layer.output]
        new = QParams(scale=np.asarray(scale, np.float32).reshape(np.shape(old.scale)),
                      zero_point=old.zero_point, qmin=old.qmin, qmax=old.qmax, axis=old.axis)
        for tensor in [t for t in self.act_qp if self.plan.root(t) == layer.output]:
            self.act_qp[tensor] = new

    def _run_method(self, index: int, layer: QuantLayer, bits: int,
                    problem: LayerProblem) -> RoundingResult:
        config = self.options.config
        if "data" not in self.method.needs(config):
            return self.method(problem, config)
        clock = self.clock
        bar = Progress(f"layer {index}/{len(self.plan.layers)} {layer.node} ({self.method.name}, "
                       f"{bits}-bit)", total=config.iters,
                       run_remaining=None if clock is None else
                       lambda fraction, elapsed: clock.remaining(index - 1, fraction, elapsed))

        def report(step: int, terms: dict[str, float]) -> None:
            bar.update(step - bar.count, " ".join(f"{k} {v:.4g}" for k, v in terms.items()))

        result = self.method(problem, config, progress=report)
        left = "" if clock is None or index == len(self.plan.layers) else \
            f", run ETA {format_seconds(clock.remaining(index - 1, 1.0, bar.elapsed))}"
        bar.close(f"flipped {100 * result.stats.get('flip_fraction', 0.0):.2f}%, "
                  f"rec {result.stats.get('rec_nearest', 0.0):.4g} (nearest) -> "
                  f"{result.stats.get('rec_final', 0.0):.4g}{left}")
        return result


def _search(model: onnx.ModelProto, base: _Rounder, search: SearchImages
            ) -> tuple[dict[str, QuantizedLayer], list[LayerSummary], SearchRecord]:
    """Round every layer at each value of the method's setting, measure each whole model on the
    held-out images against FP, keep the value the method's rule picks.

    Only the candidate kept so far is held (the rule keeps the last qualifying value), so
    memory holds at most two candidates' integers whatever the grid's length.
    """
    method = searched(base.method)
    grid = method.search
    trials: list[SearchTrial] = []
    figures: list[float] = []
    figure_name = ""
    kept: tuple[dict[str, QuantizedLayer], list[LayerSummary]] | None = None
    for value in grid.grid:
        start = time.perf_counter()
        # A fresh run of every layer on the shared calibration, grids and constants; no ETA
        # clock, since the candidates are quick and their count is the grid's.
        rounder = replace(base, method=method.at(value), done={}, clock=None)
        layers, summaries = {}, []
        for i, layer in enumerate(base.plan.layers, 1):
            layers[layer.node], summary = rounder.round(i, layer)
            summaries.append(summary)
        qdq = to_qdq(base.prepared, QuantResult(base.plan, base.act_qp, layers, base.constants),
                     base.options.weight_storage)
        report = check_defense(model, qdq, search.images, search.labels, GuardLimits(), search.opt_level,
                               base.options.provider, fixed_batch(model))
        name, figure = clean_figure(report)
        if figure_name and name != figure_name:
            raise EfrapError(f"the {grid.setting} search measured {figure_name} on one candidate and {name} "
                             "on another")
        figure_name = name
        figures.append(figure)
        weights = sum(ql.q.size for ql in layers.values())
        flipped = sum(s.flip_fraction * layers[s.layer].q.size for s in summaries)
        trials.append(SearchTrial(value, report.accuracy, report.agreement, flipped / max(weights, 1),
                                  time.perf_counter() - start))
        if grid.qualifies(figures[0], figure):
            kept = layers, summaries
        log(f"{base.method.name}: {grid.setting} {value:g}: clean {name} {100 * figure:.2f}% "
            f"({trials[-1].seconds:.1f}s)")
    assert kept is not None  # the first value always qualifies
    record = SearchRecord(base.method.name, grid, figure_name, tuple(trials), grid.pick(figures),
                          len(search.images), search.opt_level)
    return kept[0], kept[1], record


def _rounder(prepared: onnx.ModelProto, plan: QuantPlan, act_qp: dict[str, QParams],
             constants: dict[str, QuantizedConstant], images: np.ndarray, options: QuantizeOptions,
             source: str) -> _Rounder:
    method = get_method(options.method)
    needs = run_needs(options.method, options.config)
    device = pick_device(options.device)
    inits = {i.name: np.array(onnx.numpy_helper.to_array(i)) for i in prepared.graph.initializer}
    # Every conv with a constant weight may carry BN factors, including those kept in float.
    channels = {n.name: int(inits[n.input[1]].shape[0]) for n in prepared.graph.node
                if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits}
    sampler = OrtSampler(images, device, options.provider, fixed_batch(prepared)) \
        if "data" in needs else None
    head = None
    if needs & {"head", "output_grads"}:
        assert sampler is not None
        head = Head(prepared, sampler.run(prepared, prepared.graph.output[0].name), device,
                    options.config.loss)
    return _Rounder(
        prepared=prepared, plan=plan, options=options, method=method, needs=needs, act_qp=act_qp,
        inits=inits, device=device, sampler=sampler, head=head,
        bn_factors=read_bn_factors(prepared, channels, source) if "bn_factors" in needs else {},
        constants=constants,
    )


@dataclass(frozen=True)
class Resume:
    """Where a run keeps its per-layer checkpoint (`pipeline.checkpoint`), and what it reads.

    Attributes:
        folder: The checkpoint folder (`checkpoint_folder(output)`, checked with
            `check_folder`).
        model_sha256: sha256 of the input model's files (`file_sha256`).
    """

    folder: Path
    model_sha256: str


def run_key(options: QuantizeOptions, model_sha256: str, images: Inputs, norm: Preprocess,
            device: torch.device) -> dict[str, object]:
    """Everything that shapes a run's output, for its checkpoint's key.

    The calibration inputs enter by their sha256 (which covers the data set, the count,
    the seed's choice of images and the preprocessing); thread counts because float
    sums depend on them; the source of the packages that compute the numbers because a
    checkpoint from other code would not give the same bytes.
    """
    o = options
    return {
        "model_sha256": model_sha256, "method": o.method, "scheme": o.scheme.to_json(),
        "rounding": asdict(o.config), "seed": o.seed, "calib": o.calib, "num_calib": o.num_calib,
        "calibration_sha256": array_sha256(images), "preprocess": o.preprocess,
        "preprocessing": norm.to_json(), "exclude": list(o.exclude), "weight_storage": o.weight_storage,
        "device": str(device), "provider": pick_provider(o.provider),
        "threads": {"torch": torch.get_num_threads(), "onnxruntime": session_threads()},
        "versions": versions(), "code_sha256": code_sha256(),
    }


def quantize_model(model: onnx.ModelProto, images: object, options: QuantizeOptions,
                   source: str = "model", preprocess: Preprocess | None = None,
                   resume: Resume | None = None, search: SearchImages | None = None,
                   ) -> tuple[onnx.ModelProto, QuantResult, QuantizeSummary]:
    """Quantize a loaded FP model.

    Args:
        model: The FP model (not modified).
        images: Model-ready calibration inputs: an array, a CalibrationDataReader or an
            iterable of batches (see `calibration_array`).
        options: Scheme, method, seed and settings.
        source: Name used in error messages.
        preprocess: How `images` were preprocessed (recorded in the output); None: the
            model's own (or the options'), as `calibration_images` resolves it.
        resume: Where to keep a per-layer checkpoint, for a run that reads data (None:
            none). Layers it holds under the same key are restored, not computed; the
            caller removes it (`remove_folder`) once the output is written.
        search: Clean held-out images for a method that searches a setting (QVec;
            `search_images` chooses them); ignored by other methods.

    Returns:
        The QDQ model, the QuantResult it was written from (on the prepared graph)
        and the run's summary.

    Raises:
        EfrapError: the method searches a setting and `search` is None.
    """
    image = image_input(model, source)
    images = calibration_array(images, image.name)
    norm = preprocess or resolve(model, image, options.preprocess, source, announce=False)
    check_finite(model, source)
    prepared = prepare_model(model, source)
    plan = analyze(prepared, source, options.exclude)
    t0 = time.perf_counter()
    stats = calibrate(prepared, plan, images, seed=sample_seed(options.seed), provider=options.provider)
    act_qp = activation_qparams(plan, stats, options.scheme)
    constants = quantized_constants(prepared, plan, options.scheme)
    t_calib = time.perf_counter() - t0

    torch.manual_seed(derive(options.seed, "torch"))
    rounder = _rounder(prepared, plan, act_qp, constants, images, options, source)
    if "search" in rounder.needs and search is None:
        raise EfrapError(f"method '{options.method}' chooses its setting on clean held-out images, and "
                         "none were given (quantize_file and the command line choose them)")
    # The layers of one run take the same number of steps: each counts alike in the ETA.
    rounder.clock = RunClock([1.0] * len(plan.layers))
    if resume is not None and "data" in rounder.needs:
        rounder.store = LayerStore(resume.folder, run_key(options, resume.model_sha256, images, norm,
                                                          rounder.device))
    t1 = time.perf_counter()
    layers: dict[str, QuantizedLayer] = {}
    summaries: list[LayerSummary] = []
    restored = 0
    record: SearchRecord | None = None
    try:
        if search is not None and "search" in rounder.needs:
            layers, summaries, record = _search(model, rounder, search)
        else:
            for i, layer in enumerate(plan.layers, 1):
                # Only an unbroken run of finished layers from the first is restored: a layer
                # is computed from the integers of every layer before it.
                found = rounder.restore(i, layer) if restored == i - 1 else None
                if found is not None:
                    restored += 1
                elif restored == i - 1 and restored:
                    log(f"checkpoint {rounder.store.folder if rounder.store else ''}: layers 1-{restored} "
                        f"of {len(plan.layers)} restored, resuming at layer {i}")
                layers[layer.node], summary = found or rounder.round(i, layer)
                summaries.append(summary)
    finally:
        if rounder.sampler is not None:
            rounder.sampler.close()
    if restored and restored == len(plan.layers):
        log(f"checkpoint {rounder.store.folder if rounder.store else ''}: all {restored} layers restored")
    # Restored layers count with the seconds they took when they ran.
    t_round = time.perf_counter() - t1 + sum(s.seconds for s in summaries[:restored])

    result = QuantResult(plan=plan, act_qparams=act_qp, layers=layers, constants=constants)
    qdq = to_qdq(prepared, result, options.weight_storage)
    summary = QuantizeSummary(options=options, num_calib=len(images), preprocess=norm,
                              device=str(rounder.device), layers=tuple(summaries),
                              calibration_seconds=t_calib, rounding_seconds=t_round,
                              threads=torch.get_num_threads(), session_threads=session_threads(),
                              resumed=restored, search=record,
                              unpacked_four_bit=_unpacked_four_bit(result, options))
    set_metadata(qdq, summary.metadata())
    return qdq, result, summary


def _unpacked_four_bit(result: QuantResult, options: QuantizeOptions) -> int:
    """How many weights on grids of 4 bits or fewer the QDQ writer stores one to a byte."""
    if options.weight_storage == "int4":
        return 0
    return sum(int(layer.q.size) for layer in result.layers.values() if layer.qparams.bits <= 4)


@dataclass(frozen=True)
class GuardOptions:
    """The output's own check (validators.guard), on held-out training images: every
    output's fidelity to FP, clean accuracy where there are labels, and the limits.

    Attributes:
        limits: The budget (max agreement drop, min accuracy).
        images: Held-out images (never the calibration images).
        opt_level: onnxruntime optimization level of the check.
    """

    limits: GuardLimits = field(default_factory=GuardLimits)
    images: int = 1000
    opt_level: str = "faithful"

    def __post_init__(self) -> None:
        checks.integer(self.images, "held-out images", low=1)


def check_output(model: onnx.ModelProto, qdq: onnx.ModelProto, options: QuantizeOptions, guard: GuardOptions,
                 source: str = "model") -> GuardReport:
    """The output's check against FP (`guard`) on the held-out images of `options`' data and
    seed; when calibration used every image, nothing is measured and every limit set fails."""
    try:
        held, labels = holdout_images(model, options.calib, options.num_calib, guard.images, options.seed,
                                      source, options.preprocess, announce=False)
    except NoHoldout as exc:
        return unmeasured(guard.limits, str(exc), guard.opt_level)
    return check_defense(model, qdq, held, labels, guard.limits, guard.opt_level, options.provider,
                         fixed_batch(model))


def quantize_file(model_path: str, out_path: str, options: QuantizeOptions,
                  guard: GuardOptions | None = None, resume: bool = True,
                  ) -> tuple[QuantizeSummary, GuardReport]:
    """The `efrap quantize` / `efrap defend` job: read, quantize, check, write atomically.

    Every output is compared with the FP model on held-out images (`guard`, default
    `GuardOptions()`: 1,000 images, no limits) and the result goes into its
    `efrap.guard` metadata; the output is written either way. When calibration used
    every image, nothing is measured: the report says so and every limit set fails.

    A run that reads data keeps a per-layer checkpoint in ``OUT.ckpt`` beside the
    output (`pipeline.checkpoint`): run again after a kill, it restores the layers
    finished under the same key and writes the same bytes; the folder is removed once
    the output is written.

    Args:
        resume: Keep and use the checkpoint (False: neither read nor write one).

    Returns:
        The summary, and the check's report.
    """
    guard = guard or GuardOptions()
    inputs = [*model_files(model_path), *data_mod.spec_files(options.calib)]
    check_outputs({"output": out_path}, inputs)
    folder = check_folder(checkpoint_folder(out_path), inputs) if resume else None
    model = load_model(model_path)
    images, pre = calibration_images(model, options.calib, options.num_calib, options.seed, model_path,
                                     options.preprocess)
    labelled = isinstance(images, PreparedImages) and isinstance(images.dataset, data_mod.Dataset)
    if guard.limits.min_accuracy is not None and not labelled:
        # Refused before the run: the check could only fail it, after all the rounding.
        raise EfrapError(f"{options.calib}: a minimum clean accuracy (--min-accuracy) needs labelled "
                         "images and these have none; limit the agreement with FP "
                         "(--max-agreement-drop) or the output error (--max-output-error) instead")
    state = None
    needs = run_needs(options.method, options.config)
    if folder is not None and "data" in needs:
        state = Resume(folder, file_sha256(model_files(model_path)))
    held_search = None
    if "search" in needs:
        wanted = searched(get_method(options.method)).search.images
        try:
            held_search = search_images(model, options.calib, options.num_calib, guard.images, wanted,
                                        options.seed, model_path, options.preprocess)
        except NoHoldout as exc:
            raise EfrapError(f"method '{options.method}': {exc}") from None
    qdq, _, summary = quantize_model(model, images, options, model_path, pre, state, held_search)
    report = check_output(model, qdq, options, guard, model_path)
    set_metadata(qdq, {"efrap.guard": report.to_json()})
    save_model(qdq, out_path)
    if state is not None:
        remove_folder(state.folder)
    return summary, report
