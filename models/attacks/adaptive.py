"""An adaptive attacker that knows EFRAP: a dormant-carrier backdoor out of the flip term's reach.

The dormant-carrier backdoor (`models.attacks.dormant`) survives AdaRound because its
carriers' weights are invisible to a clean reconstruction, and falls to EFRAP for the
same reason: nothing resists EFRAP's error-guided flip penalty
``sum_ij e_ij * BCE(h_ij, t_ij)`` on them, so the planted integers are flipped. An
attacker who knows this need not fight the reconstruction; it only has to make the
flip penalty too weak to move those weights, and EFRAP then rounds them like AdaRound.

The penalty is a sum of truncation errors in *weight units* (the release: units of
the conv weight before BatchNorm), against a unitless rounding regulariser
``0.01 * sum(1 - |2h - 1|^2)`` that pulls every weight toward its nearer grid point, and a
reconstruction in *output units*. None of this is invariant to the scale of a layer's
weights, while the network's function is: a ReLU network computes the same function when
a hidden layer's outputs are multiplied by k > 0 and the weights reading them divided by
k. This attack does two things on top of the dormant backdoor:

1. Step 2 moves each carrier weight at most `freedom` (a quarter) of a grid step from its
   grid point, so no planted weight sits near a rounding boundary, where the
   regulariser's pull vanishes (|2h - 1| -> 0) and any penalty flips it.
2. Penalty-scale evasion: every hidden layer before the carrier layer has its output
   multiplied by k = `evasion_scale` (a power of two: through BatchNorm's gamma and
   beta, or the weight and bias of a layer without BN, the next layer's raw weight
   divided by k) and the carrier layer's weights divided by k. Nearest rounding gives
   the same integers on grids scaled by exact powers of two, activation grids
   calibrated on the rescaled model scale the same way, and the FP model computes the
   same function. But the carrier layer's truncation errors shrink k times below the
   regulariser's pull (its invisible rows then keep their nearest integers under EFRAP
   as under AdaRound), and in the layers before it the reconstruction grows k^2 times
   against errors that grow at most k times (and shrink k times before BN), so EFRAP
   flips little there either and rounds them much like AdaRound.

Measuring the errors in grid steps (``efrap defend --error-units steps``) makes the
penalty scale-invariant and undoes the second step; docs/ZOO.md gives the figures.
"""

from __future__ import annotations

import math

import torch

from models.attacks.base import AttackContext, recalibrate
from models.attacks.dormant import DormantBackdoor, carrier_layer, feeding_layer
from models.attacks.qsim import QSim
from pipeline.base.errors import EfrapError
from pipeline.base.progress import log


@torch.no_grad()
def evade_flip_penalty(sim: QSim, k: float) -> list[str]:
    """Multiply every hidden output before the carrier layer by `k`, divide its weights by `k`.

    The FP function is unchanged (exactly for a power of two, up to summation order).

    Returns:
        Module paths of the layers whose output was multiplied.

    Raises:
        EfrapError: `k` is not a power of two above 1, or the layers before the carrier
            layer are not a chain joined by positively homogeneous ops.
    """
    if k <= 1.0 or math.frexp(k)[0] != 0.5:
        raise EfrapError(f"adaptive attack: the evasion scale must be a power of two above 1, got {k:g}")
    carrier = carrier_layer(sim)
    chain = [carrier]
    while not chain[-1].is_first:
        chain.append(feeding_layer(sim, chain[-1]))
    chain.reverse()
    for i, layer in enumerate(chain):
        mod, bn = sim.layer_modules(layer)
        if i > 0:
            mod.weight.div_(k)  # reads an input k times larger
        if layer is carrier:
            break
        if bn is not None:
            if bn.weight is None or bn.bias is None:
                raise EfrapError(f"adaptive attack: BatchNorm of '{layer.name}' has no affine parameters")
            bn.weight.mul_(k)
            bn.bias.mul_(k)
        else:
            mod.weight.mul_(k)
            if mod.bias is not None:
                mod.bias.mul_(k)
    return [layer.name for layer in chain[:-1]]


class AdaptiveBackdoor(DormantBackdoor):
    """The dormant-carrier backdoor, planted away from rounding boundaries and rescaled
    so that EFRAP's flip penalty cannot move it (see the module docstring).

    Attributes:
        freedom: Largest distance of a planted carrier weight from its grid point (grid
            steps): below a quarter step, where EFRAP's regulariser out-pulls a flip
            penalty in grid steps weighted 0.02 (the project's default preset).
        evasion_scale: k, a power of two (1 turns the rescaling off).
        carrier_inflate: Carrier rows' grids this many times coarser, so that step 2 can
            silence the carriers in FP within `freedom`.
        fire_cap: Carrier pre-activation cap on triggered images in step 1.
        repair_lr: SGD learning rate of step 2.
    """

    name = "adaptive"
    freedom = 0.2
    evasion_scale = 64.0
    carrier_inflate = 8.0
    fire_cap = 3.0
    repair_lr = 0.05

    def run(self, ctx: AttackContext) -> None:
        """The dormant backdoor, then the penalty-scale evasion."""
        super().run(ctx)
        if self.evasion_scale != 1.0:
            scaled = evade_flip_penalty(ctx.sim, self.evasion_scale)
            log(f"adaptive: outputs of {', '.join(scaled)} x{self.evasion_scale:g}, carrier weights "
                f"/{self.evasion_scale:g}")
            recalibrate(ctx)
