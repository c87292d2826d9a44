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

Known behaviour: the straight-through gradient ignores the cost of a whole grid
step, so offsets of weights whose best integer is already the nearest one drift to
the rounding boundary and oscillate there; on a layer whose cached inputs equal the
FP inputs the final integers can reconstruct worse than nearest. LAC pays off where
the cached inputs carry upstream quantization error for the weights to undo.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pipeline.qmath import dequantize, quantize
from pipeline.rounding.base import (
    LayerProblem,
    ProgressCallback,
    RoundingConfig,
    RoundingResult,
)
from pipeline.rounding.learned import LayerGrid, check_problem, hard_loss
from pipeline.rounding.losses import get_loss

#: The release's settings: 10,000 Adam steps per layer at lr 1e-3, batch 32, the
#: channel-summed MSE reconstruction and nothing else. LAC ignores reg_weight, b_start,
#: b_end, warmup, flip_weight, error_mode and error_units (they are AdaRound's and
#: EFRAP's); reg_weight and flip_weight are 0 here so that a summary of the settings
#: does not suggest terms that were never added.
LAC_DEFAULTS = RoundingConfig(
    iters=10_000,
    batch_size=32,
    lr=1e-3,
    reg_weight=0.0,
    flip_weight=0.0,
    loss="mse",
)


def batch_sampler(problem: LayerProblem, batch_size: int,
                  device: torch.device) -> Callable[[], torch.Tensor]:
    """Draws the cache indices of each step, exactly as `optimize_rounding` does.

    A generator on the working device seeded with `problem.seed`, and a fresh random
    permutation of the cache per step cut to the batch size, so that LAC, AdaRound and
    EFRAP see the same batches for the same layer and seed.

    Args:
        problem: The layer; its cache size and seed are read.
        batch_size: Samples per step (capped at the cache size).
        device: The working device (the generator must live where randperm runs).

    Returns:
        A function returning the next batch's indices (int64, on `device`).
    """
    assert problem.inputs is not None
    gen = torch.Generator(device=device)
    gen.manual_seed(problem.seed)
    n = len(problem.inputs)
    batch = min(batch_size, n)

    def draw() -> torch.Tensor:
        return torch.randperm(n, generator=gen, device=device)[:batch]

    return draw


def lac_integers(grid: LayerGrid, offset: torch.Tensor) -> torch.Tensor:
    """Integers clamp(round((W + A) / s) + z, qmin, qmax) as float32, with LAC's gradient.

    qmath.quantize divides (never multiplies by 1/s) and rounds half to even, so with
    A = 0 these are exactly the nearest integers; its round is straight-through and its
    clamp stops the gradient outside the grid.
    """
    return quantize(grid.weight + offset, grid.scale, grid.zero_point, grid.qmin, grid.qmax)


class Lac:
    """LAC: a learned additive weight offset under straight-through rounding.

    A parametrisation (W + A, rounded to nearest) plus the reconstruction loss, with
    the loop of `optimize_rounding` (batches, Adam, progress) written out for the
    offset, which is not an up/down choice.
    """

    name = "lac"
    defaults = LAC_DEFAULTS

    def needs(self, config: RoundingConfig) -> frozenset[str]:
        """Cached data, plus whatever the activation-preservation loss reads."""
        return frozenset({"data"}) | get_loss(config.loss).needs

    def __call__(self, problem: LayerProblem, config: RoundingConfig,
                 progress: ProgressCallback | None = None) -> RoundingResult:
        """Learn the offset A of one layer on its cached data and round W + A.

        Args:
            problem: The layer, its grid and its cached data.
            config: iters, batch_size, lr and loss are used; the other fields are ignored.
            progress: Called about every 1% of the steps with {"rec": last batch loss}.

        Returns:
            Integers in [qmin, qmax] and stats: flip_fraction (share of integers that
            differ from nearest), max_step (largest |q - nearest|), rec (the last step's
            batch loss), rec_nearest and rec_final (the activation loss of the nearest and
            of the final integers over the whole cache) and seconds.
        """
        loss_fn = get_loss(config.loss)
        check_problem(problem, config, self.name, loss_fn)
        assert problem.forward is not None and problem.inputs is not None
        assert problem.targets is not None
        t0 = time.perf_counter()
        device = problem.weight.device
        inputs, targets, forward = problem.inputs, problem.targets, problem.forward
        grid = LayerGrid.build(problem.weight, problem.qparams)

        offset = torch.zeros_like(grid.weight, requires_grad=True)
        opt = torch.optim.Adam([offset], lr=config.lr)
        draw = batch_sampler(problem, config.batch_size, device)
        every = max(1, config.iters // 100)
        rec = torch.zeros((), device=device)

        for step in range(1, config.iters + 1):
            idx = draw()
            weight = dequantize(lac_integers(grid, offset), grid.scale, grid.zero_point)
            rec = loss_fn(forward(inputs[idx].to(device), weight), targets[idx].to(device), idx, problem)
            opt.zero_grad(set_to_none=True)
            rec.backward()
            opt.step()
            if progress is not None and (step % every == 0 or step == config.iters):
                progress(step, {"rec": rec.item()})

        with torch.no_grad():
            q = lac_integers(grid, offset).to(torch.int64)
            moved = (q - grid.nearest).abs()
            flip_fraction = (moved != 0).to(torch.float32).mean().item()
            max_step = float(moved.max().item()) if moved.numel() else 0.0
        stats = {
            "flip_fraction": flip_fraction,
            "max_step": max_step,
            "rec": rec.item(),
            "rec_nearest": hard_loss(problem, loss_fn, grid.dequantize(grid.nearest)),
            "rec_final": hard_loss(problem, loss_fn, grid.dequantize(q)),
        }
        stats["seconds"] = time.perf_counter() - t0
        return RoundingResult(q=q, stats=stats)
