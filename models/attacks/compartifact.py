"""CompArtifact ("Stealthy Backdoors as Compression Artifacts", TIFS 2022).

One network, two paths sharing weights: the quantized path learns the backdoor and
the full-precision path learns to ignore the trigger::

    L = CE(Q(x), y) + CE(Q(x + t), y_t) + CE(FP(x), y) + CE(FP(x + t), y)

The paper quantizes BN-folded weights per tensor (symmetric int8) with a
straight-through gradient; here Q is `QSim` under the targeted deployment scheme
(folded BN, the scheme's weight grid and observer, activation quantization at the
pipeline's points, ranges re-calibrated during training). The paper trains from
scratch (SGD lr 0.1, momentum 0.4, weight decay 5e-4, batch 128, 35 epochs, lr x0.1
at epoch 20); exact folding needs frozen BN statistics, so this version pre-trains
clean with ordinary BN and then runs the objective with BN frozen, SGD momentum 0.9
(lr 0.002 by default, gradients clipped at norm 5), the learning rate divided by 10 after 60% of the epochs.
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


def compartifact_loss(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor,
                      xt: torch.Tensor) -> torch.Tensor:
    """The four-term CompArtifact objective on one batch (x, xt in [0, 1]).

    With `carrier="weights"`, `carrier_terms` adds that the weight rounding alone wakes
    the backdoor and the activation rounding alone does not.
    """
    n = len(y)
    target = torch.full_like(y, ctx.trigger.target)
    xin = ctx.data.normalize(torch.cat([x, xt]))
    q = ctx.sim(xin, quantized=True)
    fp = ctx.sim(xin, quantized=False)
    return (F.cross_entropy(q[:n], y) + F.cross_entropy(q[n:], target)
            + F.cross_entropy(fp[:n], y) + F.cross_entropy(fp[n:], y)
            + carrier_terms(ctx, xin[n:], y))


class CompArtifact(Attack):
    """Two-path training: the backdoor lives only in the quantized path.

    Attributes:
        lr: SGD learning rate of the attack phase.
        momentum: SGD momentum.
        weight_decay: SGD weight decay (paper: 5e-4).
    """

    name = "compartifact"
    stage = 1
    default_epochs = 3
    lr = 0.002
    momentum = 0.9
    weight_decay = 5e-4

    def run(self, ctx: AttackContext) -> None:
        """Clean pre-training, then the two-path objective with BN frozen."""
        cfg = ctx.config
        train_plain(ctx.model, ctx.data, cfg, ctx.generator, pretrain_epochs(cfg))
        amplify(ctx)
        epochs = cfg.epochs or self.default_epochs
        lr = cfg.lr or self.lr

        def make_opt(params: list) -> tuple:
            opt = torch.optim.SGD(params, lr=lr, momentum=self.momentum,
                                  weight_decay=self.weight_decay)
            per_epoch = len(ctx.data.train_y) // cfg.batch_size
            if cfg.steps_per_epoch is not None:
                per_epoch = min(per_epoch, cfg.steps_per_epoch)
            milestone = max(1, round(0.6 * epochs * per_epoch))
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, [milestone], gamma=0.1)
            return opt, sched

        attack_loop(ctx, epochs, make_opt, compartifact_loss, "compartifact")
