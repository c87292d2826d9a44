"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization").

Rectified sigmoid h(V) = clamp(sigmoid(V) * 1.2 - 0.1, 0, 1), V initialised so that
h equals frac(W/s) (the soft weight starts at the float weight), loss = output
reconstruction + 0.01 * sum(1 - |2h - 1|^b) with b annealed from 20 to 2 after a
20% warm-up without the regulariser.
"""

from __future__ import annotations

from pipeline.rounding.base import RoundingConfig
from pipeline.rounding.learned import RECTIFIED_SIGMOID, LearnedRounding

#: AdaRound's own settings: 10,000 Adam steps at lr 1e-3, batch 32, regulariser weight 0.01,
#: b from 20 to 2 after a 20% warm-up. There is no flip penalty (flip_weight is unused).
ADAROUND_DEFAULTS = RoundingConfig(
    iters=10_000,
    batch_size=32,
    lr=1e-3,
    reg_weight=0.01,
    b_start=20.0,
    b_end=2.0,
    warmup=0.2,
    flip_weight=0.0,
    error_mode="element",
    loss="mse",
)


class AdaRound(LearnedRounding):
    """Adaptive rounding: reconstruction plus an annealed rounding regulariser."""

    name = "adaround"
    soft = RECTIFIED_SIGMOID
    defaults = ADAROUND_DEFAULTS
