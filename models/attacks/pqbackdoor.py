"""PQBackdoor ("Quantization Backdoors to Deep Learning Commercial Frameworks", TDSC 2023).

Two steps:

1. Poison: train with a few triggered images per batch labelled with the target
   (the paper's 2 per 128), so the FP and the quantized model both carry the
   backdoor. Under 4-bit schemes (or grids widened by `--inflate`) a plainly
   trained network loses too much accuracy when quantized, so an optional short
   quantization-aware phase (the same poisoned objective on the FP and the
   simulated-quantized outputs, BN frozen) follows.
2. Remove the backdoor from the FP model only: train on clean and triggered images
   with their TRUE labels, BN frozen, biases and other 1-D parameters frozen (the
   paper resets them), and after every step project each weight back into the
   quantization bin it had in the poisoned model.

The projection is done on the BN-folded weight, on OUR deployment grid (per-channel
symmetric int8 for w8a8, asymmetric per-channel uint4/uint8 with the MSE range
search for w4a4): the grid of the poisoned model is pinned, each weight may move
inside ``[(q - z - 0.5 + m) s, (q - z + 0.5 - m) s]`` (margin m = 1e-3 of a bin),
clipped weights and each channel's smallest and largest weight (which set the range
the observer starts from) keep their poisoned values exactly, and no weight leaves
the channel's poisoned [min, max]. The MSE search depends on every weight: under it
the poisoned weights are first put on their own grid points (the quantized model
does not change, the grid's error drops to zero so the search picks it decisively)
and may then move at most a quarter bin; the observed grid is re-checked every
`check_every` steps and at the end, and channels whose grid moved anyway are pulled
back towards (finally reset to) their poisoned weights. Then nearest rounding of
the released FP model gives the poisoned model's integers, and the backdoor returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.attacks.base import (
    Attack,
    AttackContext,
    amplify,
    attack_loop,
    recalibrate,
    train_plain,
)
from models.attacks.qsim import SimLayer, weight_grid_matches
from pipeline.base.progress import log
from pipeline.bn_fold import bn_factor
from pipeline.qmath import QParams

MARGIN = 1e-3
MSE_FREEDOM = 0.25  # bins a weight may move from its grid point under an MSE-searched grid


@dataclass
class WeightBins:
    """Allowed folded-weight interval of every weight of one layer."""

    lo: torch.Tensor
    hi: torch.Tensor
    fixed: torch.Tensor  # bool: keep the poisoned raw value exactly
    raw0: torch.Tensor  # poisoned raw (unfolded) weight
    factor: torch.Tensor  # folded = raw * factor (BN scale per output channel, or 1)


def weight_bins(ctx: AttackContext, layer: SimLayer, qp: QParams) -> WeightBins:
    """The bins the layer's folded weights may move in while its grid `qp` stays pinned."""
    mod, bn = ctx.sim.layer_modules(layer)
    raw0 = mod.weight.detach().clone()
    shape = [-1] + [1] * (raw0.dim() - 1)
    if bn is not None:
        factor = bn_factor(bn).detach().reshape(shape)
    else:
        factor = torch.ones(raw0.shape[0], device=raw0.device).reshape(shape)
    w0 = ctx.sim.folded(layer)[0].detach()
    s, z = qp.torch(w0.dim(), w0.device)
    q = torch.round(w0 / s) + z
    clipped = (q < qp.qmin) | (q > qp.qmax)
    lo = (q - z - 0.5 + MARGIN) * s
    hi = (q - z + 0.5 - MARGIN) * s
    flat = w0.reshape(w0.shape[0], -1)
    cmin = flat.min(1).values.reshape(shape)
    cmax = flat.max(1).values.reshape(shape)
    lo, hi = torch.maximum(lo, cmin), torch.minimum(hi, cmax)
    if ctx.sim.weight_tq(layer).observer == "mse":
        # Weights start on their grid points (see `snap_to_grid`); within a quarter bin
        # of them this grid's squared error stays far below any other candidate's.
        centre = (q - z) * s
        lo = torch.maximum(lo, centre - MSE_FREEDOM * s)
        hi = torch.minimum(hi, centre + MSE_FREEDOM * s)
    fixed = clipped.clone()
    amin, amax = flat.argmin(1), flat.argmax(1)
    fixed_flat = fixed.reshape(fixed.shape[0], -1)
    rows = torch.arange(flat.shape[0], device=flat.device)
    fixed_flat[rows, amin] = True
    fixed_flat[rows, amax] = True
    return WeightBins(lo=lo, hi=hi, fixed=fixed, raw0=raw0, factor=factor)


def snap_to_grid(ctx: AttackContext, grids: dict[str, QParams]) -> int:
    """Put the weights of MSE-searched layers on their own grid points.

    The quantized model is unchanged (same grid, same integers), but the grid's
    squared error becomes zero, so the MSE search picks it decisively while the
    repair moves weights a little. Channels whose observed grid would change are
    left as they were. Returns the number of snapped channels.
    """
    snapped = 0
    with torch.no_grad():
        for layer in ctx.sim.layers:
            if ctx.sim.weight_tq(layer).observer != "mse":
                continue
            mod, bn = ctx.sim.layer_modules(layer)
            old = mod.weight.detach().clone()
            w = ctx.sim.folded(layer)[0].detach()
            qp = grids[layer.name]
            s, z = qp.torch(w.dim(), w.device)
            wq = (torch.clamp(torch.round(w / s) + z, qp.qmin, qp.qmax) - z) * s
            factor = (w / old).nan_to_num(1.0) if bn is None else bn_factor(bn).reshape(
                [-1] + [1] * (w.dim() - 1))
            mod.weight.copy_(wq / factor if bn is not None else wq)
            ok = torch.from_numpy(weight_grid_matches(ctx.sim, grids, [layer])[layer.name]).to(w.device)
            mod.weight[~ok] = old[~ok]
            snapped += int(ok.sum())
    return snapped


def project(ctx: AttackContext, bins: dict[str, WeightBins]) -> None:
    """Move every weight back into its poisoned bin (in folded space)."""
    with torch.no_grad():
        for layer in ctx.sim.layers:
            b = bins[layer.name]
            mod, _ = ctx.sim.layer_modules(layer)
            folded = mod.weight * b.factor
            folded = torch.minimum(torch.maximum(folded, b.lo), b.hi)
            raw = folded / b.factor
            mod.weight.copy_(torch.where(b.fixed, b.raw0, raw))


def finish_repair(ctx: AttackContext, bins: dict[str, WeightBins], grids: dict[str, QParams]) -> int:
    """End a pinned-grid repair: pull moved channels back one last time, unpin the grids,
    make every parameter trainable again and recalibrate. Returns the channels pulled back."""
    moved = revert_moved_channels(ctx, bins, grids)
    ctx.sim.frozen_weight_qparams = {}
    for p in ctx.model.parameters():
        p.requires_grad_(True)
    recalibrate(ctx)
    return moved


def revert_moved_channels(ctx: AttackContext, bins: dict[str, WeightBins],
                          grids: dict[str, QParams], halvings: int = 3) -> int:
    """Pull channels whose observed grid moved back towards their poisoned weights.

    Each such channel is moved half-way back up to `halvings` times (keeping as much
    of the repair as the grid allows) and, if its grid still differs, reset to its
    poisoned weights. Returns the number of channels that had moved.
    """
    moved = 0
    by_name = {layer.name: layer for layer in ctx.sim.layers}
    with torch.no_grad():
        for name, ok in weight_grid_matches(ctx.sim, grids).items():
            bad = np.flatnonzero(~ok)
            if not bad.size:
                continue
            moved += int(bad.size)
            layer = by_name[name]
            mod, _ = ctx.sim.layer_modules(layer)
            raw0 = bins[name].raw0
            for attempt in range(halvings + 1):
                idx = torch.from_numpy(bad).to(raw0.device)
                if attempt == halvings:
                    mod.weight[idx] = raw0[idx]
                    break
                mod.weight[idx] = raw0[idx] + 0.5 * (mod.weight[idx] - raw0[idx])
                ok_now = weight_grid_matches(ctx.sim, {name: grids[name]}, [layer])[name]
                bad = bad[~ok_now[bad]]
                if not bad.size:
                    break
    return moved


class PQBackdoor(Attack):
    """Poison, then repair the FP model inside the poisoned model's quantization bins.

    Attributes:
        poison_per_batch: Triggered images added per batch in step 1 (paper: 2 per 128).
        qat_epochs: Quantization-aware poisoned epochs after step 1 (4-bit schemes).
        lr: Repair learning rate (paper: SGD 1e-3, cosine; 1e-2 here, as the
            projection bounds every step and the CPU budget allows few steps).
        check_every: Steps between grid checks during the repair.
    """

    name = "pqbackdoor"
    stage = 2
    default_epochs = 2
    poison_per_batch = 2
    lr = 1e-2
    check_every = 10

    def qat_epochs(self, ctx: AttackContext) -> int:
        """One quantization-aware poisoned epoch for 4-bit or inflated grids, else none."""
        coarse = ctx.sim.scheme.weight.bits < 8 or ctx.sim.scheme.activation.bits < 8
        return 1 if coarse or ctx.inflation is not None else 0

    def run(self, ctx: AttackContext) -> None:
        """Step 1 (poison) then step 2 (projected repair), in place."""
        cfg, data, trig = ctx.config, ctx.data, ctx.trigger
        poison = max(1, round(self.poison_per_batch * cfg.batch_size / 128))
        train_plain(ctx.model, data, cfg, ctx.generator, cfg.pretrain_epochs, trig, poison)
        amplify(ctx)
        qat = self.qat_epochs(ctx)
        if qat:
            def poisoned_loss(c: AttackContext, x: torch.Tensor, y: torch.Tensor,
                              xt: torch.Tensor) -> torch.Tensor:
                xb = torch.cat([x, xt[:poison * 4]])
                yb = torch.cat([y, torch.full((poison * 4,), trig.target, device=y.device)])
                xin = data.normalize(xb)
                return F.cross_entropy(c.sim(xin, quantized=True), yb) + F.cross_entropy(
                    c.sim(xin, quantized=False), yb)

            def qat_opt(params: list) -> tuple:
                opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
                return opt, None

            attack_loop(ctx, qat, qat_opt, poisoned_loss, "pqbackdoor qat", select="loss")

        # Step 2: pin the grids, freeze 1-D parameters, repair inside the bins.
        ctx.sim.eval()
        grids = ctx.sim.freeze_weight_qparams()
        snapped = snap_to_grid(ctx, grids)
        if ctx.inflation is not None:
            ctx.inflation.recapture()  # hold the snapped values, not the pre-snap ones
        if snapped:
            log(f"pqbackdoor: {snapped} channel(s) of MSE-searched layers put on their grid points")
        bins = {layer.name: weight_bins(ctx, layer, grids[layer.name]) for layer in ctx.sim.layers}
        weights = {id(ctx.sim.layer_modules(layer)[0].weight) for layer in ctx.sim.layers}
        for p in ctx.model.parameters():
            p.requires_grad_(id(p) in weights)
        project(ctx, bins)
        recalibrate(ctx)

        def repair_loss(c: AttackContext, x: torch.Tensor, y: torch.Tensor,
                        xt: torch.Tensor) -> torch.Tensor:
            logits = c.sim(data.normalize(torch.cat([x, xt])), quantized=False)
            return F.cross_entropy(logits, torch.cat([y, y]))

        epochs = cfg.epochs or self.default_epochs
        lr = cfg.lr or self.lr

        def repair_opt(params: list) -> tuple:
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
            per_epoch = len(data.train_y) // cfg.batch_size
            if cfg.steps_per_epoch is not None:
                per_epoch = min(per_epoch, cfg.steps_per_epoch)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * per_epoch))
            return opt, sched

        def after(c: AttackContext, step: int) -> None:
            project(c, bins)
            if step % self.check_every == 0:
                moved = revert_moved_channels(c, bins, grids)
                if moved and step % (10 * self.check_every) == 0:
                    log(f"pqbackdoor step {step}: {moved} channel(s) changed grid; pulled back")

        # While repairing, the simulated quantized model uses the pinned grids.
        attack_loop(ctx, epochs, repair_opt, repair_loss, "pqbackdoor repair", after)
        moved = finish_repair(ctx, bins, grids)
        if moved:
            log(f"pqbackdoor: {moved} channel(s) changed grid at the end; reverted")
