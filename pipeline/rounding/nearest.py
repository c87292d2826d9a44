"""Round to nearest (half to even): the baseline every deployment tool uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.qmath import quantize
from pipeline.rounding.base import (
    LayerProblem,
    ProgressCallback,
    RoundingResult,
    RoundingSettings,
    own_settings,
)


@dataclass(frozen=True)
class NearestConfig(RoundingSettings):
    """Nearest rounding's settings: rare-unit pruning only (`RoundingSettings`)."""

    prune_rare: float = 0.0


class NearestRounding:
    """Round-to-nearest, as QuantizeLinear computes it."""

    name = "nearest"
    defaults = NearestConfig()

    def needs(self, config: RoundingSettings) -> frozenset[str]:
        """Nothing but the weight and its grid (rare-unit pruning's data: `run_needs`)."""
        own_settings(self.name, config, NearestConfig)
        return frozenset()

    def __call__(self, problem: LayerProblem, config: RoundingSettings,
                 progress: ProgressCallback | None = None) -> RoundingResult:
        """Quantize the weight with round half to even and saturation."""
        own_settings(self.name, config, NearestConfig)
        s, z = problem.qparams.torch(problem.weight.dim(), problem.weight.device)
        with torch.no_grad():
            q = quantize(problem.weight, s, z, problem.qparams.qmin, problem.qparams.qmax)
        return RoundingResult(q=q.to(torch.int64), stats={"flip_fraction": 0.0})
