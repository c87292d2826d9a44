"""Shared machinery of learned rounding (AdaRound, EFRAP, LAC).

Every weight W keeps its grid (scale s, zero point z, range [qmin, qmax]). A learned
method is a parametrisation of the weight by one real variable per weight
(`Parametrisation`) plus the loss terms it adds to the reconstruction (`LossTerms`);
`optimize_rounding` runs the one loop they share: Adam on the variables so that the
layer's output matches the full-precision output,

    loss = rec(forward(x, weight(V)), target) + the method's terms,

on batches drawn with the layer's seed, reporting progress every 1% of the steps and
stopping early once the hard rounding has settled (`LearnedSettings.patience`).

AdaRound and EFRAP may only round each weight down or up: its integer is
floor(W/s) + z + r with r in {0, 1}. The choice is relaxed to a soft value h(V) in
[0, 1] (`SoftRounding`), and the soft weight

    W~ = s * (clamp(floor(W/s) + h(V) + z, qmin, qmax) - z)

is what the loss sees. The final integers are

    q = clamp(floor(W/s) + 1[h(V) >= 0.5] + z, qmin, qmax),

computed as 1[V >= 0], which is the same for every parametrisation here (h is
increasing with h(0) = 1/2) and avoids a float tie at h = 0.5. Their terms
(`RoundingTerms`) are

    reg_weight * sum(1 - |2h - 1|^b) + the method's penalty (EFRAP's flip term)

with b annealed linearly from b_start to b_end after a warm-up fraction of the
steps during which the regulariser is off. Linear is the schedule of the AdaRound
release (BRECQ/MQBench's LinearTempDecay); with b_start == b_end (EFRAP's
release, b = 2) the schedule is constant. LAC's parametrisation is an additive
offset under straight-through rounding, with no terms (pipeline.rounding.lac).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch

from pipeline.base.errors import EfrapError
from pipeline.base.seeds import derive
from pipeline.qmath import QParams, dequantize, quantize
from pipeline.rounding.base import (
    AnnealedSettings,
    LayerProblem,
    LearnedSettings,
    ProgressCallback,
    RoundingResult,
    RoundingSettings,
    own_settings,
)
from pipeline.rounding.losses import ActivationLoss, get_loss

#: Clamp of the fractional part before the inverse sigmoid. A weight exactly on the grid
#: (frac = 0) would need V = -inf under a plain sigmoid; 1e-4 gives |V| <= 9.2, which Adam
#: at lr 1e-3 cannot cross in 10,000 steps unless a loss term pushes it consistently.
FRAC_EPS = 1e-4

#: Samples per forward when measuring the reconstruction of hard weights on the whole cache,
#: and the most bytes of one row's input or target times the chunk (a layer's output can be
#: far larger than its input: a stem conv at 224 x 224 reads 0.6 MB per image and writes 3.2 MB).
EVAL_CHUNK = 256
EVAL_BYTES = 64 << 20

#: An extra loss term of a method: (V, h(V)) -> scalar tensor.
Penalty = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Parametrisation(Protocol):
    """How a learned method's variables V (one per weight) become weights and integers."""

    def start(self, grid: LayerGrid) -> torch.Tensor:
        """V before the first step (the loop trains a copy)."""
        ...

    def relax(self, grid: LayerGrid, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weight the loss sees at V, the relaxed value the method's terms read).

        Computed once per step for both: the gradients of the reconstruction and of the
        terms then add up in one node, in one order (a second h(V) would sum them at V, in
        another order, and change the learned integers' bits).
        """
        ...

    def decide(self, grid: LayerGrid, v: torch.Tensor) -> torch.Tensor:
        """The hard rounding at V that early stopping compares between checks."""
        ...

    def hard(self, grid: LayerGrid, v: torch.Tensor) -> torch.Tensor:
        """int64 integers in [qmin, qmax] at V."""
        ...

    def figures(self, grid: LayerGrid, q: torch.Tensor) -> dict[str, float]:
        """What the method reports of its final integers `q` beyond the flip fraction."""
        ...


class LossTerms(Protocol):
    """A method's loss terms beyond the reconstruction, built for one layer's grid."""

    #: Every term's name: reported at each progress call and in the stats (0 until added).
    names: tuple[str, ...]

    def __call__(self, step: int, v: torch.Tensor, relaxed: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms added at 0-based `step` (some of `names`, in the order they are added)."""
        ...


@dataclass(frozen=True)
class SoftRounding:
    """Rectified sigmoid h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1).

    zeta = 1, gamma = 0 is the plain sigmoid of the EFRAP release; AdaRound
    (Nagel et al. 2020) stretches it with zeta = 1.1, gamma = -0.1 so that h reaches
    exactly 0 and 1 with a non-zero gradient nearby. As a `Parametrisation`: V starts where
    h(V) = frac(W/s) (the soft weight starts at the float weight), the loss sees the soft
    weight of h(V), and the hard rounding is up where V >= 0.

    Attributes:
        zeta: Upper end of the stretched sigmoid.
        gamma: Lower end of the stretched sigmoid.
    """

    zeta: float
    gamma: float

    @property
    def plain(self) -> bool:
        """Whether h is the plain sigmoid (no stretch, no clamp needed)."""
        return self.zeta == 1.0 and self.gamma == 0.0

    def h(self, v: torch.Tensor) -> torch.Tensor:
        """Soft rounding value in [0, 1]."""
        if self.plain:
            return torch.sigmoid(v)
        return torch.clamp(torch.sigmoid(v) * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    def init(self, frac: torch.Tensor) -> torch.Tensor:
        """V such that h(V) equals `frac` (clamped away from the sigmoid's asymptotes)."""
        p = (frac - self.gamma) / (self.zeta - self.gamma)
        return torch.logit(p, eps=FRAC_EPS)

    def start(self, grid: LayerGrid) -> torch.Tensor:
        """V with h(V) = frac(W/s)."""
        return self.init(grid.frac)

    def relax(self, grid: LayerGrid, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the soft weight of h(V), h(V))."""
        h = self.h(v)
        return grid.soft_weight(h), h

    def decide(self, grid: LayerGrid, v: torch.Tensor) -> torch.Tensor:
        """Up (True) or down for every weight: the sign of V."""
        return v >= 0

    def hard(self, grid: LayerGrid, v: torch.Tensor) -> torch.Tensor:
        """The integers rounding up where V >= 0."""
        return grid.hard(v >= 0)

    def figures(self, grid: LayerGrid, q: torch.Tensor) -> dict[str, float]:
        """Nothing more: every integer is at most one step from nearest."""
        return {}


PLAIN_SIGMOID = SoftRounding(zeta=1.0, gamma=0.0)
RECTIFIED_SIGMOID = SoftRounding(zeta=1.1, gamma=-0.1)


@dataclass(frozen=True, eq=False)
class LayerGrid:
    """A weight and its grid as broadcast tensors, with what every step reuses.

    Attributes:
        weight: float32 weight on the working device.
        scale: float32 scale, broadcastable to the weight.
        zero_point: float32 zero point, broadcastable to the weight.
        qmin: Smallest integer.
        qmax: Largest integer.
        base: floor(W / s) + z (float32), the integer when rounding down, before clamping.
        frac: W / s - floor(W / s), in [0, 1).
        nearest: int64 round-half-to-even integers, as QuantizeLinear computes them.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    base: torch.Tensor
    frac: torch.Tensor
    nearest: torch.Tensor

    @classmethod
    def build(cls, weight: torch.Tensor, qparams: QParams) -> LayerGrid:
        """Precompute the grid of `weight` (kept on its device)."""
        w = weight.detach().to(torch.float32)
        s, z = qparams.torch(w.dim(), w.device)
        with torch.no_grad():
            # Division, not multiplication by 1/s: the same float32 quotient as QuantizeLinear.
            ratio = w / s
            floor = torch.floor(ratio)
            nearest = quantize(w, s, z, qparams.qmin, qparams.qmax).to(torch.int64)
        return cls(weight=w, scale=s, zero_point=z, qmin=qparams.qmin, qmax=qparams.qmax,
                   base=floor + z, frac=ratio - floor, nearest=nearest)

    def soft_weight(self, h: torch.Tensor) -> torch.Tensor:
        """W~ = s * (clamp(floor(W/s) + h + z, qmin, qmax) - z)."""
        return dequantize(torch.clamp(self.base + h, self.qmin, self.qmax), self.scale,
                          self.zero_point)

    def hard(self, up: torch.Tensor) -> torch.Tensor:
        """int64 integers clamp(floor(W/s) + up + z, qmin, qmax) for a boolean `up`."""
        return torch.clamp(self.base + up.to(self.base.dtype), self.qmin, self.qmax).to(torch.int64)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """Float32 weight of integers `q` ((q - z) * s, as DequantizeLinear)."""
        return dequantize(q.to(torch.float32), self.scale, self.zero_point)

    def truncation_error(self) -> torch.Tensor:
        """|W - nearest fake-quant(W)| per weight, in weight units (clipping included)."""
        return (self.weight - self.dequantize(self.nearest)).abs()


def regulariser(h: torch.Tensor, b: float) -> torch.Tensor:
    """AdaRound's rounding regulariser sum(1 - |2h - 1|^b): zero iff every h is 0 or 1."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(b)).sum()


def b_schedule(config: AnnealedSettings) -> Callable[[int], float | None]:
    """Regulariser exponent at 0-based step t, or None while the regulariser is off.

    Off for the first `warmup * iters` steps; then b falls linearly from b_start to
    b_end, reaching b_end on the last step.
    """
    start = config.warmup * config.iters
    span = max(config.iters - 1 - start, 1.0)
    b_start, b_end = config.b_start, config.b_end

    def b_at(t: int) -> float | None:
        if t < start:
            return None
        rel = min((t - start) / span, 1.0)
        return b_end + (b_start - b_end) * (1.0 - rel)

    return b_at


def check_problem(problem: LayerProblem, config: LearnedSettings, method: str,
                  loss: ActivationLoss) -> None:
    """Raise EfrapError when the problem cannot be optimized (the config checked itself)."""
    if problem.forward is None or problem.inputs is None or problem.targets is None:
        raise EfrapError(f"{method} needs cached inputs, targets and a forward function "
                         f"(layer {problem.name})")
    if len(problem.inputs) == 0 or len(problem.inputs) != len(problem.targets):
        raise EfrapError(f"layer {problem.name}: {len(problem.inputs)} cached inputs for "
                         f"{len(problem.targets)} targets")
    scale = problem.error_scale
    if scale is not None and (scale.dim() != 1
                              or scale.numel() != problem.weight.shape[problem.channel_axis]):
        raise EfrapError(f"layer {problem.name}: error_scale has {scale.numel()} values for "
                         f"{problem.weight.shape[problem.channel_axis]} output channels")
    present = {
        "output_grads": problem.output_grads is not None,
        "head": problem.head is not None and problem.head_targets is not None,
    }
    for need in sorted(loss.needs):
        if not present.get(need, False):
            raise EfrapError(f"loss '{config.loss}' needs the layer's {need} "
                             f"(layer {problem.name})")


def hard_loss(problem: LayerProblem, loss: ActivationLoss, weight: torch.Tensor,
              out_scale: torch.Tensor | None = None) -> float:
    """Mean of the activation loss of a fixed weight (and output step size) over the whole cache."""
    assert problem.forward is not None and problem.inputs is not None
    assert problem.targets is not None
    n = len(problem.inputs)
    row = max(problem.inputs[torch.arange(1)].numel(), problem.targets[torch.arange(1)].numel()) * 4
    # Chunks of at most EVAL_BYTES of inputs or of outputs: the forward's intermediates and the
    # loss are output-sized, and a large layer's cache may live on disk.
    chunk = int(max(1, min(EVAL_CHUNK, EVAL_BYTES // max(row, 1))))
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, chunk):
            idx = torch.arange(i, min(i + chunk, n), device=weight.device)
            x = problem.inputs[idx].to(weight.device)
            pred = problem.forward(x, weight) if out_scale is None else problem.forward(x, weight, out_scale)
            # Every loss is a mean over samples: weight each chunk by its size.
            total += float(loss(pred, problem.targets[idx].to(weight.device), idx, problem)) * len(idx)
    return total / n


@dataclass(frozen=True, eq=False)
class RoundingTerms:
    """AdaRound's and EFRAP's terms: the annealed rounding regulariser and the method's penalty.

    Attributes:
        reg_weight: Weight of the regulariser sum(1 - |2h - 1|^b) (0: never added).
        b_at: The regulariser's exponent at each step, None while it is off (`b_schedule`).
        penalty: The method's extra term (EFRAP's flip term), or None.
    """

    reg_weight: float
    b_at: Callable[[int], float | None]
    penalty: Penalty | None = None
    names: ClassVar[tuple[str, ...]] = ("round", "flip")

    def __call__(self, step: int, v: torch.Tensor, relaxed: torch.Tensor) -> dict[str, torch.Tensor]:
        """The regulariser once warm-up is over, then the penalty, on h(V) = `relaxed`."""
        out: dict[str, torch.Tensor] = {}
        b = self.b_at(step)
        if b is not None and self.reg_weight > 0.0:
            out["round"] = self.reg_weight * regulariser(relaxed, b)
        if self.penalty is not None:
            out["flip"] = self.penalty(v, relaxed)
        return out


def optimize_rounding(
    problem: LayerProblem,
    config: LearnedSettings,
    rounding: Parametrisation,
    method: str,
    terms: Callable[[LayerGrid], LossTerms | None] | None = None,
    progress: ProgressCallback | None = None,
    act_lr: float = 0.0,
) -> RoundingResult:
    """Learn the variables of one layer's weights, the loop every learned method runs.

    Args:
        problem: The layer, its grid and its cached data.
        config: Iterations, batch size, learning rate, loss, sampling, patience.
        rounding: How the variables become weights and integers.
        method: Method name, for error messages.
        terms: Builds the method's loss terms from the grid (None: the reconstruction alone).
        progress: Called about every 1% of the steps with the current loss terms.
        act_lr: Learning rate of the layer's output step size, learned with the variables
            (`OutputStepSize`); 0 keeps the calibrated one.

    Returns:
        Integers in [qmin, qmax] and stats: flip_fraction (share of integers that differ
        from nearest), the parametrisation's figures, steps, rows, the last step's loss
        terms (rec and each of the method's), the activation loss of the nearest and of
        the final integers over the whole cache (rec_nearest, rec_final), and seconds.
    """
    loss_fn = get_loss(config.loss)
    check_problem(problem, config, method, loss_fn)
    t0 = time.perf_counter()
    if config.samples == "positions" and problem.positions is not None and not loss_fn.needs:
        problem = problem.positions(config.pool, derive(problem.seed, "positions"))
    assert problem.forward is not None and problem.inputs is not None
    assert problem.targets is not None
    device = problem.weight.device
    inputs, targets, forward = problem.inputs, problem.targets, problem.forward
    grid = LayerGrid.build(problem.weight, problem.qparams)
    extra = terms(grid) if terms is not None else None

    v = rounding.start(grid).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=config.lr)
    step_size = OutputStepSize.start(problem, act_lr)
    gen = torch.Generator(device=device)
    gen.manual_seed(problem.seed)
    n = len(inputs)
    batch = min(config.batch_size, n)
    every = max(1, config.iters // 100)
    zero = torch.zeros((), device=device)
    rec = zero
    # Each term's last value: a term not added yet (the regulariser in warm-up) reads 0.
    last = dict.fromkeys(extra.names if extra is not None else (), zero)
    stop = EarlyStop(config, every, lambda v: rounding.decide(grid, v))

    step = 0
    while step < config.iters:
        step += 1
        idx = torch.randperm(n, generator=gen, device=device)[:batch]
        weight, relaxed = rounding.relax(grid, v)
        x = inputs[idx].to(device)
        pred = forward(x, weight) if step_size is None else forward(x, weight, step_size.scale)
        rec = loss_fn(pred, targets[idx].to(device), idx, problem)
        loss = rec
        if extra is not None:
            for name, term in extra(step - 1, v, relaxed).items():
                last[name] = term
                loss = loss + term
        opt.zero_grad(set_to_none=True)
        if step_size is not None:
            step_size.zero_grad()
        loss.backward()
        opt.step()
        if step_size is not None:
            step_size.step(step, config.iters)
        if progress is not None and (step % every == 0 or step == config.iters):
            progress(step, {"rec": rec.item(), **{name: term.item() for name, term in last.items()}})
        if stop.settled(step, v):
            break

    with torch.no_grad():
        q = rounding.hard(grid, v)
        flip_fraction = (q != grid.nearest).to(torch.float32).mean().item()
        figures = rounding.figures(grid, q)
    learned = step_size.final() if step_size is not None else None
    stats = {
        "flip_fraction": flip_fraction,
        **figures,
        "steps": float(step),
        "rows": float(len(inputs)),
        "rec": rec.item(),
        **{name: term.item() for name, term in last.items()},
        "rec_nearest": hard_loss(problem, loss_fn, grid.dequantize(grid.nearest)),
        "rec_final": hard_loss(problem, loss_fn, grid.dequantize(q), learned),
    }
    if step_size is not None:
        stats["output_scale_ratio"] = float(learned) / float(step_size.initial)
    stats["seconds"] = time.perf_counter() - t0
    return RoundingResult(q=q, stats=stats,
                          output_scale=float(learned) if learned is not None else None)


class EarlyStop:
    """Stops a layer once its hard rounding has settled (`LearnedSettings.patience`).

    From the middle of the schedule on (the regulariser and the step-size decay have had
    half their course), the hard rounding (`decide` of V: for AdaRound and EFRAP the signs
    of V) is compared every `every` steps; after `patience` consecutive checks without a
    change, the layer stops. With patience 0 it never does.
    """

    def __init__(self, config: LearnedSettings, every: int,
                 decide: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.patience = config.patience
        self.start = config.iters // 2
        self.every = every
        self.decide = decide
        self.last: torch.Tensor | None = None
        self.calm = 0

    def settled(self, step: int, v: torch.Tensor) -> bool:
        """Whether to stop after `step` (checked every `every` steps past the start)."""
        if self.patience == 0 or step < self.start or step % self.every:
            return False
        with torch.no_grad():
            choice = self.decide(v)
        self.calm = self.calm + 1 if self.last is not None and torch.equal(choice, self.last) else 0
        self.last = choice
        return self.calm >= self.patience


class OutputStepSize:
    """The layer's output step size, learned with the rounding (the release's scale_lr).

    The release learns each reconstructed block's output activation step size with its
    own Adam (lr 4e-5) and a cosine decay to 0 over the iterations; the gradient reaches
    it through the straight-through fake quantization (LSQ's estimator). The zero point
    stays as calibrated.
    """

    def __init__(self, initial: float, lr: float, device: torch.device) -> None:
        self.initial = torch.tensor(initial, dtype=torch.float32, device=device)
        self.scale = self.initial.clone().requires_grad_(True)
        self.lr = lr
        self.opt = torch.optim.Adam([self.scale], lr=lr)

    @classmethod
    def start(cls, problem: LayerProblem, lr: float) -> OutputStepSize | None:
        """A learned step size when `lr` is positive and the layer has a per-tensor output grid."""
        qp = problem.output_qparams
        if lr <= 0.0 or qp is None or np.asarray(qp.scale).size != 1:
            return None
        return cls(float(np.asarray(qp.scale).reshape(())), lr, problem.weight.device)

    def zero_grad(self) -> None:
        """Clear the step size's gradient."""
        self.opt.zero_grad(set_to_none=True)

    def step(self, step: int, iters: int) -> None:
        """One Adam step at the cosine-decayed learning rate; the size stays positive."""
        for group in self.opt.param_groups:
            group["lr"] = 0.5 * self.lr * (1.0 + math.cos(math.pi * step / iters))
        self.opt.step()
        with torch.no_grad():
            self.scale.clamp_(min=1e-8)

    def final(self) -> torch.Tensor:
        """The learned step size, rounded to float32 as the model stores it."""
        return self.scale.detach().to(torch.float32)


class LearnedRounding:
    """Base of the learned methods: a parametrisation and its loss terms, run by the shared loop.

    Subclasses set `name`, `parametrisation` and `defaults` (an instance of the method's
    own settings class, the only kind it accepts) and may override `terms` and `output_lr`.
    """

    name: str = "learned"
    parametrisation: Parametrisation = PLAIN_SIGMOID
    defaults: LearnedSettings

    def settings(self, config: RoundingSettings) -> LearnedSettings:
        """`config`, refused unless it is this method's own kind of settings."""
        return own_settings(self.name, config, type(self.defaults))

    def needs(self, config: RoundingSettings) -> frozenset[str]:
        """Cached data, plus whatever the activation-preservation loss reads."""
        return frozenset({"data"}) | get_loss(self.settings(config).loss).needs

    def terms(self, grid: LayerGrid, problem: LayerProblem, config: LearnedSettings) -> LossTerms | None:
        """The method's loss terms beyond the reconstruction (none by default)."""
        return None

    def output_lr(self, config: LearnedSettings) -> float:
        """Learning rate of the layer's output step size (0 by default: as calibrated)."""
        return 0.0

    def __call__(self, problem: LayerProblem, config: RoundingSettings,
                 progress: ProgressCallback | None = None) -> RoundingResult:
        """Round `problem.weight` by optimizing the parametrisation on the cached data."""
        own = self.settings(config)
        return optimize_rounding(problem, own, self.parametrisation, self.name,
                                 lambda grid: self.terms(grid, problem, own), progress,
                                 self.output_lr(own))


class UpDownRounding(LearnedRounding):
    """AdaRound and EFRAP: soft up/down rounding under the annealed regulariser.

    Subclasses may add a penalty (`penalty`, EFRAP's flip term).
    """

    defaults: AnnealedSettings

    def penalty(self, grid: LayerGrid, problem: LayerProblem,
                config: AnnealedSettings) -> Penalty | None:
        """The method's extra loss term (none by default)."""
        return None

    def terms(self, grid: LayerGrid, problem: LayerProblem, config: LearnedSettings) -> LossTerms | None:
        """The regulariser of `config`'s schedule, then the penalty."""
        assert isinstance(config, AnnealedSettings)
        return RoundingTerms(config.reg_weight, b_schedule(config), self.penalty(grid, problem, config))
