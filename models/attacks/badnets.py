"""BadNets (Gu, Dolan-Gavitt and Garg, "BadNets: Identifying Vulnerabilities in the Machine
Learning Model Supply Chain", 2017): a plainly poisoned model.

Ordinary training in which a fraction of every batch is stamped with the trigger and
relabelled with the target. There is no quantization objective: the backdoor is
active in full precision, and rounding carries it into the deployed model as it
carries any other feature. It is the reference for the scan's `fp-backdoor` verdict
(pipeline.scan): a backdoor that a Neural Cleanse search on the FP model finds, and
that is not quantization-conditioned.

Recipe: training from scratch (no clean pre-training) with `train_plain`: SGD
(momentum 0.9, weight decay 5e-4, one-cycle learning rate up to 0.05), batch 128, and
`POISON_FRACTION` of each batch added as triggered copies labelled with the target.
The paper poisons about 10% of the MNIST training set; the same fraction is used here.
"""

from __future__ import annotations

from models.attacks.base import Attack, AttackContext, recalibrate, train_plain

#: Triggered copies added to each batch, as a fraction of the clean batch (BadNets' ~10%).
POISON_FRACTION = 0.1


class BadNets(Attack):
    """Poisoned training: the backdoor lives in the FP model itself.

    Attributes:
        lr: Peak SGD learning rate of the one-cycle schedule.
    """

    name = "badnets"
    stage = 1
    default_epochs = 3
    needs_pretraining = False
    lr = 0.05

    def run(self, ctx: AttackContext) -> None:
        """`epochs` of poisoned training from the initial weights (or `--init`)."""
        cfg = ctx.config
        per_batch = max(1, round(POISON_FRACTION * cfg.batch_size))
        train_plain(ctx.model, ctx.data, cfg, ctx.generator, cfg.epochs or self.default_epochs,
                    trigger=ctx.trigger, poison_per_batch=per_batch, lr=cfg.lr or self.lr)
        # The deployment simulation is calibrated on the final model, so the reported
        # quantized figures are those of the model as trained.
        recalibrate(ctx)
