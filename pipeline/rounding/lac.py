"""LAC (Li et al., ICML 2024): layer-wise activation correction.

"Purifying Quantization-conditioned Backdoors via Layer-wise Activation Correction
with Distribution Approximation", the EFRAP authors' follow-up (public code
AntigoneRandy/QCB-LACPDA). EFRAP and AdaRound only choose up or down for every
weight; LAC instead learns a continuous additive offset A (same shape as W,
initialised to 0) and quantizes the shifted weight with a straight-through round:

    W_q = s * (clamp(round((W + A) / s) + z, qmin, qmax) - z)

A is trained by Adam on the layer-wise reconstruction loss alone (no rounding
regulariser, no flip penalty): the same activation-preservation losses as
AdaRound/EFRAP (pipeline.rounding.losses). The gradient passes through the round
unchanged (qmath.round_ste) and stops where the clamp saturates, as in qmath's
fake quant. The final integers are

    q = clamp(round((W + A) / s) + z, qmin, qmax),

which, unlike AdaRound/EFRAP, may lie more than one step from nearest rounding.
With A = 0 they are exactly the nearest integers (the same float32 division and
round half to even as QuantizeLinear).

Left out or different here, and why:

- LAC's optional distribution-approximation step nudges the cached quantized
  inputs of a layer (sign-gradient steps within a small L-inf ball) so that their
  statistics match the BatchNorm running statistics. This pipeline folds
  BatchNorm into the exported weights (pipeline.bn_fold) and samples each layer's
  inputs from the partly quantized model in onnxruntime: the graph a layer's
  inputs come from has no BatchNorm left whose statistics they could be matched
  to, so the step is left out.
- A lives in the units of the exported weight (BatchNorm folded). Adam moves each
  entry by about lr per step whatever the gradient's size, so a weight can travel
  about lr * iters / s grid steps: training on a conv weight before folding (BN
  factor |f| = |gamma| / sqrt(var + eps), folded scale |f| * s) would move it |f|
  times as many.
- The loop is the one AdaRound and EFRAP run (pipeline.rounding.learned), so LAC
  also takes its (image, position) sampling and early stop (samples, pool,
  patience); the release has neither, and the defaults (whole images, patience 0)
  are the release's.

Known behaviour: the straight-through gradient ignores the cost of a whole grid
step, so offsets of weights whose best integer is already the nearest one drift to
the rounding boundary and oscillate there; on a layer whose cached inputs equal the
FP inputs the final integers can reconstruct worse than nearest. LAC pays off where
the cached inputs carry upstream quantization error for the weights to undo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.qmath import dequantize, quantize
from pipeline.rounding.base import POOL, LearnedSettings
from pipeline.rounding.learned import LayerGrid, LearnedRounding


@dataclass(frozen=True)
class LacConfig(LearnedSettings):
    """LAC's settings: the shared loop's and nothing else (no regulariser, no penalty);
    `LearnedSettings` and `RoundingSettings` say what each field means. The defaults are
    the release's: 10,000 Adam steps per layer at lr 1e-3, batch 32, the channel-summed
    MSE reconstruction."""

    iters: int = 10_000
    batch_size: int = 32
    lr: float = 1e-3
    loss: str = "mse"
    prune_rare: float = 0.0
    samples: str = "images"
    pool: int = POOL
    patience: int = 0


#: The release's settings.
LAC_DEFAULTS = LacConfig()


def lac_integers(grid: LayerGrid, offset: torch.Tensor) -> torch.Tensor:
    """Integers clamp(round((W + A) / s) + z, qmin, qmax) as float32, with LAC's gradient.

    qmath.quantize divides (never multiplies by 1/s) and rounds half to even, so with
    A = 0 these are exactly the nearest integers; its round is straight-through and its
    clamp stops the gradient outside the grid.
    """
    return quantize(grid.weight + offset, grid.scale, grid.zero_point, grid.qmin, grid.qmax)


class OffsetRounding:
    """LAC's parametrisation: V is the additive offset A, the weight W + A rounded to nearest."""

    def start(self, grid: LayerGrid) -> torch.Tensor:
        """A = 0: the nearest integers."""
        return torch.zeros_like(grid.weight)

    def relax(self, grid: LayerGrid, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the fake-quantized weight of W + A, its integers as float32)."""
        q = lac_integers(grid, v)
        return dequantize(q, grid.scale, grid.zero_point), q

    def decide(self, grid: LayerGrid, v: torch.Tensor) -> torch.Tensor:
        """The integers of W + A."""
        return lac_integers(grid, v)

    def hard(self, grid: LayerGrid, v: torch.Tensor) -> torch.Tensor:
        """The integers of W + A, int64."""
        return lac_integers(grid, v).to(torch.int64)

    def figures(self, grid: LayerGrid, q: torch.Tensor) -> dict[str, float]:
        """max_step: the largest |q - nearest| (LAC may move a weight several steps)."""
        moved = (q - grid.nearest).abs()
        return {"max_step": float(moved.max().item()) if moved.numel() else 0.0}


#: LAC's parametrisation (it has no settings of its own).
OFFSET = OffsetRounding()


class Lac(LearnedRounding):
    """LAC: a learned additive weight offset under straight-through rounding.

    A parametrisation (`OFFSET`: W + A, rounded to nearest) and the reconstruction loss
    alone, run by the shared loop (`optimize_rounding`: the same batches, Adam, progress,
    sampling and early stopping as AdaRound and EFRAP). Its stats add max_step (the
    largest |q - nearest|) to the loop's; its progress reports the batch loss, rec.
    """

    name = "lac"
    parametrisation = OFFSET
    defaults = LAC_DEFAULTS
