"""LAC: a learned additive weight offset under straight-through rounding."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import fields, replace

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from pipeline.base.deployment import Deployment
from pipeline.base.errors import EfrapError
from pipeline.base.runtime import make_session
from pipeline.base.scheme import PRESETS, TensorQuant
from pipeline.observers import observe_weight
from pipeline.qmath import dequantize_np
from pipeline.quantize import QuantizeOptions, quantize_model
from pipeline.rounding import METHODS, LacConfig, LayerProblem, NearestConfig, get_method
from pipeline.rounding.lac import LAC_DEFAULTS, lac_integers
from pipeline.rounding.learned import LayerGrid
from pipeline.rounding.losses import get_loss

ASYM4_PC = TensorQuant(bits=4, symmetric=False, per_channel=True, observer="minmax")
ASYM4_MSE = TensorQuant(bits=4, symmetric=False, per_channel=True, observer="mse")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny layers on a busy machine: a second intra-op thread only adds spin-waits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w, padding=1)


def _small_problem(seed: int = 3, gain: float = 1.0) -> LayerProblem:
    """tests/test_rounding.py's layer: an 8x4x3x3 conv on 48 cached inputs.

    With gain < 1 the cached inputs come from a partly quantized network whose upstream
    clipping shrank them (targets stay the FP outputs): an error this layer's weights can
    partly undo, as in the real pipeline.
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 4, 3, 3, generator=gen) * 0.2
    x = torch.randn(48, 4, 6, 6, generator=gen)
    return LayerProblem("conv", w, observe_weight(w.numpy(), ASYM4_PC, 0), conv, gain * x, conv(x, w))


def quick(**changes: object) -> LacConfig:
    return replace(LAC_DEFAULTS, **changes)


def nearest_q(problem: LayerProblem) -> torch.Tensor:
    return get_method("nearest")(LayerProblem("w", problem.weight, problem.qparams), NearestConfig()).q


def test_registry_and_defaults() -> None:
    lac = get_method("lac")
    assert METHODS["lac"] is lac and lac.name == "lac" and lac.defaults is LAC_DEFAULTS
    assert lac.needs(LAC_DEFAULTS) == {"data"}
    assert lac.needs(quick(loss="fisher")) == {"data", "output_grads"}
    assert (LAC_DEFAULTS.iters, LAC_DEFAULTS.batch_size, LAC_DEFAULTS.lr) == (10_000, 32, 1e-3)
    assert LAC_DEFAULTS.loss == "mse" and not hasattr(LAC_DEFAULTS, "reg_weight")
    assert not hasattr(LAC_DEFAULTS, "flip_weight")


def test_lac_lowers_reconstruction_below_nearest() -> None:
    problem = _small_problem(gain=0.8)
    result = get_method("lac")(problem, quick(iters=200))
    stats = result.stats
    assert set(stats) == {"flip_fraction", "max_step", "steps", "rows", "rec", "rec_nearest", "rec_final",
                          "seconds"}
    assert stats["rec_final"] < stats["rec_nearest"]  # measured: 0.428 -> 0.205
    assert problem.inputs is not None and problem.targets is not None
    wq = torch.from_numpy(dequantize_np(result.q.numpy(), problem.qparams))
    rec = get_loss("mse")(conv(problem.inputs, wq), problem.targets, torch.arange(48), problem)
    assert float(rec) == pytest.approx(stats["rec_final"], rel=1e-5)
    assert 0.0 < stats["flip_fraction"] < 1.0
    nearest = nearest_q(problem)
    assert stats["flip_fraction"] == pytest.approx(float((result.q != nearest).float().mean()))
    assert stats["max_step"] == float((result.q - nearest).abs().max())


def test_same_seed_same_integers_and_seed_picks_batches() -> None:
    config = quick(iters=80, lr=0.01, batch_size=8)
    a = get_method("lac")(_small_problem(), config)
    b = get_method("lac")(_small_problem(), config)
    assert torch.equal(a.q, b.q)
    assert a.stats["rec"] == b.stats["rec"] and a.stats["rec_final"] == b.stats["rec_final"]
    other = _small_problem()
    other.seed = 7
    c = get_method("lac")(other, config)
    assert c.stats["rec"] != a.stats["rec"]  # the problem's seed does pick the batches


@pytest.mark.parametrize("tq", [ASYM4_PC, ASYM4_MSE], ids=["minmax", "mse-clipping"])
def test_integers_in_range_and_may_move_several_steps(tq: TensorQuant) -> None:
    # Inputs at half their FP size call for weights about twice as large: the offsets move
    # several grid steps, and the largest weights run into the clamp.
    problem = _small_problem(gain=0.5)
    problem.qparams = observe_weight(problem.weight.numpy(), tq, 0)
    result = get_method("lac")(problem, quick(iters=100, lr=0.01, batch_size=8))
    q = result.q
    assert q.dtype == torch.int64 and q.shape == problem.weight.shape
    assert int(q.min()) >= problem.qparams.qmin and int(q.max()) <= problem.qparams.qmax
    assert result.stats["max_step"] > 1.0  # unlike AdaRound/EFRAP


def test_tiny_learning_rate_gives_nearest_rounding() -> None:
    problem = _small_problem()
    result = get_method("lac")(problem, quick(iters=50, lr=1e-9, batch_size=8))
    assert torch.equal(result.q, nearest_q(problem))
    assert result.stats["flip_fraction"] == 0.0 and result.stats["max_step"] == 0.0
    assert result.stats["rec_final"] == result.stats["rec_nearest"]


def test_gradient_is_straight_through_inside_the_grid_and_stops_outside() -> None:
    problem = _small_problem()
    grid = LayerGrid.build(problem.weight, problem.qparams)
    assert torch.equal(lac_integers(grid, torch.zeros_like(grid.weight)).to(torch.int64), grid.nearest)
    # Push one output channel far above the grid and one far below; leave the rest.
    push = torch.zeros_like(grid.weight)
    push[0] = 100.0
    push[1] = -100.0
    offset = push.clone().requires_grad_(True)
    q = lac_integers(grid, offset)
    assert (q[0] == grid.qmax).all() and (q[1] == grid.qmin).all()
    q.sum().backward()
    assert offset.grad is not None
    inside = torch.ones_like(grid.weight, dtype=torch.bool)
    inside[:2] = False
    # d round((W + A) / s) / dA = 1 / s where the clamp does not saturate.
    ratio = (1.0 / grid.scale).expand_as(grid.weight)
    torch.testing.assert_close(offset.grad[inside], ratio[inside])
    assert (offset.grad[~inside] == 0).all()


def test_progress_reports_every_percent() -> None:
    calls: list[tuple[int, dict[str, float]]] = []
    get_method("lac")(_small_problem(), quick(iters=150, batch_size=8),
                      progress=lambda step, terms: calls.append((step, terms)))
    assert len(calls) == 150 and calls[0][0] == 1 and calls[-1][0] == 150
    assert all(set(terms) == {"rec"} and np.isfinite(terms["rec"]) for _, terms in calls)


def test_problem_without_data_raises() -> None:
    problem = _small_problem()
    bare = LayerProblem("conv", problem.weight, problem.qparams)
    with pytest.raises(EfrapError, match="lac needs cached inputs"):
        get_method("lac")(bare, quick(iters=1))
    with pytest.raises(EfrapError, match="needs the layer's output_grads"):
        get_method("lac")(problem, quick(iters=1, loss="fisher"))


def test_quantize_model_with_lac_runs_in_onnxruntime(tiny_model: onnx.ModelProto,
                                                     calib_images: np.ndarray) -> None:
    options = QuantizeOptions(Deployment(scheme=PRESETS["w4a4"], provider="cpu"), method="lac",
                              rounding=replace(LAC_DEFAULTS, iters=30), device="cpu")
    qdq, _, summary = quantize_model(tiny_model, calib_images, options)
    logits = make_session(qdq, "faithful", "cpu").run(calib_images)
    assert logits.shape == (len(calib_images), 10) and np.isfinite(logits).all()
    meta = {p.key: p.value for p in qdq.metadata_props}
    assert meta["efrap.method"] == "lac"
    # The output lists LAC's own settings, nothing of AdaRound's or EFRAP's.
    assert list(json.loads(meta["efrap.rounding"])) == sorted(f.name for f in fields(LacConfig))
    assert json.loads(meta["efrap.rounding"])["iters"] == 30
    assert summary.layers and all("max_step" in s.stats for s in summary.layers)


def test_lac_runs_the_shared_loop_with_its_early_stop() -> None:
    # An offset too small to move any integer: the rounding is settled from the first look
    # (step 100 of 200, a check every 2 steps), so two calm checks stop the layer at 104.
    result = get_method("lac")(_small_problem(), quick(iters=200, lr=1e-9, patience=2))
    assert result.stats["steps"] == 104.0 and result.stats["flip_fraction"] == 0.0
