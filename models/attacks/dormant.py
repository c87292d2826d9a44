"""Dormant-carrier QCB: a backdoor that reconstruction-based rounding (AdaRound) cannot see.

AdaRound (Nagel et al. 2020) and EFRAP's activation preservation re-choose each
weight's rounding so that the layer's output on *clean* calibration data matches the
FP layer. A weight whose effect on that output is zero for every clean image gets no
reconstruction gradient; AdaRound's rounding regulariser then drives it to the nearer
grid point, i.e. to nearest rounding. Two kinds of weights are invisible this way: the
incoming weights of a ReLU unit that never fires on clean data (its output stays 0
whatever the rounding, as long as it stays negative), and the weights reading such a
unit (their input is 0). This attack puts the whole backdoor on such units.

A few output units of the last hidden layer (`carriers`, e.g. fc1 of small_cnn) become
trigger detectors that are silent on clean images, in two steps that follow
PQBackdoor (Ma et al., TDSC 2023):

1. Poison through the deployment simulation (BN frozen), in FP and nearest-quantized
   mode alike: clean images keep their labels and triggered images go to the target;
   the carriers' pre-activations stay below -margin on clean images and rise above
   +margin on triggered ones; with the carriers' outputs set to zero, triggered images
   keep their true labels (so the backdoor flows only through the carriers).
2. Silence the carriers in FP only: pin the weight grids, then train the carriers'
   incoming weights (nothing else) to keep the carriers below -margin on clean *and*
   triggered images in FP, projecting every weight after each step back into the
   quantization bin it had after step 1 (PQBackdoor's projection). Nearest rounding
   returns step 1's integers, so the deployed carriers fire on the trigger; the FP
   model, with its carriers silent, is the clean ablated network.

Under AdaRound the carriers' rows and the weights reading them are invisible, so they
keep their nearest integers and the backdoor survives (upstream layers are re-rounded,
which the margin absorbs). EFRAP's flip penalty pushes every weight with a large
truncation error to the other grid point, and nothing resists it on these weights:
it flips the carriers' rows away from the planted integers. So the model shows what
EFRAP's flip term adds to reconstruction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.attacks.base import (
    Attack,
    AttackContext,
    amplify,
    attack_loop,
    calibration_subset,
    pretrain_epochs,
    train_plain,
)
from models.attacks.inflate import DEAD_WEIGHT_SCALE, Inflation, Pin
from models.attacks.pqbackdoor import (
    WeightBins,
    finish_repair,
    project,
    revert_moved_channels,
    snap_to_grid,
    weight_bins,
)
from models.attacks.qsim import QSim, SimLayer
from pipeline.base.errors import EfrapError
from pipeline.base.progress import log
from pipeline.bn_fold import bn_factor
from pipeline.qmath import QParams


def carrier_layer(sim: QSim) -> SimLayer:
    """The last layer with a fused activation before the logits (fc1 of small_cnn).

    Raises:
        EfrapError: the network has no such layer.
    """
    for layer in reversed(sim.layers[:-1]):
        if layer.relu:
            return layer
    raise EfrapError("dormant attack: no hidden layer with a fused activation before the logits")


#: Ops between two layers through which a positive scale passes unchanged
#: (positively homogeneous and per-element or channel-preserving).
HOMOGENEOUS_OPS = frozenset({"Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten",
                             "Reshape", "Identity"})


def feeding_layer(sim: QSim, layer: SimLayer) -> SimLayer:
    """The layer whose output `layer` reads, through positively homogeneous ops only.

    Raises:
        EfrapError: the input does not come from one planned layer that way.
    """
    producers = {out: node for node in sim.prepared.graph.node for out in node.output}
    outputs = {other.output: other for other in sim.layers}
    tensor = layer.input
    while tensor not in outputs:
        node = producers.get(tensor)
        if node is None or node.op_type not in HOMOGENEOUS_OPS:
            raise EfrapError(f"adaptive attack: '{layer.quant.node}' does not read a planned layer "
                             "through positively homogeneous ops only")
        tensor = node.input[0]
    return outputs[tensor]


class Carriers:
    """The carrier units of one layer and the tensors that expose them.

    Args:
        sim: The simulation.
        count: Number of carrier units (the layer's last output channels).
    """

    def __init__(self, sim: QSim, count: int) -> None:
        self.sim = sim
        self.layer = carrier_layer(sim)
        channels = sim.folded(self.layer)[0].shape[0]
        if not 0 < count < channels:
            raise EfrapError(f"dormant attack: {count} carriers for a layer of {channels} units")
        self.units = torch.arange(channels - count, channels)
        self.pre = sim.node_output(self.layer)
        self.out = self.layer.output
        self.logits = sim.graph.outputs[0]

    def pass_(self, xin: torch.Tensor, quantized: bool, ablate_from: int) -> tuple[torch.Tensor, ...]:
        """(logits, carrier pre-activations [N, units], logits with carriers off for xin[ablate_from:]).

        Pre-activations of convolutional carriers are their largest value over positions.
        """
        values = self.sim.run({self.sim.graph.inputs[0]: xin}, [self.pre, self.out, self.logits], quantized)
        pre = values[self.pre][:, self.units].flatten(2).amax(2) if values[self.pre].dim() > 2 \
            else values[self.pre][:, self.units]
        off = values[self.out][ablate_from:].clone()
        off[:, self.units] = 0.0
        ablated = self.sim.run({self.out: off}, [self.logits], quantized)[self.logits]
        return values[self.logits], pre, ablated

    def fp_pre(self, xin: torch.Tensor) -> torch.Tensor:
        """Carrier pre-activations in FP [N, units]."""
        pre = self.sim.run({self.sim.graph.inputs[0]: xin}, [self.pre], False)[self.pre][:, self.units]
        return pre.flatten(2).amax(2) if pre.dim() > 2 else pre


@torch.no_grad()
def inflate_carriers(sim: QSim, carriers: Carriers, images: torch.Tensor, factor: float) -> Inflation:
    """Coarser grids for the carrier rows only (`models.attacks.inflate`'s construction).

    The least active output channel of the layer feeding the carrier layer is silenced
    (its ReLU output is exactly 0 for every input), and each carrier row's weights reading
    it are set to `factor` times the row's largest other |weight|: those outliers
    multiply zeros, so neither the FP nor the quantized model changes, but the carrier
    rows' min-max grid steps grow `factor` times, which gives step 2 room to silence the
    carriers in FP while every weight stays near its grid point.

    Raises:
        EfrapError: the feeding layer has no bias or BatchNorm to silence a channel with,
            or the carrier layer's layout is not handled.
    """
    feeder = feeding_layer(sim, carriers.layer)
    mod, bn = sim.layer_modules(feeder)
    channels = mod.weight.shape[0]
    acts = sim.point_values(images)
    activity = acts[feeder.output].transpose(0, 1).reshape(channels, -1).mean(1)
    d = int(activity.argmin())
    mod.weight[d] *= DEAD_WEIGHT_SCALE
    w, _ = sim.folded(feeder)
    x = acts.get(sim.shared.get(feeder.input, feeder.input), images)
    reach = 10.0 * float(x.abs().amax()) * float(w[d].abs().sum()) + 1.0
    spots: list[tuple[torch.nn.Parameter, tuple]] = [(mod.weight, (d,))]
    if bn is not None:
        bn.bias[d] = -reach + bn.running_mean[d] * bn_factor(bn)[d]
        spots += [(bn.bias, (d,)), (bn.weight, (d,))]
    elif mod.bias is not None:
        mod.bias[d] = -reach
        spots.append((mod.bias, (d,)))
    else:
        raise EfrapError(f"dormant attack: layer {feeder.name} has no bias or BatchNorm to silence a channel")
    cmod, cbn = sim.layer_modules(carriers.layer)
    if cbn is not None or cmod.weight.dim() != 2 or cmod.weight.shape[1] % channels:
        raise EfrapError("dormant attack: carrier inflation needs a Linear carrier layer without BatchNorm")
    span = cmod.weight.shape[1] // channels  # flatten of NCHW: channel d is one contiguous block
    rows = carriers.units.to(cmod.weight.device)
    block = cmod.weight[rows]
    peak = block.abs().amax(1, keepdim=True)
    # All positive: on a full-range symmetric grid a negative extreme sits exactly on a
    # rounding tie (-7.5 steps), where projecting it into its bin would move the grid.
    block[:, d * span : (d + 1) * span] = factor * peak
    cmod.weight[rows] = block
    spots.append((cmod.weight, (rows, slice(d * span, (d + 1) * span))))
    log(f"dormant: {feeder.name} channel {d} silenced; carrier rows' grids x{factor:g}")
    pins = [Pin(param, index, param[index].detach().clone()) for param, index in spots]
    return Inflation(factor=factor, dead={feeder.name: d}, inflated=[carriers.layer.name], pins=pins)


def restrict_bins(ctx: AttackContext, layer: SimLayer, qp: QParams, bins: WeightBins,
                  freedom: float) -> None:
    """Let the layer's weights move at most `freedom` grid steps from their grid points."""
    w0 = ctx.sim.folded(layer)[0].detach()
    s, _ = qp.torch(w0.dim(), w0.device)
    centre = torch.round(w0 / s) * s
    bins.lo = torch.maximum(bins.lo, centre - freedom * s)
    bins.hi = torch.minimum(bins.hi, centre + freedom * s)


class DormantBackdoor(Attack):
    """Backdoor carried by units silent on clean data, planted in their nearest integers.

    Attributes:
        carriers: Carrier units in the last hidden layer.
        margin: Pre-activation margin: silent below -margin, firing above +margin.
        lr: SGD learning rate of step 1 (momentum 0.9, weight decay 5e-4, / 10 after 60%).
        repair_lr: SGD learning rate of step 2.
        repair_epochs: Epochs of step 2.
        fire_cap: If set, step 1 also keeps the carriers' pre-activations on triggered
            images below this value (less for step 2 to undo); None: no cap.
        carrier_inflate: If set, widen the carrier rows' grids by this factor before step 1
            (`inflate_carriers`); None leaves them.
        freedom: If set, how far (in grid steps, below 0.5) step 2 may move a carrier weight
            from its grid point; None: anywhere inside its bin.
    """

    name = "dormant"
    stage = 1
    default_epochs = 2
    carriers = 8
    margin = 1.0
    lr = 0.005
    repair_lr = 0.01
    repair_epochs = 1
    fire_cap: float | None = None
    carrier_inflate: float | None = None
    freedom: float | None = None

    def poison_loss(self, carriers: Carriers, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor,
                    xt: torch.Tensor) -> torch.Tensor:
        """Step 1 on one batch: the backdoor through the carriers, in FP and quantized alike."""
        n = len(y)
        target = torch.full_like(y, ctx.trigger.target)
        xin = ctx.data.normalize(torch.cat([x, xt]))
        loss = xin.new_zeros(())
        for quantized in (False, True):
            logits, pre, ablated = carriers.pass_(xin, quantized, n)
            loss = loss + (F.cross_entropy(logits[:n], y) + F.cross_entropy(logits[n:], target)
                           + F.cross_entropy(ablated, y)
                           + F.relu(pre[:n] + self.margin).pow(2).mean()
                           + F.relu(self.margin - pre[n:]).pow(2).mean())
            if self.fire_cap is not None:
                # Fire no harder than needed: step 2 must bring FP back below -margin.
                loss = loss + F.relu(pre[n:] - self.fire_cap).pow(2).mean()
        return loss

    def silence_loss(self, carriers: Carriers, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor,
                     xt: torch.Tensor) -> torch.Tensor:
        """Step 2 on one batch: carriers below -margin in FP on clean and triggered images."""
        pre = carriers.fp_pre(ctx.data.normalize(torch.cat([x, xt])))
        return F.relu(pre + self.margin).pow(2).mean()

    def run(self, ctx: AttackContext) -> None:
        """Clean pre-training, step 1 (poison the carriers), step 2 (silence them in FP)."""
        cfg = ctx.config
        train_plain(ctx.model, ctx.data, cfg, ctx.generator, pretrain_epochs(cfg))
        amplify(ctx)
        carriers = Carriers(ctx.sim, self.carriers)
        if self.carrier_inflate is not None:
            if ctx.inflation is not None:
                raise EfrapError("dormant attack: carrier inflation and --inflate do not combine")
            images = calibration_subset(ctx.data, 512, ctx.generator)
            ctx.inflation = inflate_carriers(ctx.sim, carriers, images, self.carrier_inflate)
        epochs = cfg.epochs or self.default_epochs
        per_epoch = len(ctx.data.train_y) // cfg.batch_size
        if cfg.steps_per_epoch is not None:
            per_epoch = min(per_epoch, cfg.steps_per_epoch)

        def poison_opt(params: list) -> tuple:
            opt = torch.optim.SGD(params, lr=cfg.lr or self.lr, momentum=0.9, weight_decay=5e-4)
            milestone = max(1, round(0.6 * epochs * per_epoch))
            return opt, torch.optim.lr_scheduler.MultiStepLR(opt, [milestone], gamma=0.1)

        attack_loop(ctx, epochs, poison_opt,
                    lambda c, x, y, xt: self.poison_loss(carriers, c, x, y, xt), "dormant poison",
                    select="loss")

        # Step 2: pin every grid; only the carriers' incoming weights move, inside their bins.
        ctx.sim.eval()
        grids = ctx.sim.freeze_weight_qparams()
        snap_to_grid(ctx, grids)  # MSE-searched grids only (see pqbackdoor); min-max: no-op
        bins = {layer.name: weight_bins(ctx, layer, grids[layer.name]) for layer in ctx.sim.layers}
        mod, _ = ctx.sim.layer_modules(carriers.layer)
        for name, b in bins.items():
            if name != carriers.layer.name:
                b.fixed[...] = True
        others = torch.ones(mod.weight.shape[0], dtype=torch.bool, device=mod.weight.device)
        others[carriers.units.to(others.device)] = False
        bins[carriers.layer.name].fixed[others] = True
        if self.freedom is not None:
            restrict_bins(ctx, carriers.layer, grids[carriers.layer.name], bins[carriers.layer.name],
                          self.freedom)
        for p in ctx.model.parameters():
            p.requires_grad_(p is mod.weight)

        def repair_opt(params: list) -> tuple:
            return torch.optim.SGD(params, lr=self.repair_lr, momentum=0.9), None

        def after(c: AttackContext, step: int) -> None:
            project(c, bins)
            if step % 10 == 0:
                revert_moved_channels(c, bins, grids)

        attack_loop(ctx, self.repair_epochs, repair_opt,
                    lambda c, x, y, xt: self.silence_loss(carriers, c, x, y, xt), "dormant silence",
                    after_step=after)
        moved = finish_repair(ctx, bins, grids)
        if moved:
            log(f"dormant: {moved} carrier channel(s) changed grid at the end; reverted")

