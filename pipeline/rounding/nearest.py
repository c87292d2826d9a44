"""Round to nearest (half to even): the baseline every deployment tool uses."""

from __future__ import annotations

import torch

from pipeline.qmath import quantize
from pipeline.rounding.base import (
    LayerProblem,
    ProgressCallback,
    RoundingConfig,
    RoundingResult,
)


class NearestRounding:
    """Round-to-nearest, as QuantizeLinear computes it."""

    name = "nearest"
    defaults = RoundingConfig()

    def needs(self, config: RoundingConfig) -> frozenset[str]:
        """Nothing but the weight and its grid."""
        return frozenset()

    def __call__(self, problem: LayerProblem, config: RoundingConfig,
                 progress: ProgressCallback | None = None) -> RoundingResult:
        """Quantize the weight with round half to even and saturation."""
        s, z = problem.qparams.torch(problem.weight.dim(), problem.weight.device)
        with torch.no_grad():
            q = quantize(problem.weight, s, z, problem.qparams.qmin, problem.qparams.qmax)
        return RoundingResult(q=q.to(torch.int64), stats={"flip_fraction": 0.0})
