"""A pruning-aware attacker: carriers that clean data wakes often, out of the flip term's reach.

The default defense (docs/DEFENSE.md) stops the `adaptive` attack with rare-unit pruning:
its carriers fire on almost no clean calibration image, so the weights reading them are
set to zero. That rule judges a unit only by how often it fires on clean images, not by
what it does on them. This attack puts the backdoor on carriers that fire on most clean
images, and puts the FP model's dormancy where nearest rounding drops it:

0. A trigger detector: one channel of the layer feeding the carriers (conv3 of small_cnn)
   is trained to stay below -margin on clean images and to rise above +margin where the
   trigger is; no weight reads it yet (its columns in the carrier layer stay 0).
1. Poison (FP and nearest-quantized alike, BN frozen): the backdoor flows only through a
   few units of the penultimate layer (`carriers`, fc1 of small_cnn), which fire on at
   least `min_fire` of every clean batch (above `fire_level`, below `clean_cap`) and
   above `trigger_level` on triggered images; with the carriers off, triggered images
   keep their labels.
2. Cancel in FP: the carrier rows are put on their own grid points (nearest rounding gives
   the same integers, and FP computes what the quantized carrier layer computes), then
   read the detector through weights of -`freedom` (0.15) of a step, which round to 0.
   The detector's output is scaled (its BatchNorm gamma and beta, exact through the
   ReLU) until, on triggered images, those small weights drive every FP carrier below
   zero: the FP model then behaves as with the carriers off, which step 1 taught to
   keep the true label. Nearest rounding drops the cancellation, and the deployed
   carriers fire on the trigger. The detector is silent on clean images (its bias is
   lowered until it stays below -margin on 8,192 of them), so no clean image sees the
   cancellation and the activation grids calibrated on clean images do not see it either.
3. The penalty-scale evasion of `adaptive` (the release's flip penalty in weight units
   shrinks 64 times; the default's, in grid steps, does not notice).

Against the default defense on the carrier layer: on clean data FP and nearest carriers
agree, so the reconstruction has nothing to re-round; every carrier weight is at most 0.15
of a step from its grid point (most exactly on it), where the rounding regulariser (0.01)
out-pulls a flip penalty of 0.02 times the error in steps, so the integers stay nearest;
the carriers fire on far more than 3% of clean images, so rare-unit pruning leaves them.
It does prune the detector's inputs to the carrier layer (the detector never fires on
clean images), but their integers are 0 already: the cancellation lives only in FP.

`measure_carriers` measures the properties the attack is built to have (firing rates
with the pruning's own definition of "fires", distance to the grid, FP-vs-nearest
carrier gap on clean and triggered images) and `CarrierBounds.violations` checks them;
`run` reports both after training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.attacks.adaptive import evade_flip_penalty
from models.attacks.base import (
    Attack,
    AttackContext,
    attack_loop,
    pretrain_epochs,
    recalibrate,
    train_plain,
)
from models.attacks.dormant import Carriers, feeding_layer
from models.attacks.qsim import QSim, weight_grid_matches
from pipeline.base import checks
from pipeline.base.errors import EfrapError
from pipeline.base.progress import log
from pipeline.rare_units import firing, rare_units

#: The default defense's rare-unit pruning budget (pipeline.rounding.efrap.EFRAP_DEFAULT).
DEFAULT_PRUNE_BUDGET = 0.03


@dataclass(frozen=True)
class CarrierBounds:
    """The properties a pruning-aware carrier must have, as checkable bounds.

    Attributes:
        min_fire: Lowest share of clean images each carrier must fire on (rare_units' "fires":
            its quantized value is not zero).
        max_grid_distance: Largest distance of a carrier weight from its grid point, in steps.
        max_clean_gap: Largest FP-vs-nearest gap of the carrier outputs on clean images
            (mean |c_q - c_fp| over mean |c_fp|).
        min_trigger_gap: Smallest FP-vs-nearest gap on triggered images (the backdoor).
        prune_budget: The pruning budget no carrier may fall under.
    """

    min_fire: float = 0.10
    max_grid_distance: float = 0.15
    max_clean_gap: float = 0.15
    min_trigger_gap: float = 0.5
    prune_budget: float = DEFAULT_PRUNE_BUDGET

    def __post_init__(self) -> None:
        checks.finite(self.min_fire, "carrier firing floor", low=0.0, high=1.0)
        checks.finite(self.max_grid_distance, "grid distance bound", low=0.0, high=0.5)
        checks.finite(self.max_clean_gap, "clean carrier gap bound", low=0.0)
        checks.finite(self.min_trigger_gap, "triggered carrier gap floor", low=0.0)
        checks.finite(self.prune_budget, "pruning budget", low=0.0, high=1.0)

    def violations(self, figures: CarrierFigures) -> list[str]:
        """One line per bound the figures break (empty: every bound holds)."""
        out = []
        if min(figures.fire_rates) < self.min_fire:
            out.append(
                f"a carrier fires on {100 * min(figures.fire_rates):.1f}% of clean images, "
                f"below {100 * self.min_fire:g}%"
            )
        if figures.max_grid_distance > self.max_grid_distance + 1e-4:  # float rounding of w / s
            out.append(
                f"a carrier weight sits {figures.max_grid_distance:.3f} steps from its grid "
                f"point, above {self.max_grid_distance:g}"
            )
        if figures.clean_gap > self.max_clean_gap:
            out.append(
                f"FP and nearest carriers differ by {figures.clean_gap:.3f} on clean images, "
                f"above {self.max_clean_gap:g}"
            )
        if figures.trigger_gap < self.min_trigger_gap:
            out.append(
                f"FP and nearest carriers differ by only {figures.trigger_gap:.3f} on triggered "
                f"images, below {self.min_trigger_gap:g}"
            )
        if figures.pruned_carriers:
            out.append(
                f"{figures.pruned_carriers} carrier(s) would be pruned at a "
                f"{100 * self.prune_budget:g}% budget"
            )
        return out


@dataclass(frozen=True)
class CarrierFigures:
    """What `measure_carriers` measured.

    Attributes:
        fire_rates: Per carrier, the share of clean images it fires on (nearest-quantized).
        max_grid_distance: Largest |W/s - round(W/s)| over the carrier rows' weights that
            nearest rounding does not clip (grid steps).
        mean_grid_distance: Its mean over those weights.
        clipped_weights: Carrier-row weights beyond the grid's end (no rounding moves them).
        clean_gap: mean |c_q - c_fp| / mean |c_fp| of the carrier outputs on clean images.
        trigger_gap: The same on triggered images, over the clean images' mean |c_fp|.
        pruned_carriers: Carriers that rare-unit pruning at the bounds' budget would take.
        images: Clean images measured.
    """

    fire_rates: tuple[float, ...]
    max_grid_distance: float
    mean_grid_distance: float
    clipped_weights: int
    clean_gap: float
    trigger_gap: float
    pruned_carriers: int
    images: int

    def summary(self) -> str:
        """One log line."""
        rates = ", ".join(f"{100 * r:.1f}" for r in self.fire_rates)
        return (
            f"carriers fire on {rates}% of {self.images} clean images; grid distance max "
            f"{self.max_grid_distance:.3f} mean {self.mean_grid_distance:.3f} steps "
            f"({self.clipped_weights} clipped weights apart); FP-vs-nearest gap clean "
            f"{self.clean_gap:.3f} triggered {self.trigger_gap:.3f}; "
            f"{self.pruned_carriers} carrier(s) within the pruning budget"
        )


@torch.no_grad()
def grid_distance(sim: QSim, carriers: Carriers) -> tuple[torch.Tensor, torch.Tensor]:
    """Per carrier-row weight: |W/s - round(W/s)| in steps, and whether nearest rounding clips it.

    A clipped weight lies beyond the grid's end (on a full-range symmetric grid the row's
    largest positive weight sits at qmax + 0.5 steps); no rounding can move its integer,
    since up and down clamp to the same end, so it is reported apart, with each row's
    largest |weight| (`range_setting`).
    """
    w = sim.folded(carriers.layer)[0]
    units = carriers.units.to(w.device)
    qp = sim.weight_qparams(carriers.layer)
    s, z = qp.torch(w.dim(), w.device)
    if s.shape[0] > 1:
        s, z = s[units], z[units]
    r = w[units] / s
    q = torch.round(r) + z
    return (r - torch.round(r)).abs(), (q < qp.qmin) | (q > qp.qmax) | range_setting(w[units])


def range_setting(rows: torch.Tensor) -> torch.Tensor:
    """Bool mask of each row's largest |weight|, the value a min-max observer builds the grid on.

    On a full-range symmetric grid it lies at qmax + 0.5 steps (clipped, up to float rounding
    of W / s, which may land it just inside); moving it would move the grid.
    """
    peak = rows.abs().amax(dim=tuple(range(1, rows.dim())), keepdim=True)
    return rows.abs() >= peak


@torch.no_grad()
def measure_carriers(
    sim: QSim,
    carriers: Carriers,
    clean: torch.Tensor,
    triggered: torch.Tensor,
    budget: float = DEFAULT_PRUNE_BUDGET,
) -> CarrierFigures:
    """The carrier properties on normalised `clean` images and their `triggered` copies.

    The simulation must be calibrated (its nearest-quantized mode is the deployment's).
    Firing uses the pruning's own code (`pipeline.rare_units.firing` and `rare_units`) on
    the quantized carrier layer output, the input units of the layer that reads them.
    """
    out = carriers.out
    feed = sim.graph.inputs[0]
    units = carriers.units.to(clean.device)
    q_clean = sim.run({feed: clean}, [out], True)[out]
    fires = firing(q_clean, 1)
    pruned = rare_units(fires, budget)[carriers.units]
    rates = fires[:, carriers.units].float().mean(0)
    c_q, c_fp = q_clean[:, units], sim.run({feed: clean}, [out], False)[out][:, units]
    t_q = sim.run({feed: triggered}, [out], True)[out][:, units]
    t_fp = sim.run({feed: triggered}, [out], False)[out][:, units]
    norm = float(c_fp.abs().mean()) or 1.0
    dist, clipped = grid_distance(sim, carriers)
    live = dist[~clipped]
    if live.numel() == 0:  # every weight sets the range (e.g. all-zero rows): none off the grid
        live = dist.new_zeros(1)
    return CarrierFigures(
        fire_rates=tuple(float(v) for v in rates),
        max_grid_distance=float(live.max()),
        mean_grid_distance=float(live.mean()),
        clipped_weights=int(clipped.sum()),
        clean_gap=float((c_q - c_fp).abs().mean()) / norm,
        trigger_gap=float((t_q - t_fp).abs().mean()) / norm,
        pruned_carriers=int(pruned.sum()),
        images=len(clean),
    )


def top_share(pre: torch.Tensor, share: float) -> torch.Tensor:
    """Per unit, the values of its `share` highest-scoring rows of `pre` [N, units]."""
    k = max(1, math.ceil(share * pre.shape[0]))
    return pre.topk(k, dim=0).values


class PruneAwareBackdoor(Attack):
    """Carriers busy on clean images, cancelled in FP by weights that nearest rounding drops.

    See the module docstring. Attributes:
        carriers: Carrier units of the penultimate layer (its last output units).
        freedom: Distance of the cancelling weights from their grid point 0 (grid steps).
        margin: Pre-activation margin of the cancel channel: below -margin on clean images,
            above +margin (at its largest position) on triggered ones.
        min_fire: Share of each clean batch every carrier is trained to fire on.
        fire_level: Pre-activation the carriers reach on that share of clean images.
        clean_cap: Highest carrier pre-activation on clean images in step 1.
        trigger_level: Lowest carrier pre-activation on triggered images in step 1.
        cancel_slack: The cancellation is made this many times what the carriers need.
        detector_weight: Weight of the cancel channel's terms in step 1.
        detector_lr: Adam learning rate of step 0 (the detector).
        lr: SGD learning rate of step 1 (momentum 0.9, weight decay 5e-4, / 10 after 60%).
        evasion_scale: The `adaptive` attack's penalty-scale evasion (1 turns it off).
        bounds: The properties checked and reported after training.
    """

    name = "pruneaware"
    stage = 1
    default_epochs = 2
    carriers = 8
    freedom = 0.15
    margin = 1.0
    min_fire = 0.3
    fire_level = 1.0
    clean_cap = 2.0
    trigger_level = 4.0
    cancel_slack = 2.0
    detector_weight = 10.0
    detector_lr = 1e-3
    lr = 0.005
    evasion_scale = 64.0
    bounds = CarrierBounds()

    def poison_loss(
        self, cancel: CancelChannel, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor
    ) -> torch.Tensor:
        """Step 1: the backdoor through carriers busy on clean images, in FP and quantized alike,
        and the cancel channel silent on clean images, firing on triggered ones."""
        n = len(y)
        target = torch.full_like(y, ctx.trigger.target)
        xin = ctx.data.normalize(torch.cat([x, xt]))
        loss = xin.new_zeros(())
        carriers = cancel.carriers
        for quantized in (False, True):
            logits, pre, ablated = carriers.pass_(xin, quantized, n)
            clean, trig = pre[:n], pre[n:]
            loss = loss + (
                F.cross_entropy(logits[:n], y)
                + F.cross_entropy(logits[n:], target)
                + F.cross_entropy(ablated, y)
                # Busy on clean images: above fire_level on min_fire of the batch...
                + F.relu(self.fire_level - top_share(clean, self.min_fire)).pow(2).mean()
                # ...but below the triggered level, so the two stay apart.
                + F.relu(clean - self.clean_cap).pow(2).mean()
                + F.relu(self.trigger_level - trig).pow(2).mean()
            )
        # The detector is only read by the cancelling weights, set after step 1: FP alone.
        return loss + self.detector_weight * self.detector_terms(cancel, xin, n)

    def detector_terms(self, cancel: CancelChannel, xin: torch.Tensor, n: int) -> torch.Tensor:
        """The cancel channel below -margin on the n clean images of `xin`, above +margin on the rest."""
        clean, trig = cancel.pre_peak(xin[:n]), cancel.pre_peak(xin[n:], region=True)
        return F.relu(clean + self.margin).pow(2).mean() + F.relu(self.margin - trig).pow(2).mean()

    def detector_loss(
        self, cancel: CancelChannel, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor
    ) -> torch.Tensor:
        """Step 0: the detector terms, with FP clean and triggered images kept on their labels."""
        xin = ctx.data.normalize(torch.cat([x, xt]))
        logits = ctx.sim(xin, quantized=False)
        return self.detector_terms(cancel, xin, len(y)) + F.cross_entropy(logits, torch.cat([y, y]))

    def run(self, ctx: AttackContext) -> None:
        """Clean pre-training, step 1 (poison), step 2 (cancel in FP), evasion, then the check."""
        cfg = ctx.config
        train_plain(ctx.model, ctx.data, cfg, ctx.generator, pretrain_epochs(cfg))
        carriers = Carriers(ctx.sim, self.carriers)
        idx = torch.randperm(len(ctx.data.train_y), generator=ctx.generator)[:512].to(ctx.data.device)
        raw = ctx.data.train_x[idx]
        cancel = CancelChannel(
            ctx.sim, carriers, ctx.data.normalize(raw), ctx.data.normalize(ctx.trigger.apply_torch(raw))
        )
        log(
            f"pruneaware: {cancel.feeder.name} channel {cancel.channel} cancels carriers "
            f"{carriers.units.tolist()} of {carriers.layer.name} in FP"
        )
        epochs = cfg.epochs or self.default_epochs
        per_epoch = len(ctx.data.train_y) // cfg.batch_size
        if cfg.steps_per_epoch is not None:
            per_epoch = min(per_epoch, cfg.steps_per_epoch)

        def poison_opt(params: list) -> tuple:
            opt = torch.optim.SGD(params, lr=cfg.lr or self.lr, momentum=0.9, weight_decay=5e-4)
            milestone = max(1, round(0.6 * epochs * per_epoch))
            return opt, torch.optim.lr_scheduler.MultiStepLR(opt, [milestone], gamma=0.1)

        cancel.disconnect()

        def detector_opt(params: list) -> tuple:
            return torch.optim.Adam(params, lr=self.detector_lr), None

        # Step 0: a trigger detector first; step 1 alone (one clipped SGD step shared by every
        # term) teaches it too slowly on wider networks.
        attack_loop(
            ctx,
            1,
            detector_opt,
            lambda c, x, y, xt: self.detector_loss(cancel, c, x, y, xt),
            "pruneaware detector",
            after_step=lambda c, step: cancel.disconnect(),
            select="loss",
        )
        attack_loop(
            ctx,
            epochs,
            poison_opt,
            lambda c, x, y, xt: self.poison_loss(cancel, c, x, y, xt),
            "pruneaware poison",
            after_step=lambda c, step: cancel.disconnect(),
            select="loss",
        )
        cancel.disconnect()
        recalibrate(ctx)
        cancel.silence(ctx, self.margin)
        gain = cancel.install(ctx, self.freedom, self.cancel_slack)
        log(
            f"pruneaware: carrier rows on their grid points; cancel channel x{gain:.3g}, read at "
            f"-{self.freedom:g} step"
        )
        if self.evasion_scale != 1.0:
            evade_flip_penalty(ctx.sim, self.evasion_scale)
        recalibrate(ctx)
        figures, problems = self.check(ctx)
        log(f"pruneaware: {figures.summary()}")
        for line in problems:
            log(f"pruneaware: constraint not met: {line}")

    def check(self, ctx: AttackContext, images: int = 1024) -> tuple[CarrierFigures, list[str]]:
        """Measure the carriers on fresh clean training images and check the bounds."""
        idx = torch.randperm(len(ctx.data.train_y), generator=ctx.generator)[:images]
        raw = ctx.data.train_x[idx.to(ctx.data.device)]
        figures = measure_carriers(
            ctx.sim,
            Carriers(ctx.sim, self.carriers),
            ctx.data.normalize(raw),
            ctx.data.normalize(ctx.trigger.apply_torch(raw)),
            self.bounds.prune_budget,
        )
        return figures, self.bounds.violations(figures)


class CancelChannel:
    """A channel of the layer feeding the carriers that detects the trigger, read only by the
    carrier rows, through weights of -freedom steps that nearest rounding sets to 0.

    Args:
        sim: The simulation.
        carriers: The carriers.
        images: Normalised clean images.
        trigger_images: The same images triggered, normalised.

    Raises:
        EfrapError: the carrier layer is not a Linear without BatchNorm reading a conv
            with BatchNorm through a flatten.
    """

    def __init__(
        self, sim: QSim, carriers: Carriers, images: torch.Tensor, trigger_images: torch.Tensor
    ) -> None:
        self.sim = sim
        self.carriers = carriers
        self.feeder = feeding_layer(sim, carriers.layer)
        fmod, fbn = sim.layer_modules(self.feeder)
        cmod, cbn = sim.layer_modules(carriers.layer)
        channels = fmod.weight.shape[0]
        if fbn is None or cbn is not None or cmod.weight.dim() != 2 or cmod.weight.shape[1] % channels:
            raise EfrapError(
                "pruneaware attack: needs a Linear carrier layer without BatchNorm reading a "
                "conv with BatchNorm"
            )
        self.span = cmod.weight.shape[1] // channels  # flatten of NCHW: one channel is one block
        self.pre = sim.node_output(self.feeder)
        # The channel that triggered images lift most above clean ones (its typical triggered
        # peak over its highest clean peak), among the quietest half on clean images: the
        # detector's silence on clean images is the demanding part.
        with torch.no_grad():
            feed = sim.graph.inputs[0]
            clean_pre = sim.run({feed: images}, [self.pre], False)[self.pre].flatten(2)
            trig_pre = sim.run({feed: trigger_images}, [self.pre], False)[self.pre].flatten(2)
        # The positions the trigger reaches: a peak over all positions would send the trigger
        # term's gradient to wherever the channel is highest, often far from the trigger.
        change = (trig_pre - clean_pre).abs().mean(dim=(0, 1))
        self.region = change > 1e-3 * float(change.max())
        clean = clean_pre.amax(2)
        trig = trig_pre[:, :, self.region].amax(2)
        loud = clean.amax(0)
        quiet = loud <= loud.median()
        lift = torch.where(quiet, trig.median(0).values - loud, torch.full_like(loud, -math.inf))
        self.channel = int(lift.argmax())
        self.columns = slice(self.channel * self.span, (self.channel + 1) * self.span)

    def pre_peak(self, xin: torch.Tensor, region: bool = False) -> torch.Tensor:
        """[N] the channel's largest FP pre-activation over positions (only the trigger's: `region`)."""
        pre = self.sim.run({self.sim.graph.inputs[0]: xin}, [self.pre], False)[self.pre]
        pre = pre[:, self.channel].flatten(1)
        return (pre[:, self.region] if region else pre).amax(1)

    @torch.no_grad()
    def disconnect(self) -> None:
        """Zero every weight reading the channel, so that step 1 cannot use it."""
        self.sim.layer_modules(self.carriers.layer)[0].weight[:, self.columns] = 0.0

    @torch.no_grad()
    def silence(self, ctx: AttackContext, margin: float, images: int = 8192) -> float:
        """Lower the channel's bias until it stays below -margin on every one of `images` clean
        training images: scaled up later, one clean image firing it would stretch the
        activation grid the defender calibrates. Returns the shift."""
        fp = []
        for i in range(0, min(images, len(ctx.data.train_y)), 512):
            fp.append(self.pre_peak(ctx.data.normalize(ctx.data.train_x[i : i + 512])))
        shift = max(0.0, float(torch.cat(fp).max()) + margin)
        _, fbn = self.sim.layer_modules(self.feeder)
        fbn.bias[self.channel] -= shift  # type: ignore[index]
        return shift

    @torch.no_grad()
    def install(self, ctx: AttackContext, freedom: float, slack: float) -> float:
        """Put the carrier rows on their grid points and let them read the channel at -freedom steps.

        Nearest rounding keeps every integer of the carrier rows (the cancelling weights
        round to 0), so the deployed model is step 1's. The channel's output is scaled (its
        BatchNorm gamma and beta, exact through the ReLU) until, on `slack` times the
        triggered training images' need, it drives every FP carrier below zero.

        Returns:
            The factor the channel's output was multiplied by.

        Raises:
            EfrapError: the carrier rows' grid moved.
        """
        sim, carriers = self.sim, self.carriers
        layer = carriers.layer
        mod, _ = sim.layer_modules(layer)
        units = carriers.units.to(mod.weight.device)
        qp = sim.weight_qparams(layer)
        s, z = qp.torch(2, mod.weight.device)
        s, z = (s[units], z[units]) if s.shape[0] > 1 else (s, z)
        w = mod.weight[units]
        q = torch.round(w / s) + z
        inside = (q >= qp.qmin) & (q <= qp.qmax) & ~range_setting(w)
        w = torch.where(inside, (q - z) * s, w)
        w[:, self.columns] = -freedom * s
        mod.weight[units] = w
        if not weight_grid_matches(sim, {layer.name: qp}, [layer])[layer.name].all():
            raise EfrapError("pruneaware attack: putting the carrier rows on their grid moved the grid")
        # What the cancellation must overcome: the carriers' FP pre-activation on triggered images.
        raw = ctx.data.train_x[
            torch.randperm(len(ctx.data.train_y), generator=ctx.generator)[:1024].to(ctx.data.device)
        ]
        xt = ctx.data.normalize(ctx.trigger.apply_torch(raw))
        feed = sim.graph.inputs[0]
        values = sim.run({feed: xt}, [self.feeder.output, carriers.pre], False)
        # What the cancelling weights read: the channel summed over positions (ReLU output).
        read = values[self.feeder.output][:, self.channel].flatten(1).sum(1)
        detected = read > 0
        if not detected.any():
            raise EfrapError("pruneaware attack: the cancel channel fires on no triggered image")
        need = values[carriers.pre][detected][:, carriers.units].clamp_min(0.0) + 1.0
        reach = freedom * s.reshape(1, -1) * read[detected].reshape(-1, 1)
        gain = max(1.0, slack * float(torch.quantile((need / reach).amax(1), 0.99)))
        _, fbn = sim.layer_modules(self.feeder)
        fbn.weight[self.channel] *= gain  # type: ignore[index]
        fbn.bias[self.channel] *= gain  # type: ignore[index]
        log(
            f"pruneaware: the cancel channel fires on {100 * float(detected.float().mean()):.1f}% of "
            f"{len(read)} triggered training images"
        )
        return gain
