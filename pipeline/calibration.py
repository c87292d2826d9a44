"""Calibration: activation statistics of the FP model, and the activation grids they give.

As in onnxruntime's calibrators, the data source is apart from the collection: a
source yields, batch after batch, the FP values of every quantization point;
`StatsCollector` keeps for each point the exact min and max and a fixed-size uniform
random sample of values (the sample feeds the percentile and MSE observers without
holding every value), in plan order and with one seeded generator, so that any two
sources giving the same values give the same statistics. `calibrate` is the
pipeline's source, onnxruntime running the FP graph with every point added as an
output; the red team's simulation (models.attacks.qsim) uses the same function.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace

import numpy as np
import onnx

from pipeline.base import data as data_mod
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import fixed_batch
from pipeline.base.progress import Progress, log
from pipeline.base.runtime import make_session
from pipeline.base.scheme import Scheme
from pipeline.base.seeds import derive
from pipeline.graph import QuantPlan
from pipeline.observers import ActivationStats, observe_activation
from pipeline.qmath import QParams

#: Values kept per point over the whole calibration set (1 MiB each): a fixed budget, so a
#: large model calibrated in many small batches keeps no more than a small one in 16.
SAMPLE_TOTAL = 262_144
BATCH_SIZE = 64
#: Largest size of the point values onnxruntime returns in one call (bytes): a large model
#: calibrates in smaller batches, so memory does not grow with every activation x 64 images.
RUN_BYTES = 128 << 20


def image_indices(total: int, n: int, seed: int) -> np.ndarray:
    """Which `n` of `total` training images a run with `seed` calibrates on (sorted)."""
    return data_mod.sample_indices(total, min(n, total), derive(seed, "calibration-images"))


class NoHoldout(EfrapError):
    """Every image of the data set went into calibration: none is left to check on."""


def holdout_indices(total: int, num_calib: int, n: int, seed: int) -> np.ndarray:
    """`n` training images a run with `seed` did not calibrate on (for checking the result).

    Fewer are left than asked for: all of them, with one line saying so.

    Raises:
        NoHoldout: calibration used every image.
    """
    free = _unused(total, num_calib, seed)
    if len(free) == 0:
        raise NoHoldout(f"no image is left for a held-out check: all {total} were used for calibration")
    if len(free) < n:
        log(f"held-out check: {n} images asked for, {len(free)} left after calibration; using {len(free)}")
    return free[_holdout_pick(free, n, seed)]


def search_indices(total: int, num_calib: int, holdout: int, n: int, seed: int) -> np.ndarray:
    """`n` training images that neither calibration nor the held-out check of `holdout`
    images uses, for a method's setting search (the check stays independent of the search).

    Fewer are left than asked for: all of them, with one line saying so.

    Raises:
        NoHoldout: calibration and the check use every image.
    """
    free = _unused(total, num_calib, seed)
    left = np.setdiff1d(free, free[_holdout_pick(free, holdout, seed)]) if len(free) else free
    if len(left) == 0:
        raise NoHoldout(f"no image is left for the setting search: calibration ({min(num_calib, total)}) "
                        f"and the held-out check use all {total}")
    if len(left) < n:
        log(f"setting search: {n} images asked for, {len(left)} left after calibration and the held-out "
            f"check; using {len(left)}")
    pick = data_mod.sample_indices(len(left), min(n, len(left)), derive(seed, "search-images"))
    return left[pick]


def _unused(total: int, num_calib: int, seed: int) -> np.ndarray:
    """The training images a run with `seed` did not calibrate on (sorted)."""
    taken = np.zeros(total, bool)
    taken[image_indices(total, num_calib, seed)] = True
    return np.flatnonzero(~taken)


def _holdout_pick(free: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Which of the `free` images the held-out check of `n` images takes (positions in `free`)."""
    return data_mod.sample_indices(len(free), min(n, len(free)), derive(seed, "holdout-images"))


def sample_seed(seed: int) -> int:
    """The seed of the value sampling of a run with `seed`."""
    return derive(seed, "calibration-sample")


class StatsCollector:
    """Streaming min, max and value sample of each point, batch by batch.

    Each batch of b images contributes SAMPLE_TOTAL * b / total values per point (16,384
    for 64 of 1,024 images), so the sample's size does not depend on the batch size.

    Args:
        points: The points, in plan order.
        seed: Seeds the value sampling.
        total: Images the source will give in all.
    """

    def __init__(self, points: Iterable[str], seed: int, total: int) -> None:
        self.points = tuple(points)
        self.total = max(int(total), 1)
        self._rng = np.random.default_rng(seed)
        self._min = dict.fromkeys(self.points, np.inf)
        self._max = dict.fromkeys(self.points, -np.inf)
        self._samples: dict[str, list[np.ndarray]] = {p: [] for p in self.points}

    def add(self, values: Mapping[str, np.ndarray]) -> None:
        """Add one batch: point -> its FP values on that batch.

        Raises:
            EfrapError: a point holds NaN or Inf (the data or the model is broken).
        """
        batch = len(next(iter(values.values())))
        per_batch = max(1, round(SAMPLE_TOTAL * batch / self.total))
        for p in self.points:
            flat = np.asarray(values[p], dtype=np.float32).reshape(-1)
            lo, hi = float(flat.min()), float(flat.max())
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise EfrapError(f"calibration: activation '{p}' holds NaN or Inf values; check the "
                                 "calibration data and the model's weights")
            self._min[p] = min(self._min[p], lo)
            self._max[p] = max(self._max[p], hi)
            k = min(per_batch, flat.size)
            self._samples[p].append(flat[self._rng.choice(flat.size, size=k, replace=False)])

    def stats(self) -> dict[str, ActivationStats]:
        """The statistics of every point so far."""
        return {p: ActivationStats(min=self._min[p], max=self._max[p],
                                   sample=np.concatenate(self._samples[p]))
                for p in self.points}


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """`model` serialized with `names` added as outputs (the model is left as it was).

    Adding the outputs for the serialization only, instead of copying the proto, saves a
    copy of every weight of a large model.
    """
    existing = {o.name for o in model.graph.output}
    added = [n for n in dict.fromkeys(names) if n not in existing]
    for name in added:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    try:
        return model.SerializeToString()
    finally:
        for _ in added:
            model.graph.output.pop()


def ort_point_values(model: onnx.ModelProto, plan: QuantPlan, images: np.ndarray,
                     batch_size: int = BATCH_SIZE, provider: str = "auto") -> Iterator[dict[str, np.ndarray]]:
    """FP values of every point of `plan`, batch by batch, from onnxruntime."""
    inits = {i.name for i in model.graph.initializer}
    graph_input = next(i.name for i in model.graph.input if i.name not in inits)
    names = [p for p in plan.points if p != graph_input]
    session = make_session(_with_outputs(model, names), "faithful", provider)
    out_names = [o.name for o in session.session.get_outputs()]
    fixed = fixed_batch(model)

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        feed = batch
        if fixed is not None and len(batch) != fixed:
            # A fixed-batch model takes exactly `fixed` images: pad with the batch's first rows.
            feed = np.concatenate([batch, np.repeat(batch[:1], fixed - len(batch), axis=0)])
        values = {k: v[: len(batch)] for k, v in
                  zip(out_names, session.session.run(None, {graph_input: feed}), strict=True)}
        values[graph_input] = batch
        return values

    if fixed is not None:
        batch_size = fixed
    elif len(images):
        per_image = sum(v[:1].nbytes for v in run(images[:1]).values())
        batch_size = int(max(1, min(batch_size, RUN_BYTES // max(per_image, 1))))
    for start in range(0, len(images), batch_size):
        yield run(images[start : start + batch_size])


def collect(source: Iterable[Mapping[str, np.ndarray]], points: Iterable[str], seed: int,
            total: int) -> dict[str, ActivationStats]:
    """Statistics of `points` over every batch of `source` (`total` images in all)."""
    collector = StatsCollector(points, seed, total)
    bar = Progress("calibrate", total=total)
    for values in source:
        collector.add(values)
        bar.update(len(next(iter(values.values()))))
    bar.close(f"{bar.count} images, {len(collector.points)} activation points")
    return collector.stats()


def calibrate(model: onnx.ModelProto, plan: QuantPlan, images: np.ndarray, seed: int = 0,
              provider: str = "auto") -> dict[str, ActivationStats]:
    """Statistics for every quantization point of `plan`, from onnxruntime.

    Args:
        model: The prepared FP model.
        plan: Its quantization plan.
        images: Preprocessed (normalised) calibration inputs, N x C x H x W.
        seed: Seeds the value sampling.
        provider: onnxruntime provider choice.
    """
    return collect(ort_point_values(model, plan, images, provider=provider), plan.points, seed,
                   total=len(images))


def constant_qparams(model: onnx.ModelProto, plan: QuantPlan, scheme: Scheme) -> dict[str, QParams]:
    """Per-tensor grids of the constant operands of integer ops, from their own min and max."""
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for name in plan.constants:
        values = onnx.numpy_helper.to_array(inits[name]).astype(np.float32).reshape(-1)
        stats = ActivationStats(min=float(values.min()), max=float(values.max()), sample=values)
        out[name] = observe_activation(stats, replace(scheme.activation_quant(False), observer="minmax"))
    return out


def activation_qparams(plan: QuantPlan, stats: Mapping[str, ActivationStats],
                       scheme: Scheme) -> dict[str, QParams]:
    """Parameters for every quantized activation tensor (shared tensors included)."""
    out = {point: observe_activation(stats[point], scheme.activation_quant(
               plan.point_is_edge(point), plan.point_layers.get(point, ())))
           for point in plan.points}
    for tensor, root in plan.shared.items():
        out[tensor] = out[root]
    return out
