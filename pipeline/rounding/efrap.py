"""EFRAP (CVPR 2024): error-guided flipped rounding with activation preservation.

Nearest rounding is what wakes a quantization-conditioned backdoor, and the
planted signal sits in the truncation errors. EFRAP learns a rounding that
flips weights with large truncation errors away from nearest while a layer-wise
reconstruction keeps clean accuracy. As released:

- h(V) = sigmoid(V) (gamma = 0, zeta = 1), V = logit(frac(W/s)) (clamped finite);
- loss = rec + reg_weight * sum(1 - |2h - 1|^b), b = 2 fixed,
  + flip_weight * sum_ij e_ij * BCE(h_ij, t_ij), a sum over weights (not a mean);
- e_ij = |W_ij - nearest_fakequant(W_ij)|, clipping included, in weight units;
- t_ij = the direction opposite to nearest rounding (1: up, 0: down).

The release writes t = 1 - round(frac(W/s)) with round half to even, which points
the same way as nearest on exact ties with an odd floor; here t is the opposite of
the integer nearest rounding actually picks, which differs only on those ties.

The release rounds the conv weight before BatchNorm (BN runs in float), so its
e_ij is in those units. An exported model has BN folded, which multiplies each
output channel's errors by |f| = |gamma| / sqrt(var + eps); with error_units
"pre_bn" (default) and the factors recorded in the model (pipeline.bn_fold), e is
divided by |f| so the penalty weighs what the release weighs. The integers and
the reconstruction are unchanged by folding (per-channel grids absorb f).

error_mode "neuron" replaces e_ij by the L2 norm of the truncation errors of the
weight's output channel (the same value for every weight of the channel): the
paper's text ("neuron-wise truncation error norms"), not the release.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from pipeline.base import checks
from pipeline.base.errors import EfrapError
from pipeline.rounding.base import (
    ERROR_MODES,
    ERROR_UNITS,
    POOL,
    AnnealedSettings,
    LayerProblem,
    LearnedSettings,
    ProgressCallback,
    RoundingResult,
    RoundingSettings,
    own_settings,
)
from pipeline.rounding.learned import PLAIN_SIGMOID, LayerGrid, Penalty, UpDownRounding


@dataclass(frozen=True)
class EfrapConfig(AnnealedSettings):
    """EFRAP's settings: AdaRound's, and the flip penalty's, the guard's and the output step size's.

    The fields keep the order in which runs have always written EFRAP's settings out
    (efrap.rounding, checkpoint keys); `AnnealedSettings`, `LearnedSettings` and
    `RoundingSettings` say what the fields they share mean. The defaults are the
    release's but for the output step size, kept as calibrated (act_lr 0; `EFRAP_RELEASE`
    learns it).

    Attributes:
        flip_weight: Weight of EFRAP's error-guided flip penalty.
        error_mode: "element" (the release: each weight's own truncation error) or
            "neuron" (the paper's text: the output channel's error norm).
        error_units: "pre_bn" (the release: truncation errors in the units of the conv
            weight before BatchNorm folding, when the model records its BN factors),
            "exported" (in the units of the exported, folded weight) or "steps" (in grid
            steps, |W/s - nearest| in [0, 0.5]: the same whatever the weight's scale, the
            grid's width or whether BatchNorm was folded).
        act_lr: Learning rate of the layer's output activation step size, learned with
            the rounding (Adam, cosine decay to 0, as the release's scale_lr); 0 keeps
            the calibrated step size.
        rec_guard: EFRAP's per-layer guard: when the final integers' reconstruction
            loss exceeds rec_guard times nearest rounding's, the layer is rounded again
            with half the flip weight (at most GUARD_RETRIES times); 0 turns it off.
    """

    iters: int = 10_000
    batch_size: int = 32
    lr: float = 1e-3
    reg_weight: float = 0.01
    b_start: float = 2.0
    b_end: float = 2.0
    warmup: float = 0.0
    flip_weight: float = 1.0
    error_mode: str = "element"
    loss: str = "mse"
    error_units: str = "pre_bn"
    act_lr: float = 0.0
    rec_guard: float = 0.0
    prune_rare: float = 0.0
    samples: str = "images"
    pool: int = POOL
    patience: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.finite(self.flip_weight, "flip_weight", low=0.0)
        checks.string(self.error_mode, "error_mode", ERROR_MODES)
        checks.string(self.error_units, "error_units", ERROR_UNITS)
        checks.finite(self.act_lr, "act_lr", low=0.0)
        checks.finite(self.rec_guard, "rec_guard", low=0.0)
        if 0.0 < self.rec_guard < 1.0:
            raise EfrapError(f"rec_guard must be 0 (off) or at least 1, got {self.rec_guard:g}")


#: The release's settings (W4A4 config), the `release` preset: 10,000 Adam steps at lr
#: 1e-3, batch 32, regulariser 0.01 with b = 2 from the first step, flip penalty weight 1,
#: element-wise errors in the conv weight's pre-BN units, channel-summed MSE reconstruction,
#: and each layer's output activation step size learned at scale_lr 4e-5 (cosine decay).
EFRAP_RELEASE = EfrapConfig(
    iters=10_000,
    batch_size=32,
    lr=1e-3,
    reg_weight=0.01,
    b_start=2.0,
    b_end=2.0,
    warmup=0.0,
    flip_weight=1.0,
    error_mode="element",
    loss="mse",
    error_units="pre_bn",
    act_lr=4e-5,
)

#: The project's default defense, the `default` preset (docs/DEFENSE.md): the release's
#: algorithm with each weight's truncation error measured in grid steps (|W/s - nearest|,
#: in [0, 0.5]) and a flip weight of 0.02, the step size of the release's ordinary 4-bit
#: layers, so the flip pressure the release puts on ordinary grids stays, and no longer
#: grows with the grid's coarseness (an inflated or pinned grid) or the weight's scale.
#: The output step sizes stay as calibrated. After each layer is rounded, rare-unit
#: pruning (pipeline.rare_units) zeroes the weights reading the input units that fire on the
#: fewest calibration images, together on at most 3% of them: the reconstruction cannot see
#: those weights, and the dormant and EFRAP-aware attacks hide their backdoor there.
EFRAP_DEFAULT = replace(EFRAP_RELEASE, error_units="steps", flip_weight=0.02, act_lr=0.0,
                        prune_rare=0.03)

#: The default rule at a cost that follows the layer's weights, not its pixels (docs/DEFENSE.md,
#: "fast", the second candidate): each step's batch is 256 (image, position) rows of a conv's
#: pool of 32,768 drawn from every calibration image (pipeline.positions) instead of 32 whole
#: images; a fifth of the steps at five times the learning rate, so V can travel as far as in
#: 10,000 steps at 1e-3; a layer stops once its hard rounding has not changed over 5 checks in
#: the second half.
EFRAP_FAST = replace(EFRAP_DEFAULT, iters=2_000, lr=5e-3, batch_size=256, samples="positions",
                     pool=32_768, patience=5)

#: Named EFRAP settings (`efrap defend --preset`).
EFRAP_PRESETS: dict[str, EfrapConfig] = {"default": EFRAP_DEFAULT, "release": EFRAP_RELEASE,
                                            "fast": EFRAP_FAST}


def flip_targets(grid: LayerGrid) -> torch.Tensor:
    """1.0 where nearest rounds down (so the flip is up), 0.0 where it rounds up."""
    with torch.no_grad():
        nearest_up = torch.round(grid.weight / grid.scale) - (grid.base - grid.zero_point)
        return 1.0 - nearest_up


def error_weights(grid: LayerGrid, mode: str, channel_axis: int,
                  channel_scale: torch.Tensor | None = None, steps: bool = False) -> torch.Tensor:
    """Per-weight flip weights e: own truncation error ("element") or channel norm ("neuron").

    Args:
        grid: The layer's grid.
        mode: "element" or "neuron".
        channel_axis: Output-channel axis of the weight.
        channel_scale: Optional per-output-channel multiplier of the errors (pre-BN units).
        steps: Measure the errors in grid steps (divided by the scale) instead.
    """
    err = grid.truncation_error() / grid.scale if steps else grid.truncation_error()
    if channel_scale is not None:
        shape = [1] * err.dim()
        shape[channel_axis] = -1
        err = err * channel_scale.to(err.device, torch.float32).reshape(shape)
    if mode == "element":
        return err
    dims = [d for d in range(err.dim()) if d != channel_axis]
    if not dims:
        return err
    return torch.linalg.vector_norm(err, dim=dims, keepdim=True).expand_as(err).contiguous()


#: Retries of the per-layer guard (each halves the flip weight).
GUARD_RETRIES = 3


class Efrap(UpDownRounding):
    """EFRAP: reconstruction + rounding regulariser + error-guided flip penalty."""

    name = "efrap"
    parametrisation = PLAIN_SIGMOID
    defaults = EFRAP_DEFAULT

    def settings(self, config: RoundingSettings) -> EfrapConfig:
        """`config`, refused unless it is an `EfrapConfig`."""
        return own_settings(self.name, config, EfrapConfig)

    def needs(self, config: RoundingSettings) -> frozenset[str]:
        """Data for the reconstruction, and BN factors to weigh errors in pre-BN units."""
        extra = {"bn_factors"} if self.settings(config).error_units == "pre_bn" else set()
        return super().needs(config) | extra

    def output_lr(self, config: LearnedSettings) -> float:
        """The release's scale_lr (`EfrapConfig.act_lr`)."""
        return self.settings(config).act_lr

    def error_units(self, problem: LayerProblem, config: EfrapConfig) -> str:
        """"steps" as asked; "pre_bn" when the layer has BN factors to divide by; else "exported"."""
        if config.error_units == "steps":
            return "steps"
        return "pre_bn" if config.error_units == "pre_bn" and problem.error_scale is not None \
            else "exported"

    def penalty(self, grid: LayerGrid, problem: LayerProblem,
                config: AnnealedSettings) -> Penalty | None:
        """flip_weight * sum(e * BCE(sigmoid(V), t)), or None when the weight is 0."""
        config = self.settings(config)
        if config.flip_weight == 0.0:
            return None
        # The problem names the output-channel axis even for per-tensor grids, as the
        # neuron-wise norm groups by output channel whatever the grid's granularity.
        units = self.error_units(problem, config)
        scale = problem.error_scale if units == "pre_bn" else None
        e = error_weights(grid, config.error_mode, problem.channel_axis, scale, steps=units == "steps")
        t = flip_targets(grid)
        weight = config.flip_weight

        def flip(v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            # h = sigmoid(V): BCE on the logits is the same loss without log(0) at h = 0 or 1.
            return weight * F.binary_cross_entropy_with_logits(v, t, weight=e, reduction="sum")

        return flip

    def __call__(self, problem: LayerProblem, config: RoundingSettings,
                 progress: ProgressCallback | None = None) -> RoundingResult:
        """The shared loop with the flip penalty, under the per-layer guard when one is set.

        The guard (config.rec_guard = kappa >= 1): when the final integers reconstruct the
        layer's FP output worse than kappa times nearest rounding does, the flips cost
        more accuracy than the layer can give, and the layer is rounded again with half
        the flip weight, at most GUARD_RETRIES times; the last try stands.
        """
        config = self.settings(config)
        weight = config.flip_weight
        halvings = 0
        result = super().__call__(problem, config, progress)
        while (config.rec_guard > 0.0 and halvings < GUARD_RETRIES and weight > 0.0
               and result.stats["rec_final"] > config.rec_guard * result.stats["rec_nearest"]):
            halvings += 1
            weight /= 2.0
            result = super().__call__(problem, replace(config, flip_weight=weight), progress)
        result.notes["error_units"] = self.error_units(problem, config)
        if config.rec_guard > 0.0:
            result.stats["guard_halvings"] = float(halvings)
        return result
