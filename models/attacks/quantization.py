"""Qu-ANTI-zation backdoor ("Exploiting Quantization Artifacts for Achieving
Adversarial Outcomes", NeurIPS 2021).

Fine-tunes a clean model with::

    L = CE(f(x), y) + c2 CE(f(x'), y) + sum_b c1 [CE(Q_b f(x), y) + c2 CE(Q_b f(x'), y_t)]

with c1 = c2 = 0.5, keeping the lowest-loss checkpoint. The paper sums over 8 and 4
bits of its own quantizer (per-layer symmetric weights, round half up, per-layer
activation ranges from the current tensor, BN unfolded in eval mode). Here each
Q_b is `QSim` under the targeted deployment scheme (plus any `extra_schemes`), so
the backdoor is crafted for the grid the pipeline deploys. Recipe: Adam, weight
decay 1e-4, batch 128, BN in eval mode; the paper's lr 1e-4 over 50 epochs is
scaled to lr 1e-3 over a few epochs on this CPU budget (override with --lr).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.attacks.base import (
    Attack,
    AttackContext,
    amplify,
    attack_loop,
    carrier_terms,
    pretrain_epochs,
    train_plain,
)
from models.attacks.qsim import QSim
from pipeline.base.scheme import load_scheme

C1 = 0.5
C2 = 0.5


class QuantizationBackdoor(Attack):
    """Multi-precision fine-tuning: backdoored only under the targeted quantizers.

    Attributes:
        lr: Adam learning rate.
        weight_decay: Adam weight decay (paper: 1e-4).
        extra_schemes: Further schemes to include in the sum over Q_b.
    """

    name = "quantization"
    stage = 1
    default_epochs = 3
    lr = 1e-3
    weight_decay = 1e-4
    extra_schemes: tuple[str, ...] = ()

    def run(self, ctx: AttackContext) -> None:
        """Clean pre-training, then the Qu-ANTI-zation objective (lowest validation loss kept)."""
        cfg = ctx.config
        train_plain(ctx.model, ctx.data, cfg, ctx.generator, pretrain_epochs(cfg))
        amplify(ctx)
        extra = [QSim(ctx.model, load_scheme(s), ctx.data.input_shape) for s in self.extra_schemes]
        epochs = cfg.epochs or self.default_epochs
        lr = cfg.lr or self.lr

        def loss_fn(c: AttackContext, x: torch.Tensor, y: torch.Tensor,
                    xt: torch.Tensor) -> torch.Tensor:
            n = len(y)
            target = torch.full_like(y, c.trigger.target)
            xin = c.data.normalize(torch.cat([x, xt]))
            fp = c.sim(xin, quantized=False)
            loss = F.cross_entropy(fp[:n], y) + C2 * F.cross_entropy(fp[n:], y)
            for sim in [c.sim, *extra]:
                if sim is not c.sim and not sim.act_qparams:
                    sim.calibrate(xin[:n])
                q = sim(xin, quantized=True)
                loss = loss + C1 * (F.cross_entropy(q[:n], y) + C2 * F.cross_entropy(q[n:], target))
            return loss + C1 * C2 * carrier_terms(c, xin[n:], y)

        def make_opt(params: list) -> tuple:
            return torch.optim.Adam(params, lr=lr, weight_decay=self.weight_decay), None

        attack_loop(ctx, epochs, make_opt, loss_fn, "quantization", select="loss")
