"""Orchestration: FP ONNX -> calibration -> rounding -> QDQ ONNX.

`quantize_file` is the whole `efrap quantize` job; `quantize_model` is the same
on in-memory objects for library use.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch

from converters.qdq import WEIGHT_STORAGES, to_qdq
from pipeline.bn_fold import pre_bn_error_scale, read_bn_factors
from pipeline.calibration import calibrate
from pipeline.errors import EfrapError
from pipeline.graph import QuantPlan, analyze, check_finite, prepare_model
from pipeline.observers import observe_activation, observe_weight
from pipeline.onnx_io import (
    check_not_same_path,
    get_normalization,
    input_shape,
    load_model,
    save_model,
    set_metadata,
)
from pipeline.progress import Progress
from pipeline.provenance import versions
from pipeline.qmath import QParams
from pipeline.quantized import QuantizedLayer, QuantResult, make_bias
from pipeline.reconstruct import build_problem
from pipeline.rounding import RoundingConfig, get_method
from pipeline.rounding.base import LayerProblem, RoundingResult
from pipeline.scheme import Scheme, TensorQuant
from pipeline.torch_graph import TorchGraph


@dataclass(frozen=True)
class QuantizeOptions:
    """Settings of one quantization run.

    Attributes:
        scheme: The quantization scheme.
        method: Rounding method name (nearest, adaround, efrap, ...).
        calib: Data spec of the calibration set (its training split is used).
        num_calib: Number of calibration images.
        seed: Seeds image selection, sampling and learned rounding.
        weight_storage: "int8" containers or packed "int4".
        rounding: Settings of learned rounding (None: the method's own defaults).
        device: "auto" (CUDA when torch sees a GPU), "cpu" or "cuda".
        provider: onnxruntime provider for calibration.
    """

    scheme: Scheme
    method: str = "nearest"
    calib: str = "fashion-mnist"
    num_calib: int = 1024
    seed: int = 0
    weight_storage: str = "int8"
    rounding: RoundingConfig | None = None
    device: str = "auto"
    provider: str = "auto"


def pick_device(device: str) -> torch.device:
    """The torch device for rounding: CUDA when available and allowed."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EfrapError("--device cuda requested but torch sees no GPU")
    return torch.device("cuda" if torch.cuda.is_available() and device != "cpu" else "cpu")


def calibration_images(model: onnx.ModelProto, spec: str, n: int, seed: int,
                       source: str = "model") -> np.ndarray:
    """`n` preprocessed training images of data set `spec`, chosen by `seed`."""
    from pipeline import data as data_mod

    if n < 1:
        raise EfrapError(f"number of calibration images must be positive, got {n}")
    dataset = data_mod.load_dataset(spec, "train")
    data_mod.check_fits(dataset, input_shape(model), source)
    idx = data_mod.sample_indices(len(dataset.labels), min(n, len(dataset.labels)), seed)
    mean, std = get_normalization(model)
    return data_mod.normalize(dataset.images[idx], mean, std)


def _layer_grid(scheme: Scheme, first_or_last: bool) -> TensorQuant:
    if first_or_last and scheme.first_last_bits:
        return scheme.weight.with_bits(scheme.first_last_bits)
    return scheme.weight


def activation_qparams(plan: QuantPlan, stats: dict, scheme: Scheme) -> dict[str, QParams]:
    """Parameters for every quantized activation tensor (shared tensors included)."""
    by_layer = {layer.node: layer for layer in plan.layers}
    out: dict[str, QParams] = {}
    for point in plan.points:
        tq = scheme.activation
        readers = [by_layer[n] for n in plan.point_layers.get(point, ())]
        if scheme.first_last_bits and any(r.is_first or r.is_last for r in readers):
            tq = tq.with_bits(scheme.first_last_bits)
        out[point] = observe_activation(stats[point], tq)
    for tensor, root in plan.shared.items():
        out[tensor] = out[root]
    return out


def quantize_model(model: onnx.ModelProto, images: np.ndarray, options: QuantizeOptions,
                   source: str = "model") -> tuple[onnx.ModelProto, QuantResult, dict]:
    """Quantize a loaded FP model.

    Args:
        model: The FP model (not modified).
        images: Preprocessed calibration images.
        options: Scheme, method and settings.
        source: Name used in error messages.

    Returns:
        The QDQ model, the QuantResult it was written from (on the prepared graph)
        and a summary dict (per-layer stats, timings).
    """
    if options.weight_storage not in WEIGHT_STORAGES:
        raise EfrapError(f"unknown weight storage '{options.weight_storage}': use int8 or int4")
    method = get_method(options.method)
    config = options.rounding or method.defaults
    check_finite(model, source)
    prepared = prepare_model(model)
    plan = analyze(prepared, source)
    t0 = time.perf_counter()
    stats = calibrate(prepared, plan, images, seed=options.seed, provider=options.provider)
    act_qp = activation_qparams(plan, stats, options.scheme)
    t_calib = time.perf_counter() - t0

    device = pick_device(options.device)
    graph = TorchGraph(prepared, device)
    inits = {k: v.cpu().numpy() for k, v in graph.initializers.items()}
    images_t = torch.from_numpy(images).to(device) if method.needs_data else None
    # Only a method that weighs truncation errors (EFRAP) reads the BN factors.
    weighs_errors = hasattr(method, "error_units")
    bn_factors = read_bn_factors(
        model, {layer.node: int(inits[layer.weight].shape[layer.weight_axis]) for layer in plan.layers},
        source) if weighs_errors else {}
    needs: frozenset[str] = frozenset()
    if method.needs_data:
        from pipeline.rounding.losses import get_loss

        needs = get_loss(config.loss).needs
    torch.manual_seed(options.seed)
    fixed: dict[str, torch.Tensor] = {}
    layers: dict[str, QuantizedLayer] = {}
    per_layer: list[dict] = []
    t1 = time.perf_counter()
    for i, layer in enumerate(plan.layers, 1):
        w = inits[layer.weight]
        tq = _layer_grid(options.scheme, layer.is_first or layer.is_last)
        wqp = observe_weight(w, tq, layer.weight_axis)
        channels = w.shape[layer.weight_axis]
        bias_q, bias_scale = make_bias(inits.get(layer.bias) if layer.bias else None,
                                       act_qp[layer.input], wqp, channels)
        ql = QuantizedLayer(q=np.zeros(0), qparams=wqp, bias_q=bias_q, bias_scale=bias_scale)
        bias_t = None
        if bias_q is not None:
            bias_t = torch.from_numpy(ql.dequantized_bias()).to(device)
        lt = time.perf_counter()
        units = "exported"
        if method.needs_data:
            assert images_t is not None
            problem = build_problem(graph, layer, wqp, images_t, fixed, act_qp, bias_t, needs)
            if layer.node in bn_factors:
                problem.error_scale = torch.from_numpy(
                    pre_bn_error_scale(bn_factors[layer.node])).to(device)
            bar = Progress(f"layer {i}/{len(plan.layers)} {layer.node} ({options.method}, "
                           f"{tq.bits}-bit)", total=config.iters)

            def report(step: int, terms: dict[str, float], bar: Progress = bar) -> None:
                bar.update(step - bar.count, " ".join(f"{k} {v:.4g}" for k, v in terms.items()))

            if weighs_errors:
                units = method.error_units(problem, config)  # type: ignore[attr-defined]
            res: RoundingResult = method(problem, config, progress=report)
            bar.close(f"flipped {100 * res.stats.get('flip_fraction', 0.0):.2f}%, "
                      f"rec {res.stats.get('rec_nearest', 0.0):.4g} (nearest) -> "
                      f"{res.stats.get('rec_final', 0.0):.4g}")
        else:
            res = method(LayerProblem(layer.node, torch.from_numpy(w).to(device), wqp,
                                      channel_axis=layer.weight_axis), config)
        ql.q = res.q.detach().cpu().numpy().astype(np.int64)
        ql.stats = {k: float(v) for k, v in res.stats.items()}
        ql.stats["seconds"] = round(time.perf_counter() - lt, 3)
        layers[layer.node] = ql
        fixed[layer.weight] = torch.from_numpy(ql.dequantized_weight()).to(device)
        if bias_t is not None and layer.bias is not None:
            fixed[layer.bias] = bias_t
        per_layer.append({"layer": layer.node, "op": layer.op, "bits": tq.bits,
                          **({"error_units": units} if weighs_errors else {}), **ql.stats})
    t_round = time.perf_counter() - t1

    result = QuantResult(plan=plan, act_qparams=act_qp, layers=layers)
    qdq = to_qdq(prepared, result, options.weight_storage)
    summary = {
        "method": options.method,
        "scheme": options.scheme.to_json(),
        "seed": options.seed,
        "num_calib": len(images),
        "calib": options.calib,
        "weight_storage": options.weight_storage,
        "rounding": asdict(config) if method.needs_data else {},
        "device": str(device),
        "layers": per_layer,
        "calibration_seconds": round(t_calib, 3),
        "rounding_seconds": round(t_round, 3),
    }
    set_metadata(qdq, {
        "efrap.method": options.method,
        "efrap.scheme": options.scheme.to_json(),
        "efrap.seed": str(options.seed),
        "efrap.calibration": {"data": options.calib, "images": len(images)},
        "efrap.weight_storage": options.weight_storage,
        "efrap.rounding": summary["rounding"],
        "efrap.flip_fraction": {p["layer"]: round(p.get("flip_fraction", 0.0), 6) for p in per_layer},
        **({"efrap.error_units": {p["layer"]: p["error_units"] for p in per_layer}}
           if weighs_errors else {}),
        "efrap.versions": versions(),
    })
    return qdq, result, summary


def quantize_file(model_path: str, out_path: str, options: QuantizeOptions) -> dict:
    """The `efrap quantize` job: read, quantize, write atomically; returns the summary."""
    check_not_same_path(model_path, out_path)
    model = load_model(model_path)
    images = calibration_images(model, options.calib, options.num_calib, options.seed, model_path)
    qdq, _, summary = quantize_model(model, images, options, model_path)
    save_model(qdq, out_path)
    return summary
