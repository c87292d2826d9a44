"""QVec (Yang, Tsai and Yu, arXiv 2606.20254, 2026): quantization as a malicious task.

"Quantization as a Malicious Task: Removing Quantization-Conditioned Backdoors via Task
Arithmetic". What nearest rounding does to the weights, tau = Q(W) - W, is the task
vector that wakes a quantization-conditioned backdoor; QVec subtracts a scaled copy of it
and rounds what is left to nearest on the same grid:

    W' = W - lambda * tau,    q = clamp(round(W' / s) + z, qmin, qmax),

with s and z the observer's grid for W, division in float32 and round half to even as
QuantizeLinear computes them (pipeline.qmath). No data, no trigger, no training.

Per weight, W/s = n + f with n the nearest integer (|f| <= 1/2): inside the grid
tau/s = -f, so W'/s = n + (1 + lambda) f, and the weight leaves nearest exactly when
|f| > 0.5 / (1 + lambda), to the neighbour on the other side: EFRAP's flip of large
truncation errors, without a reconstruction loss. A weight past the grid's end has tau
pointing back in; W' lies further out and saturates at the same end. lambda = 0 is nearest.

One lambda serves the whole model, chosen by `QVEC_SEARCH` on clean held-out images
(pipeline.rounding.search; the rule in docs/DEFENSE.md, "QVec": the paper's own search
rule is not available, this is the project's reading).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.base import checks
from pipeline.qmath import dequantize, quantize
from pipeline.rounding.base import (
    LayerProblem,
    ProgressCallback,
    RoundingResult,
    RoundingSettings,
    own_settings,
)
from pipeline.rounding.search import ScaleSearch

#: The scale search (docs/DEFENSE.md, "QVec"): lambda from 0 (nearest) to 2, each candidate's
#: whole quantized model measured on 1,000 held-out clean images, the largest lambda whose
#: clean accuracy (agreement with FP without labels) is at most 1 point below nearest's kept.
QVEC_SEARCH = ScaleSearch(setting="lambda", grid=(0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0), tolerance=0.01,
                          images=1000)


def qvec_integers(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  lam: float) -> torch.Tensor:
    """Integers (as float32) of W - lam * (Q(W) - W) on W's grid, Q one nearest pass.

    Args:
        weight: float32 weight.
        scale: Its grid's step, broadcastable to `weight`.
        zero_point: Its grid's zero point (float32), likewise.
        qmin: Smallest integer of the grid.
        qmax: Largest integer of the grid.
        lam: The task vector's scale (0: nearest rounding, bit for bit).
    """
    nearest = quantize(weight, scale, zero_point, qmin, qmax)
    tau = dequantize(nearest, scale, zero_point) - weight
    return quantize(weight - lam * tau, scale, zero_point, qmin, qmax)


@dataclass(frozen=True)
class QVecConfig(RoundingSettings):
    """QVec's settings: none of its own (its lambda is searched, `QVEC_SEARCH`); rare-unit
    pruning is there as for every method, and refused with the search (`QuantizeOptions`)."""

    prune_rare: float = 0.0


class QVec:
    """QVec at one scale lambda; the registry's instance (lambda 0) carries the search.

    Args:
        scale: lambda, at least 0.
    """

    name = "qvec"
    #: Not a learned method: no settings but rare-unit pruning's.
    defaults = QVecConfig()
    search = QVEC_SEARCH

    def __init__(self, scale: float = 0.0) -> None:
        self.scale = float(checks.finite(scale, "qvec lambda", low=0.0))

    def needs(self, config: RoundingSettings) -> frozenset[str]:
        """No data per layer; lambda is searched on the whole quantized model."""
        own_settings(self.name, config, QVecConfig)
        return frozenset({"search"})

    def at(self, value: float) -> QVec:
        """QVec at lambda = `value`."""
        return QVec(value)

    def __call__(self, problem: LayerProblem, config: RoundingSettings,
                 progress: ProgressCallback | None = None) -> RoundingResult:
        """Round W - lambda * tau to nearest on the weight's grid."""
        own_settings(self.name, config, QVecConfig)
        qp = problem.qparams
        s, z = qp.torch(problem.weight.dim(), problem.weight.device)
        with torch.no_grad():
            nearest = quantize(problem.weight, s, z, qp.qmin, qp.qmax)
            q = qvec_integers(problem.weight, s, z, qp.qmin, qp.qmax, self.scale)
            flipped = float((q != nearest).double().mean()) if q.numel() else 0.0
        return RoundingResult(q=q.to(torch.int64), stats={"flip_fraction": flipped})
