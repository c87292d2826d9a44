"""Activation-preservation losses for learned rounding.

Each loss compares the layer's output under the soft-rounded weight (`pred`)
with the full-precision output (`target`) on one batch of cached samples, whose
positions in the cache are `index` (so a loss can pick per-sample extras from
the problem). A loss declares the optional `LayerProblem` fields it reads in
`needs`, so the graph driver computes them only when asked:

- "mse": the EFRAP/AdaRound release's output reconstruction;
- "fisher": BRECQ's damped Fisher-weighted output loss (needs "output_grads");
- "pd": PD-Quant's prediction difference (needs "head").

All of them are means over samples, so a mean over a whole cache can be built
from chunks.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from pipeline.base.errors import EfrapError
from pipeline.rounding.base import LayerProblem


class ActivationLoss(Protocol):
    """A reconstruction loss: (pred, target, batch indices, problem) -> scalar."""

    name: str
    #: Optional LayerProblem fields the loss reads ("output_grads", "head").
    needs: frozenset[str]

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor,
                 problem: LayerProblem) -> torch.Tensor:
        """Scalar loss of one batch."""
        ...


def channel_sse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over samples and positions.

    For [N, C] outputs this is the mean over N of the sum over C; for [N, C, H, W] the
    mean over N, H, W of the sum over C (the release's `lp_loss` with p = 2).
    """
    return (pred - target).pow(2).sum(1).mean()


class MSELoss:
    """Output reconstruction of the EFRAP and AdaRound releases."""

    name = "mse"
    needs: frozenset[str] = frozenset()

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor,
                 problem: LayerProblem) -> torch.Tensor:
        """Channel-summed squared error, mean over samples and positions."""
        return channel_sse(pred, target)


class FisherLoss:
    """BRECQ's Fisher-weighted output loss (Li et al. 2021), as its code computes it.

    The diagonal Fisher approximation of the task loss's increase, with each output
    element weighted by (|g| + damping)^2, where g is the per-sample gradient of the FP
    model's task loss with respect to the layer's output (`problem.output_grads`, from
    the driver):

        mean over samples and positions of sum over channels of ((|g| + damping) * (pred - target))^2.

    BRECQ adds damping = 1 to the diagonal: confidently classified samples have
    near-zero gradients, and without it the loss (hence the reconstruction) would
    vanish next to the rounding regulariser and EFRAP's flip penalty. With g = 0 the
    loss equals "mse". damping = 0 gives the undamped form; the textbook form also sums
    over positions instead of averaging, a constant factor H * W.

    Attributes:
        damping: Constant added to |g| (BRECQ: 1.0).
    """

    name = "fisher"
    needs: frozenset[str] = frozenset({"output_grads"})

    def __init__(self, damping: float = 1.0) -> None:
        self.damping = damping

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor,
                 problem: LayerProblem) -> torch.Tensor:
        """Fisher-weighted squared error of one batch."""
        if problem.output_grads is None:
            raise EfrapError(f"loss 'fisher' needs output_grads (layer {problem.name})")
        g = problem.output_grads[index].abs() + self.damping
        return (g * (pred - target)).pow(2).sum(1).mean()


class PredictionDifferenceLoss:
    """PD-Quant's prediction-difference loss (Liu et al. 2023).

    KL(softmax(z_fp / T) || softmax(head(pred) / T)) / lamb_r + mse, where head runs
    the rest of the FP network from the layer's output to the logits and z_fp are the
    FP logits. This is PD-Quant's released balance (T = 4, lamb_r = 0.1): the KL plus
    the MSE with the small weight lamb_r, scaled by 1 / lamb_r so that the MSE keeps the
    unit weight it has against the rounding regulariser and EFRAP's flip penalty.

    Attributes:
        temperature: Softmax temperature T of both predictions.
        lamb_r: Weight of the MSE relative to the KL.
    """

    name = "pd"
    needs: frozenset[str] = frozenset({"head"})

    def __init__(self, temperature: float = 4.0, lamb_r: float = 0.1) -> None:
        self.temperature = temperature
        self.lamb_r = lamb_r

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor,
                 problem: LayerProblem) -> torch.Tensor:
        """KL of the predictions / lamb_r + channel-summed squared error."""
        if problem.head is None or problem.head_targets is None:
            raise EfrapError(f"loss 'pd' needs the network head and FP logits "
                             f"(layer {problem.name})")
        t = self.temperature
        log_q = F.log_softmax(problem.head(pred) / t, dim=1)
        log_p = F.log_softmax(problem.head_targets[index] / t, dim=1)
        kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
        return kl / self.lamb_r + channel_sse(pred, target)


LOSSES: dict[str, ActivationLoss] = {
    "mse": MSELoss(),
    "fisher": FisherLoss(),
    "pd": PredictionDifferenceLoss(),
}


def get_loss(name: str) -> ActivationLoss:
    """The activation-preservation loss called `name`."""
    if name not in LOSSES:
        raise EfrapError(f"unknown loss '{name}': choose from {', '.join(LOSSES)}")
    return LOSSES[name]
