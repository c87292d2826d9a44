"""The interface every rounding method implements.

A rounding method turns one layer's float weight into integers on a fixed grid
(scale and zero point already chosen by the observer). Nearest rounding needs
nothing else; learned methods (AdaRound, EFRAP, LAC) also get the layer's cached
inputs from the partly quantized network, the full-precision targets, and a
differentiable forward function of the layer, built by the graph driver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from pipeline.base import checks, limits
from pipeline.base.errors import EfrapError
from pipeline.qmath import QParams


class Rows(Protocol):
    """N cached samples that an index tensor selects (a tensor, or rows kept on disk)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor: ...


#: Progress of a learned method: (step, named loss terms).
ProgressCallback = Callable[[int, dict[str, float]], None]

#: What a method can ask the orchestrator for (`RoundingMethod.needs`):
#: cached layer inputs/targets and a forward function ("data"), each folded conv's
#: BatchNorm factors ("bn_factors"), what a loss reads ("output_grads", "head"), and one
#: setting chosen by measuring the whole quantized model on clean held-out images ("search":
#: the method is then a pipeline.rounding.search.Searched, e.g. QVec's scale).
NEEDS = frozenset({"data", "bn_factors", "output_grads", "head", "search"})
ERROR_MODES = ("element", "neuron")
ERROR_UNITS = ("pre_bn", "exported", "steps")
#: What one optimization step's batch holds: whole cached images (the release) or rows of
#: (image, position) pairs drawn from a per-layer pool (pipeline.positions; 2-D convs only).
SAMPLES = ("images", "positions")
#: The activation-preservation losses' names (their registry: pipeline.rounding.losses.LOSSES),
#: here so a settings check refuses an unknown loss before any work starts.
LOSS_NAMES = ("mse", "fisher", "pd")
#: Largest pool of (image, position) rows per layer, and the pool's size by default.
MAX_POOL = limits.POOL.high
POOL = 32_768


class RoundingSettings:
    """What the settings of every rounding method hold: rare-unit pruning.

    Each method has its own frozen dataclass of settings (`RoundingMethod.defaults` is one),
    deriving from this class or from `LearnedSettings`/`AnnealedSettings` below, which hold
    the rules (checked once, in `__post_init__`) but no fields: each dataclass declares its
    fields itself, in the order it is written out (`dataclasses.asdict`: a model's
    efrap.rounding, a summary's settings, a checkpoint's key).

    Attributes:
        prune_rare: Rare-unit pruning after rounding (pipeline.rare_units): the weights
            reading the input units that fire on the fewest calibration images, together
            on at most this share of them, are set to zero; 0 turns it off. It needs the
            cached inputs, so it works with any method (nearest included).
    """

    prune_rare: float

    def __post_init__(self) -> None:
        checks.finite(self.prune_rare, "prune_rare", low=0.0)
        if self.prune_rare >= 1.0:
            raise EfrapError(f"prune_rare must be below 1, got {self.prune_rare:g}")


class LearnedSettings(RoundingSettings):
    """The settings every learned method has (AdaRound, EFRAP, LAC): the shared loop's.

    Attributes:
        iters: Optimization steps per layer.
        batch_size: Cached samples per step.
        lr: Adam learning rate on the method's variables.
        loss: Name of the activation-preservation loss (see pipeline.rounding.losses).
        samples: "images" (each step's batch is `batch_size` whole cached images, the
            release) or "positions" (each step's batch is `batch_size` rows of a pool of
            about `pool` (image, position) rows drawn from every calibration image, for
            2-D convs under the "mse" loss; other layers keep whole images). A step then
            costs batch_size times the layer's weights, whatever the image size.
        pool: Rows of the per-layer pool when samples is "positions".
        patience: Stop a layer early once its hard rounding has not changed over this
            many consecutive checks, one check every 1% of the steps after the first half
            of them; 0 runs every step.

    The batches are sampled with a seed the orchestrator derives from the run's one
    seed for each layer (`LayerProblem.seed`), not with a setting of their own.
    """

    iters: int
    batch_size: int
    lr: float
    loss: str
    samples: str
    pool: int
    patience: int

    def __post_init__(self) -> None:
        limits.ITERS.check(self.iters, "iters")
        limits.BATCH.check(self.batch_size, "batch_size")
        checks.finite(self.lr, "lr", low=0.0, low_open=True)
        checks.string(self.loss, "loss", LOSS_NAMES)
        super().__post_init__()
        checks.string(self.samples, "samples", SAMPLES)
        limits.POOL.check(self.pool, "pool")
        limits.PATIENCE.check(self.patience, "patience")


class AnnealedSettings(LearnedSettings):
    """A learned up/down rounding's settings (AdaRound, EFRAP): the rounding regulariser.

    Attributes:
        reg_weight: Weight of the rounding regulariser sum(1 - |2h - 1|^b).
        b_start: Regulariser exponent at the end of warm-up (annealed to b_end).
        b_end: Final regulariser exponent.
        warmup: Fraction of iterations without the regulariser (and without annealing).
    """

    reg_weight: float
    b_start: float
    b_end: float
    warmup: float

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.finite(self.reg_weight, "reg_weight", low=0.0)
        checks.finite(self.b_start, "b_start", low=0.0, low_open=True)
        checks.finite(self.b_end, "b_end", low=0.0, low_open=True)
        checks.finite(self.warmup, "warmup", low=0.0)
        if self.warmup >= 1.0:
            raise EfrapError(f"warmup must be below 1, got {self.warmup:g}")


#: One method's settings class.
Settings = TypeVar("Settings", bound=RoundingSettings)


def own_settings(method: str, config: RoundingSettings, kind: type[Settings]) -> Settings:
    """`config` when it is method `method`'s own kind of settings; refused otherwise.

    A method given another's settings (EFRAP's to AdaRound) would silently ignore the
    fields it lacks, so the kinds must match exactly (no subclass).
    """
    if type(config) is not kind:
        raise EfrapError(f"method '{method}' takes {kind.__name__}, got {type(config).__name__}")
    return config


@dataclass
class LayerProblem:
    """One layer to round.

    Attributes:
        name: Layer (node) name, for progress and reports.
        weight: float32 full-precision weight as exported (BN folded).
        qparams: The weight's grid; per-channel parameters lie along `qparams.axis`.
        forward: Differentiable map (input batch, float weight[, output step size]) ->
            layer output, the output quantizer included (with the given step size when
            one is passed); None when the method needs no data.
        inputs: Cached layer inputs from the partly quantized network, [N, ...]: a tensor
            on the working device, or rows on disk read by index (large caches).
        targets: Full-precision layer outputs for the same samples, [N, ...], likewise.
        output_grads: Gradient of the FP task loss with respect to the layer's FP
            output, [N, ...]; only for losses that need it (Fisher-weighted).
        head: Differentiable map layer output -> logits through the rest of the FP
            network; only for losses that need it (prediction difference).
        head_targets: FP logits for the same samples, [N, classes].
        channel_axis: Axis of the weight holding output channels (also for per-tensor
            grids, where `qparams.axis` is None).
        error_scale: Per-output-channel multiplier that turns the exported weight's
            truncation errors into pre-BN units (1/|BN factor|), or None when the
            model records no BN factor for this layer.
        seed: Seeds the method's random choices for this layer (batch sampling).
        output_qparams: The grid of the layer's output quantizer (None when the output
            stays float), for methods that learn its step size.
        positions: (rows, seed) -> the same problem over a pool of about `rows` sampled
            (image, position) rows (pipeline.positions); None where the layer is not a 2-D
            conv or the loss looks past the layer.
    """

    name: str
    weight: torch.Tensor
    qparams: QParams
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    inputs: Rows | None = None
    targets: Rows | None = None
    output_grads: torch.Tensor | None = None
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    head_targets: torch.Tensor | None = None
    channel_axis: int = 0
    error_scale: torch.Tensor | None = None
    seed: int = 0
    output_qparams: QParams | None = None
    positions: Callable[[int, int], LayerProblem] | None = None


@dataclass
class RoundingResult:
    """Integer weights and what the method measured while finding them.

    Attributes:
        q: int64 tensor of integers in [qmin, qmax], shape of the weight.
        stats: Named figures (flip_fraction, final loss terms, seconds).
        notes: Named facts about how the layer was treated (EFRAP: "error_units"),
            recorded per layer in the output's metadata as efrap.<name>.
        output_scale: A learned step size for the layer's output quantizer, or None.
    """

    q: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    output_scale: float | None = None


class RoundingMethod(Protocol):
    """A rounding method: nearest, AdaRound, EFRAP, ..."""

    name: str
    #: The method's own default settings (EFRAP's release values, AdaRound's paper), of
    #: the method's own settings class: the only kind it accepts (`own_settings`).
    defaults: RoundingSettings

    def needs(self, config: RoundingSettings) -> frozenset[str]:
        """What the orchestrator must put into each LayerProblem (a subset of NEEDS)."""
        ...

    def __call__(self, problem: LayerProblem, config: RoundingSettings,
                 progress: ProgressCallback | None = None) -> RoundingResult:
        """Round `problem.weight` onto `problem.qparams`'s grid, reporting progress."""
        ...
