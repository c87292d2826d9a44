"""Calibration: run the FP ONNX model in onnxruntime and collect activation statistics.

Every quantization point is added as an extra graph output; for each one the
exact min and max and a fixed-size uniform random sample of values are kept
(the sample feeds the percentile and MSE observers without holding every value).
"""

from __future__ import annotations

import numpy as np
import onnx

from pipeline.graph import QuantPlan
from pipeline.observers import ActivationStats
from pipeline.progress import Progress
from validators.runtime import make_session

SAMPLE_PER_BATCH = 16_384


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model


def calibrate(
    model: onnx.ModelProto,
    plan: QuantPlan,
    images: np.ndarray,
    seed: int = 0,
    batch_size: int = 64,
    provider: str = "auto",
) -> dict[str, ActivationStats]:
    """Statistics for every quantization point of `plan`.

    Args:
        model: The prepared FP model.
        plan: Its quantization plan.
        images: Preprocessed (normalised) calibration inputs, N x C x H x W.
        seed: Seeds the value sampling.
        batch_size: Images per onnxruntime call.
        provider: onnxruntime provider choice.
    """
    inits = {i.name for i in model.graph.initializer}
    graph_input = next(i.name for i in model.graph.input if i.name not in inits)
    names = [p for p in plan.points if p != graph_input]
    session = make_session(_with_outputs(model, names), "faithful", provider)
    out_names = [o.name for o in session.session.get_outputs()]
    rng = np.random.default_rng(seed)
    mins = {p: np.inf for p in plan.points}
    maxs = {p: -np.inf for p in plan.points}
    samples: dict[str, list[np.ndarray]] = {p: [] for p in plan.points}
    bar = Progress("calibrate", total=len(images))
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        values = dict(zip(out_names, session.session.run(None, {graph_input: batch}), strict=True))
        values[graph_input] = batch
        for p in plan.points:
            flat = values[p].reshape(-1)
            mins[p] = min(mins[p], float(flat.min()))
            maxs[p] = max(maxs[p], float(flat.max()))
            k = min(SAMPLE_PER_BATCH, flat.size)
            samples[p].append(flat[rng.choice(flat.size, size=k, replace=False)])
        bar.update(len(batch))
    bar.close(f"{len(images)} images, {len(plan.points)} activation points")
    return {
        p: ActivationStats(min=mins[p], max=maxs[p], sample=np.concatenate(samples[p]))
        for p in plan.points
    }
