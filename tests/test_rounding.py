"""Learned rounding: parametrisations, EFRAP's flip penalty, AdaRound, losses."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, fields, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.base.errors import EfrapError
from pipeline.base.scheme import TensorQuant
from pipeline.observers import observe_weight
from pipeline.qmath import QParams, dequantize_np
from pipeline.rounding import (
    METHODS,
    AdaRoundConfig,
    EfrapConfig,
    LacConfig,
    LayerProblem,
    NearestConfig,
    QVecConfig,
    RoundingSettings,
    get_method,
)
from pipeline.rounding.adaround import ADAROUND_DEFAULTS
from pipeline.rounding.efrap import EFRAP_DEFAULT, EFRAP_RELEASE, error_weights, flip_targets
from pipeline.rounding.lac import LAC_DEFAULTS
from pipeline.rounding.learned import (
    PLAIN_SIGMOID,
    RECTIFIED_SIGMOID,
    LayerGrid,
    SoftRounding,
    b_schedule,
)
from pipeline.rounding.losses import LOSSES, get_loss

ASYM4_PC = TensorQuant(bits=4, symmetric=False, per_channel=True, observer="minmax")
SYM4_PT = TensorQuant(bits=4, symmetric=True, per_channel=False, observer="minmax")
SYM8_PT = TensorQuant(bits=8, symmetric=True, per_channel=False, observer="minmax")
ASYM4_MSE = TensorQuant(bits=4, symmetric=False, per_channel=True, observer="mse")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These layers are tiny: a second intra-op thread only adds synchronisation, and on a
    # busy 2-core machine its spin-waits make each step many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def linear_frozen(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # The output still depends on w, but no gradient reaches it: only the other loss
    # terms move the rounding.
    return F.linear(x, w.detach())


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w  # ONNX MatMul weight [in, out]: output channels on axis 1


def conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w, padding=1)


def quick(base: RoundingSettings, **changes: object) -> RoundingSettings:
    return replace(base, **changes)


def nearest_q(w: torch.Tensor, qp: QParams) -> torch.Tensor:
    return get_method("nearest")(LayerProblem("w", w, qp), NearestConfig()).q


def sse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(get_loss("mse")(pred, target, torch.arange(len(pred)), None))  # type: ignore[arg-type]


@pytest.mark.parametrize("soft", [PLAIN_SIGMOID, RECTIFIED_SIGMOID], ids=["efrap", "adaround"])
@pytest.mark.parametrize(
    ("tq", "shape", "axis"),
    [
        (ASYM4_PC, (16, 8, 3, 3), 0),
        (ASYM4_MSE, (24, 12), 1),
        (SYM4_PT, (16, 8, 3, 3), 0),
        (SYM8_PT, (24, 12), 0),
    ],
    ids=["asym4-per-channel", "asym4-mse-axis1", "sym4-per-tensor", "sym8-per-tensor"],
)
def test_soft_weight_equals_hard_weight_when_binary(soft: SoftRounding, tq: TensorQuant,
                                                     shape: tuple[int, ...], axis: int) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen) * 0.1
    qp = observe_weight(w.numpy(), tq, axis)
    grid = LayerGrid.build(w, qp)
    up = torch.rand(shape, generator=gen) < 0.5
    v = torch.where(up, 100.0, -100.0)
    q = grid.hard(v >= 0)
    assert q.dtype == torch.int64
    assert int(q.min()) >= qp.qmin and int(q.max()) <= qp.qmax
    hard = torch.from_numpy(dequantize_np(q.numpy(), qp))
    torch.testing.assert_close(grid.soft_weight(soft.h(v)), hard, rtol=0.0, atol=1e-7)
    # At initialisation h is the fractional part: the soft weight is the float weight
    # wherever the grid does not clip it.
    inside = (grid.base >= qp.qmin) & (grid.base + 1 <= qp.qmax)
    soft0 = grid.soft_weight(soft.h(soft.init(grid.frac)))
    scale = float(np.max(qp.scale))
    torch.testing.assert_close(soft0[inside], w[inside], rtol=0.0, atol=2e-4 * scale)


def test_grid_nearest_and_errors_match_qmath() -> None:
    w = torch.randn(16, 8) * 0.1
    qp = observe_weight(w.numpy(), ASYM4_MSE, 0)  # the MSE range clips some weights
    grid = LayerGrid.build(w, qp)
    assert torch.equal(grid.nearest, nearest_q(w, qp))
    fq = torch.from_numpy(dequantize_np(grid.nearest.numpy(), qp))
    torch.testing.assert_close(grid.truncation_error(), (w - fq).abs())
    # The flip target points away from nearest: up where nearest is the floor.
    down = grid.nearest.to(torch.float32) == torch.clamp(grid.base, qp.qmin, qp.qmax)
    t = flip_targets(grid)
    inside = (grid.base >= qp.qmin) & (grid.base + 1 <= qp.qmax)
    assert torch.equal(t[inside] == 1.0, down[inside])


def test_flip_penalty_alone_flips_erroneous_weights_and_keeps_exact_ones() -> None:
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(16, 8, generator=gen) * 0.1
    qp = observe_weight(w0.numpy(), ASYM4_PC, 0)
    s, z = (torch.from_numpy(a.reshape(-1, 1).astype(np.float32)) for a in
            (qp.scale, qp.zero_point))
    # Integer parts well inside the grid, so that neither rounding direction clips.
    k = torch.randint(qp.qmin + 1, qp.qmax - 1, (16, 8), generator=gen).float() - z
    fracs = torch.tensor([0.0, 0.2, 0.35, 0.65, 0.8, 0.0, 0.45, 0.0])
    w = s * (k + fracs)
    grid = LayerGrid.build(w, qp)
    e = grid.truncation_error()
    exact = e == 0
    assert exact[:, fracs == 0].all() and (e[:, fracs > 0] > 0.15 * s).all()

    x = torch.randn(64, 8, generator=gen)
    problem = LayerProblem("fc", w, qp, linear_frozen, x, linear(x, w))
    config = quick(EFRAP_RELEASE, iters=100, lr=0.05, reg_weight=0.0)
    result = get_method("efrap")(problem, config)
    nearest = nearest_q(w, qp)
    assert torch.equal(result.q[exact], nearest[exact])
    assert (result.q[~exact] != nearest[~exact]).all()
    assert result.stats["flip_fraction"] == pytest.approx(float((~exact).float().mean()))


def test_efrap_full_loss_lowers_reconstruction() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen) * 0.1
    qp = observe_weight(w.numpy(), ASYM4_PC, 0)
    x = torch.relu(torch.randn(1024, 64, generator=gen)) * 16.0
    targets = linear(x, w)
    # The cached inputs come from the partly quantized network: here upstream clipping
    # has shrunk them by 20%, an error the rounding of this layer can partly undo.
    inputs = 0.8 * x
    start = sse(linear(inputs, w), targets)  # the soft weight at step 0 is the float weight
    config = quick(EFRAP_RELEASE, iters=300, lr=1e-2)
    full = get_method("efrap")(LayerProblem("fc", w, qp, linear, inputs, targets), config)
    blind = get_method("efrap")(LayerProblem("fc", w, qp, linear_frozen, inputs, targets), config)
    assert full.stats["flip_fraction"] > 0.05  # the flip penalty did act
    assert full.stats["rec_final"] < start
    assert full.stats["rec_final"] < 0.6 * blind.stats["rec_final"]
    wq = torch.from_numpy(dequantize_np(full.q.numpy(), qp))
    assert sse(linear(inputs, wq), targets) == pytest.approx(full.stats["rec_final"], rel=1e-4)


def test_adaround_beats_nearest_on_held_out_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=gen) * 0.1
    x = torch.relu(torch.randn(512, 8, 8, 8, generator=gen))
    train, held_out = x[:256], x[256:]
    qp = observe_weight(w.numpy(), ASYM4_PC, 0)
    problem = LayerProblem("conv", w, qp, conv, train, conv(train, w))
    result = get_method("adaround")(problem, quick(ADAROUND_DEFAULTS, iters=300, lr=1e-2))
    target = conv(held_out, w)
    ada = sse(conv(held_out, torch.from_numpy(dequantize_np(result.q.numpy(), qp))), target)
    near = sse(conv(held_out, torch.from_numpy(dequantize_np(nearest_q(w, qp).numpy(), qp))),
               target)
    assert ada <= near
    assert result.stats["rec_final"] <= result.stats["rec_nearest"]


@pytest.mark.parametrize("method", ["efrap", "adaround"])
@pytest.mark.parametrize(("tq", "forward", "shape", "axis"), [
    (ASYM4_MSE, linear, (24, 16), 0),
    (ASYM4_MSE, matmul, (16, 24), 1),
    (SYM4_PT, linear, (24, 16), 0),
], ids=["mse-per-channel", "matmul-axis1", "sym4-per-tensor"])
def test_integers_in_range_and_one_step_from_nearest(method: str, tq: TensorQuant, forward: object,
                                                     shape: tuple[int, int], axis: int) -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=gen) * 0.1
    qp = observe_weight(w.numpy(), tq, axis)
    x = torch.randn(64, 16, generator=gen)
    problem = LayerProblem("fc", w, qp, forward, x, forward(x, w))  # type: ignore[arg-type]
    # A large learning rate moves many weights far from their start.
    # The release's regulariser (b = 2) for both; AdaRound has no flip penalty.
    base = EFRAP_RELEASE if method == "efrap" else AdaRoundConfig(b_start=2.0)
    result = get_method(method)(problem, quick(base, iters=60, lr=0.2, warmup=0.2))
    q = result.q
    assert q.dtype == torch.int64 and q.shape == w.shape
    assert int(q.min()) >= qp.qmin and int(q.max()) <= qp.qmax
    assert int((q - nearest_q(w, qp)).abs().max()) <= 1
    assert 0.0 < result.stats["flip_fraction"] < 1.0


def _small_problem(seed: int = 3) -> LayerProblem:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 4, 3, 3, generator=gen) * 0.2
    x = torch.randn(48, 4, 6, 6, generator=gen)
    return LayerProblem("conv", w, observe_weight(w.numpy(), ASYM4_PC, 0), conv, x, conv(x, w))


def test_same_seed_same_integers() -> None:
    config = quick(EFRAP_RELEASE, iters=80, lr=0.02, batch_size=8)
    a = get_method("efrap")(_small_problem(), config)
    b = get_method("efrap")(_small_problem(), config)
    assert torch.equal(a.q, b.q)
    assert a.stats["rec"] == b.stats["rec"] and a.stats["flip"] == b.stats["flip"]
    other = _small_problem()
    other.seed = 7
    c = get_method("efrap")(other, config)
    assert c.stats["rec"] != a.stats["rec"]  # the problem's seed does pick the batches


def test_neuron_error_mode() -> None:
    problem = _small_problem()
    grid = LayerGrid.build(problem.weight, problem.qparams)
    e = error_weights(grid, "neuron", 0)
    norms = torch.linalg.vector_norm(grid.truncation_error().flatten(1), dim=1)
    torch.testing.assert_close(e, norms.view(-1, 1, 1, 1).expand_as(e))
    result = get_method("efrap")(problem, quick(EFRAP_RELEASE, iters=40, lr=0.02,
                                                error_mode="neuron"))
    assert int((result.q - nearest_q(problem.weight, problem.qparams)).abs().max()) <= 1


def test_progress_reports_every_percent() -> None:
    calls: list[tuple[int, dict[str, float]]] = []
    get_method("efrap")(_small_problem(), quick(EFRAP_RELEASE, iters=150, batch_size=8),
                        progress=lambda step, terms: calls.append((step, terms)))
    assert len(calls) == 150 and calls[0][0] == 1 and calls[-1][0] == 150
    assert set(calls[-1][1]) == {"rec", "round", "flip"}
    assert all(np.isfinite(v) for _, terms in calls for v in terms.values())


def test_b_schedule() -> None:
    b_at = b_schedule(replace(ADAROUND_DEFAULTS, iters=101))
    assert b_at(0) is None and b_at(20) is None
    assert b_at(21) == pytest.approx(20.0, rel=0.02)
    assert b_at(100) == pytest.approx(2.0)
    assert b_at(60) == pytest.approx(2.0 + 18.0 * (1 - (60 - 20.2) / 79.8))
    constant = b_schedule(EFRAP_RELEASE)
    assert constant(0) == 2.0 and constant(9_999) == 2.0


def _problem_with_extras() -> LayerProblem:
    gen = torch.Generator().manual_seed(4)
    problem = _small_problem()
    head_w = torch.randn(5, 8 * 6 * 6, generator=gen) * 0.05

    def head(y: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(y).flatten(1), head_w)

    assert problem.targets is not None
    problem.head = head
    problem.head_targets = head(problem.targets)
    problem.output_grads = torch.randn(problem.targets.shape, generator=gen)
    return problem


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_runs(name: str) -> None:
    problem = _problem_with_extras()
    loss = get_loss(name)
    assert loss.needs <= {"output_grads", "head"}
    assert problem.targets is not None
    idx = torch.arange(10)
    target = problem.targets[idx]
    assert float(loss(target, target, idx, problem)) == pytest.approx(0.0, abs=1e-6)
    # Every loss holds the plain reconstruction; fisher and pd weigh errors further.
    mse = float(get_loss("mse")(target + 0.1, target, idx, problem))
    assert mse > 0.0
    assert float(loss(target + 0.1, target, idx, problem)) >= mse * (1 - 1e-6)
    result = get_method("efrap")(problem, quick(EFRAP_RELEASE, iters=10, batch_size=8, loss=name))
    assert np.isfinite(result.stats["rec_final"]) and np.isfinite(result.stats["rec"])


def test_fisher_loss_is_damped_gradient_weighting() -> None:
    problem = _problem_with_extras()
    assert problem.targets is not None and problem.output_grads is not None
    idx = torch.tensor([3, 1, 4])
    target = problem.targets[idx]
    pred = target + torch.randn(target.shape, generator=torch.Generator().manual_seed(5))
    g = problem.output_grads[idx].abs() + 1.0
    expected = ((g * (pred - target)) ** 2).sum(1).mean()
    torch.testing.assert_close(get_loss("fisher")(pred, target, idx, problem), expected)
    problem.output_grads = torch.zeros_like(problem.output_grads)
    torch.testing.assert_close(get_loss("fisher")(pred, target, idx, problem),
                               get_loss("mse")(pred, target, idx, problem))


def test_user_mistakes_raise() -> None:
    with pytest.raises(EfrapError, match="unknown loss"):
        get_loss("l1")
    problem = _small_problem()
    with pytest.raises(EfrapError, match="needs the layer's output_grads"):
        get_method("efrap")(problem, quick(EFRAP_RELEASE, iters=1, loss="fisher"))
    with pytest.raises(EfrapError, match="error_mode"):
        get_method("efrap")(problem, quick(EFRAP_RELEASE, iters=1, error_mode="layer"))
    bare = LayerProblem("conv", problem.weight, problem.qparams)
    with pytest.raises(EfrapError, match="adaround needs cached inputs"):
        get_method("adaround")(bare, ADAROUND_DEFAULTS)


def test_registry() -> None:
    assert list(METHODS)[:3] == ["nearest", "adaround", "efrap"]
    assert METHODS["nearest"].needs(NearestConfig()) == frozenset()
    assert METHODS["adaround"].needs(ADAROUND_DEFAULTS) == {"data"}
    assert METHODS["efrap"].needs(EFRAP_RELEASE) == {"data", "bn_factors"}
    assert METHODS["efrap"].needs(replace(EFRAP_RELEASE, error_units="exported")) == {"data"}
    assert METHODS["efrap"].needs(replace(EFRAP_RELEASE, loss="fisher")) == {
        "data", "bn_factors", "output_grads"}
    assert (ADAROUND_DEFAULTS.b_start, ADAROUND_DEFAULTS.b_end, ADAROUND_DEFAULTS.warmup) == (
        20.0, 2.0, 0.2)
    # EfrapConfig's defaults are the release's, but for the output step sizes it learns.
    assert replace(EfrapConfig(), act_lr=4e-5) == EFRAP_RELEASE
    assert replace(EFRAP_RELEASE, error_units="steps", flip_weight=0.02, act_lr=0.0,
                   prune_rare=0.03) == EFRAP_DEFAULT
    assert METHODS["efrap"].defaults == EFRAP_DEFAULT


def test_each_method_takes_its_own_settings_only() -> None:
    kinds = {name: type(method.defaults) for name, method in METHODS.items()}
    assert kinds == {"nearest": NearestConfig, "adaround": AdaRoundConfig, "efrap": EfrapConfig,
                     "lac": LacConfig, "qvec": QVecConfig}
    problem = _small_problem()
    with pytest.raises(EfrapError, match=r"^method 'adaround' takes AdaRoundConfig, got EfrapConfig$"):
        get_method("adaround")(problem, quick(EFRAP_RELEASE, iters=1))
    with pytest.raises(EfrapError, match="method 'efrap' takes EfrapConfig, got AdaRoundConfig"):
        get_method("efrap").needs(ADAROUND_DEFAULTS)
    with pytest.raises(EfrapError, match="method 'nearest' takes NearestConfig, got LacConfig"):
        get_method("nearest")(problem, LAC_DEFAULTS)
    with pytest.raises(EfrapError, match="method 'lac' takes LacConfig, got NearestConfig"):
        get_method("lac").needs(NearestConfig())


def test_efrap_settings_are_written_out_as_they_always_were() -> None:
    # efrap.rounding, the summary's settings and the checkpoint key are asdict of these.
    assert list(asdict(EFRAP_RELEASE).items()) == [
        ("iters", 10_000), ("batch_size", 32), ("lr", 1e-3), ("reg_weight", 0.01), ("b_start", 2.0),
        ("b_end", 2.0), ("warmup", 0.0), ("flip_weight", 1.0), ("error_mode", "element"),
        ("loss", "mse"), ("error_units", "pre_bn"), ("act_lr", 4e-5), ("rec_guard", 0.0),
        ("prune_rare", 0.0), ("samples", "images"), ("pool", 32_768), ("patience", 0)]
    assert [f.name for f in fields(AdaRoundConfig)] == [
        "iters", "batch_size", "lr", "reg_weight", "b_start", "b_end", "warmup", "loss", "prune_rare",
        "samples", "pool", "patience"]
    assert [f.name for f in fields(LacConfig)] == [
        "iters", "batch_size", "lr", "loss", "prune_rare", "samples", "pool", "patience"]
    assert [f.name for f in fields(NearestConfig)] == [f.name for f in fields(QVecConfig)] == ["prune_rare"]


def test_shared_checks_hold_for_every_method() -> None:
    for kind in (AdaRoundConfig, EfrapConfig, LacConfig):
        with pytest.raises(EfrapError, match="at most 1,000,000"):
            kind(iters=10**9)
        with pytest.raises(EfrapError, match="loss must be one of"):
            kind(loss="l1")
    for kind in (AdaRoundConfig, EfrapConfig):
        with pytest.raises(EfrapError, match="warmup must be below 1"):
            kind(warmup=1.0)
    for kind in (NearestConfig, QVecConfig, LacConfig):
        with pytest.raises(EfrapError, match="prune_rare must be below 1"):
            kind(prune_rare=1.0)
    with pytest.raises(EfrapError, match="rec_guard must be 0"):
        EfrapConfig(rec_guard=0.5)
