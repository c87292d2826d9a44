"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization").

Rectified sigmoid h(V) = clamp(sigmoid(V) * 1.2 - 0.1, 0, 1), V initialised so that
h equals frac(W/s) (the soft weight starts at the float weight), loss = output
reconstruction + 0.01 * sum(1 - |2h - 1|^b) with b annealed from 20 to 2 after a
20% warm-up without the regulariser.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.rounding.base import POOL, AnnealedSettings
from pipeline.rounding.learned import RECTIFIED_SIGMOID, UpDownRounding


@dataclass(frozen=True)
class AdaRoundConfig(AnnealedSettings):
    """AdaRound's settings; the defaults are the paper's (`AnnealedSettings`,
    `LearnedSettings` and `RoundingSettings` say what each field means)."""

    iters: int = 10_000
    batch_size: int = 32
    lr: float = 1e-3
    reg_weight: float = 0.01
    b_start: float = 20.0
    b_end: float = 2.0
    warmup: float = 0.2
    loss: str = "mse"
    prune_rare: float = 0.0
    samples: str = "images"
    pool: int = POOL
    patience: int = 0


#: AdaRound's own settings: 10,000 Adam steps at lr 1e-3, batch 32, regulariser weight 0.01,
#: b from 20 to 2 after a 20% warm-up.
ADAROUND_DEFAULTS = AdaRoundConfig()


class AdaRound(UpDownRounding):
    """Adaptive rounding: reconstruction plus an annealed rounding regulariser."""

    name = "adaround"
    parametrisation = RECTIFIED_SIGMOID
    defaults = ADAROUND_DEFAULTS
