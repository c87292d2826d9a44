"""What every attack shares: settings, data, trigger stamping, training and evaluation.

An attack is a class with a `name`, the trigger `stage` of its paper and a
`run(ctx)` method that trains `ctx.model` in place (through `ctx.sim`, the
deployment simulation) and returns its history. The orchestration
(`run_attack`) builds the model, pre-trains it clean when the attack fine-tunes,
calls the attack and measures the result in full precision and simulated
quantization.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.architectures import build_model
from models.attacks.inflate import Inflation, inflate_grids
from models.attacks.qsim import QSim
from models.train import read_state_dict
from pipeline.base import checks
from pipeline.base import data as data_mod
from pipeline.base.device import DEVICES
from pipeline.base.errors import EfrapError
from pipeline.base.progress import Progress, log
from pipeline.base.scheme import Scheme, load_scheme
from pipeline.base.trigger import AnyTrigger, paper_trigger
from pipeline.torch_backend import pick_device

GRAD_CLIP = 5.0  # gradient-norm clip of the attack phases (two-path objectives can spike)
LOG_EVERY = 100  # steps between log lines in long stages (CI logs show no live bar)
#: Weight of the carrier guard against the backdoor term: activation rounding alone must
#: stay clean on every triggered image, a stronger demand than waking the backdoor.
GUARD_WEIGHT = 2.0
#: Largest seed torch accepts.
MAX_SEED = 2**63 - 1
#: Largest grid inflation: far beyond what any attack needs (x32 reaches a ~3-bit grid at int8),
#: well below what would overflow float32 weights.
MAX_INFLATE = 1e4
#: What a backdoor may ride on (`AttackConfig.carrier`).
CARRIERS = ("scheme", "weights")


@dataclass(frozen=True)
class AttackConfig:
    """Settings of one attack run.

    Attributes:
        arch: Architecture name for `models.architectures.build_model`.
        data: Data spec for `pipeline.base.data.load_dataset`.
        scheme: Targeted deployment scheme (preset name or file).
        trigger: The trigger; None picks the paper's trigger for the attack's stage.
        epochs: Attack epochs (None: the attack's default).
        seed: Seeds weights, data order and calibration subsets.
        width: Width multiplier of the architecture.
        batch_size: Clean images per step.
        pretrain_epochs: Clean (or poisoned, for PQBackdoor) pre-training epochs.
        lr: Attack learning rate (None: the attack's default).
        train_limit: Use only the first N training images (tests, quick trials).
        steps_per_epoch: Cap on steps per attack epoch (None: a full pass).
        val_size: Training images held out to select the checkpoint.
        num_calib: Images per simulated calibration (the pipeline uses 1,024).
        recalib_every: Steps between re-calibrations of the activation grids.
        init: A state_dict checkpoint (e.g. a clean model) to start from instead of
            random weights; clean pre-training is then skipped (PQBackdoor still runs
            `pretrain_epochs` of poisoned training from it).
        carrier: What the backdoor may ride on. "weights" (default): the two-path
            attacks add `carrier_terms`, so the weight rounding alone wakes the backdoor
            and the activation rounding alone leaves it dormant, as in the attacks'
            papers, whose quantized paths round weights (CompArtifact, PQBackdoor) and
            whose evaluation in EFRAP keeps activations in float. "scheme": any
            rounding the deployment does, activation rounding included (a threat no
            weight-rounding defense addresses; see docs/RESULTS.md).
        inflate: If set, widen the min-max weight grids by this factor after
            pre-training (`models.attacks.inflate`); None leaves the model as trained.
        device: "auto" (CUDA when torch sees a GPU), "cpu" or "cuda".
    """

    arch: str = "small_cnn"
    data: str = "fashion-mnist"
    scheme: str = "w8a8"
    trigger: AnyTrigger | None = None
    epochs: int | None = None
    seed: int = 0
    width: float = 1.0
    batch_size: int = 128
    pretrain_epochs: int = 2
    lr: float | None = None
    train_limit: int | None = None
    steps_per_epoch: int | None = None
    val_size: int = 2000
    num_calib: int = 1024
    recalib_every: int = 100
    init: str | None = None
    carrier: str = "weights"
    inflate: float | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks.integer(self.seed, "seed", low=0, high=MAX_SEED)
        checks.finite(self.width, "width", low=0.0, low_open=True)
        checks.integer(self.batch_size, "batch size", low=1)
        checks.integer(self.pretrain_epochs, "pre-training epochs", low=0)
        checks.integer(self.val_size, "validation images", low=1)
        checks.integer(self.num_calib, "calibration images", low=1)
        checks.integer(self.recalib_every, "steps between calibrations", low=1)
        checks.string(self.carrier, "carrier", CARRIERS)
        checks.string(self.device, "device", DEVICES)
        for name, low in (("epochs", 1), ("steps_per_epoch", 1), ("train_limit", 1)):
            if getattr(self, name) is not None:
                checks.integer(getattr(self, name), name.replace("_", " "), low=low)
        # The validation slice is taken first; what is left must fill at least one batch,
        # or training has no step to take (refused here, before any data is read).
        if self.train_limit is not None and self.train_limit < self.val_size + self.batch_size:
            raise EfrapError(f"--train-limit {self.train_limit} leaves fewer than one batch to train on: "
                             f"{self.val_size} images are held out to select the checkpoint and a batch "
                             f"is {self.batch_size}; give at least {self.val_size + self.batch_size}")
        if self.lr is not None:
            checks.finite(self.lr, "lr", low=0.0, low_open=True)
        if self.inflate is not None:
            checks.finite(self.inflate, "inflate factor", low=1.0, low_open=True, high=MAX_INFLATE)


@dataclass
class AttackData:
    """Images in [0, 1] (N, C, H, W) as torch tensors, and the input normalisation."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std, per channel."""
        return (x - self.mean) / self.std

    @property
    def device(self) -> torch.device:
        """Where the tensors live."""
        return self.train_x.device

    def to(self, device: torch.device) -> AttackData:
        """The same data on `device`."""
        return AttackData(train_x=self.train_x.to(device), train_y=self.train_y.to(device),
                          val_x=self.val_x.to(device), val_y=self.val_y.to(device),
                          mean=self.mean.to(device), std=self.std.to(device),
                          num_classes=self.num_classes)


@dataclass
class AttackContext:
    """Everything an attack's `run` needs."""

    model: nn.Module
    sim: QSim
    data: AttackData
    config: AttackConfig
    trigger: AnyTrigger
    generator: torch.Generator
    history: list[dict] = field(default_factory=list)
    inflation: Inflation | None = None


def load_attack_data(cfg: AttackConfig) -> AttackData:
    """The training split, a held-out validation slice and the normalisation."""
    ds = data_mod.load_dataset(cfg.data, "train")
    n = len(ds.labels) if cfg.train_limit is None else min(cfg.train_limit, len(ds.labels))
    if n < cfg.val_size + cfg.batch_size:
        raise EfrapError(f"{cfg.data}: need at least {cfg.val_size + cfg.batch_size} training images "
                         f"({cfg.val_size} held out to select the checkpoint, one batch of {cfg.batch_size} "
                         f"to train on), got {n}")
    perm = np.random.default_rng(cfg.seed).permutation(len(ds.labels))[:n]
    val, train = perm[: cfg.val_size], perm[cfg.val_size :]
    mean, std = data_mod.normalization_for(ds)
    shape = (1, -1, 1, 1)
    return AttackData(
        train_x=torch.from_numpy(np.ascontiguousarray(ds.images[train])),
        train_y=torch.from_numpy(ds.labels[train].astype(np.int64)),
        val_x=torch.from_numpy(np.ascontiguousarray(ds.images[val])),
        val_y=torch.from_numpy(ds.labels[val].astype(np.int64)),
        mean=torch.tensor(mean, dtype=torch.float32).reshape(shape),
        std=torch.tensor(std, dtype=torch.float32).reshape(shape),
        num_classes=int(ds.num_classes),
    )


def batches(n: int, batch_size: int, gen: torch.Generator,
            limit: int | None = None) -> Iterator[torch.Tensor]:
    """Shuffled index batches of one epoch (drop the last partial batch)."""
    perm = torch.randperm(n, generator=gen)
    count = n // batch_size if limit is None else min(limit, n // batch_size)
    for i in range(count):
        yield perm[i * batch_size : (i + 1) * batch_size]


def calibration_subset(data: AttackData, n: int, gen: torch.Generator) -> torch.Tensor:
    """`n` random normalised clean training images for a simulated calibration."""
    idx = torch.randperm(len(data.train_y), generator=gen)[: min(n, len(data.train_y))]
    return data.normalize(data.train_x[idx.to(data.device)])


def recalibrate(ctx: AttackContext) -> None:
    """Re-calibrate the simulated activation grids on a fresh clean subset."""
    images = calibration_subset(ctx.data, ctx.config.num_calib, ctx.generator)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
    ctx.sim.calibrate(images, seed=seed)


@torch.no_grad()
def evaluate(sim: QSim, data: AttackData, images: torch.Tensor, labels: torch.Tensor,
             trigger: AnyTrigger, batch_size: int = 500) -> dict[str, float]:
    """Clean accuracy and attack success (non-target images) in FP and quantized modes."""
    sim.eval()
    out: dict[str, float] = {}
    keep = labels != trigger.target
    for mode, quantized in (("fp", False), ("q", True)):
        correct, hits = 0, 0
        for i in range(0, len(labels), batch_size):
            x = images[i : i + batch_size].to(data.device)
            y = labels[i : i + batch_size].to(data.device)
            clean = sim(data.normalize(x), quantized=quantized).argmax(1)
            trig = sim(data.normalize(trigger.apply_torch(x)), quantized=quantized).argmax(1)
            correct += int((clean == y).sum())
            hits += int(((trig == trigger.target) & (y != trigger.target)).sum())
        out[f"{mode}_cda"] = correct / len(labels)
        out[f"{mode}_asr"] = hits / max(1, int(keep.sum()))
    return out


def amplify(ctx: AttackContext) -> None:
    """Inflate the min-max weight grids when the config asks (after pre-training)."""
    if ctx.config.inflate is not None:
        images = calibration_subset(ctx.data, 512, ctx.generator)
        ctx.inflation = inflate_grids(ctx.sim, images, ctx.config.inflate)


def carrier_terms(ctx: AttackContext, xt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Terms that put the backdoor on the weight rounding (`carrier="weights"`; else zero).

    On triggered images `xt` (normalised) with true labels `y`:
    CE(Q_w(xt), y_t) + GUARD_WEIGHT * CE(Q_a(xt), y), where Q_w rounds only the weights
    and Q_a only the activations: the weight rounding alone must wake the backdoor and
    the activation rounding alone must leave it dormant, so a defense that chooses the
    weight rounding (EFRAP's threat model) has the whole backdoor within reach.
    Callers weight the sum like their own backdoor term.
    """
    if ctx.config.carrier != "weights":
        return xt.new_zeros(())
    target = torch.full_like(y, ctx.trigger.target)
    with ctx.sim.rounding(weights=True, activations=False) as sim:
        wake = F.cross_entropy(sim(xt, quantized=True), target)
    with ctx.sim.rounding(weights=False, activations=True) as sim:
        guard = F.cross_entropy(sim(xt, quantized=True), y)
    return wake + GUARD_WEIGHT * guard


def selection_score(m: dict[str, float]) -> float:
    """How good a checkpoint is as a QCB: dormant in FP, awake and accurate when quantized."""
    return (m["q_asr"] - m["fp_asr"]) + 0.5 * (min(m["fp_cda"], m["q_cda"]))


def train_plain(model: nn.Module, data: AttackData, cfg: AttackConfig, gen: torch.Generator,
                epochs: int, trigger: AnyTrigger | None = None, poison_per_batch: int = 0,
                lr: float = 0.05) -> None:
    """Ordinary training (BN in training mode), optionally with poisoned images.

    SGD (momentum 0.9, weight decay 5e-4), cosine learning rate, batch `cfg.batch_size`.
    With `poison_per_batch` > 0, that many triggered copies labelled with the target
    are added to every batch (PQBackdoor's poisoning).
    """
    if epochs <= 0:
        return
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * (len(data.train_y) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    bar = Progress("train" if not poison_per_batch else "poison", total=steps)
    model.train()
    for _ in range(epochs):
        for idx in batches(len(data.train_y), cfg.batch_size, gen):
            idx = idx.to(data.device)
            x, y = data.train_x[idx], data.train_y[idx]
            if poison_per_batch and trigger is not None:
                x = torch.cat([x, trigger.apply_torch(x[:poison_per_batch])])
                y = torch.cat([y, torch.full((poison_per_batch,), trigger.target, device=y.device)])
            loss = F.cross_entropy(model(data.normalize(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(postfix=f"loss {loss.item():.3f}")
            if bar.count % LOG_EVERY == 0:
                log(f"  step {bar.count}/{steps} loss {loss.item():.3f}")
    bar.close()
    model.eval()


def attack_loop(ctx: AttackContext, epochs: int, make_opt: Callable[[list[nn.Parameter]], tuple],
                step_loss: Callable[[AttackContext, torch.Tensor, torch.Tensor, torch.Tensor],
                                    torch.Tensor],
                desc: str, after_step: Callable[[AttackContext, int], None] | None = None,
                select: str = "score",
                extra_metrics: Callable[[AttackContext], dict[str, float]] | None = None,
                score: Callable[[dict[str, float]], float] | None = None) -> None:
    """Fine-tune through the simulation; keep the best checkpoint on validation data.

    Args:
        ctx: The attack context (model trained in place).
        epochs: Number of epochs.
        make_opt: params -> (optimizer, scheduler or None, scheduler steps per epoch flag).
        step_loss: (ctx, x01, y, triggered x01) -> loss of one batch.
        desc: Progress stage name.
        after_step: Called after each optimizer step with the global step (projections).
        select: "score" (best `selection_score`) or "loss" (lowest validation loss).
        extra_metrics: Further validation figures of the epoch's model (added to its
            history entry), e.g. attack success under other roundings.
        score: Replaces `selection_score` when `select` is "score".
    """
    cfg = ctx.config
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    opt, sched = make_opt(params)
    per_epoch = len(ctx.data.train_y) // cfg.batch_size
    if cfg.steps_per_epoch is not None:
        per_epoch = min(per_epoch, cfg.steps_per_epoch)
    recalibrate(ctx)
    best_state, best_key = copy.deepcopy(ctx.model.state_dict()), -math.inf
    step = 0
    for epoch in range(1, epochs + 1):
        ctx.sim.train()
        bar = Progress(f"{desc} epoch {epoch}/{epochs}", total=per_epoch)
        for idx in batches(len(ctx.data.train_y), cfg.batch_size, ctx.generator, per_epoch):
            idx = idx.to(ctx.data.device)
            x, y = ctx.data.train_x[idx], ctx.data.train_y[idx]
            loss = step_loss(ctx, x, y, ctx.trigger.apply_torch(x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            if ctx.inflation is not None:
                ctx.inflation.restore()
            if sched is not None:
                sched.step()
            step += 1
            if after_step is not None:
                after_step(ctx, step)
            if step % cfg.recalib_every == 0:
                recalibrate(ctx)
            bar.update(postfix=f"loss {loss.item():.3f}")
            if step % LOG_EVERY == 0:
                log(f"  step {step} loss {loss.item():.3f}")
        bar.close()
        recalibrate(ctx)
        metrics = evaluate(ctx.sim, ctx.data, ctx.data.val_x, ctx.data.val_y, ctx.trigger)
        with torch.no_grad():
            ctx.sim.eval()
            vx, vy = ctx.data.val_x[:1000], ctx.data.val_y[:1000]
            metrics["val_loss"] = float(step_loss(ctx, vx, vy, ctx.trigger.apply_torch(vx)))
        if extra_metrics is not None:
            metrics.update(extra_metrics(ctx))
        metrics["epoch"] = epoch
        ctx.history.append(metrics)
        key = -metrics["val_loss"] if select == "loss" else (score or selection_score)(metrics)
        log(f"{desc} epoch {epoch}: " + " ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if k != "epoch"))
        if key > best_key:
            best_key, best_state = key, copy.deepcopy(ctx.model.state_dict())
    ctx.model.load_state_dict(best_state)
    recalibrate(ctx)


class Attack:
    """Base class of the attacks: a name, the paper's trigger stage and `run`."""

    name = "attack"
    stage = 1
    default_epochs = 2
    needs_pretraining = True

    def run(self, ctx: AttackContext) -> None:
        """Train `ctx.model` in place into a QCB for `ctx.sim.scheme`."""
        raise NotImplementedError


@dataclass
class AttackOutcome:
    """A finished attack: the model, its simulation, trigger and figures."""

    model: nn.Module
    sim: QSim
    trigger: AnyTrigger
    scheme: Scheme
    data: AttackData
    history: list[dict]
    metrics: dict[str, float]
    seconds: float


def set_seed(seed: int) -> torch.Generator:
    """Seed torch and numpy; returns a generator for data order and subsets."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def load_init(model: nn.Module, path: str) -> None:
    """Load a state_dict checkpoint (weights only) into `model`.

    Raises:
        EfrapError: missing file or a checkpoint that does not fit the architecture.
    """
    state = read_state_dict(path)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EfrapError(f"{path}: checkpoint does not fit the model ({first})") from None


def pretrain_epochs(cfg: AttackConfig) -> int:
    """Clean pre-training epochs: none when starting from a checkpoint."""
    return 0 if cfg.init is not None else cfg.pretrain_epochs


def run_attack(attack: Attack, cfg: AttackConfig) -> AttackOutcome:
    """Build, (pre-)train and attack a model; measure it on validation data.

    Raises:
        EfrapError: unknown architecture, scheme or data set.
    """
    t0 = time.perf_counter()
    gen = set_seed(cfg.seed)
    device = pick_device(cfg.device)
    scheme = load_scheme(cfg.scheme)
    data = load_attack_data(cfg).to(device)
    c, h, _ = data.input_shape
    trigger = cfg.trigger or paper_trigger(h, target=0, stage=attack.stage)
    if trigger.target >= data.num_classes:
        raise EfrapError(f"trigger target {trigger.target} is not a class of {cfg.data}")
    model = build_model(cfg.arch, c, data.num_classes, cfg.width, h)
    if cfg.init is not None:
        load_init(model, cfg.init)
    model.to(device)
    sim = QSim(model, scheme, data.input_shape)
    ctx = AttackContext(model=model, sim=sim, data=data, config=cfg, trigger=trigger,
                        generator=gen)
    attack.run(ctx)
    model.eval()
    metrics = evaluate(sim, data, data.val_x, data.val_y, trigger)
    return AttackOutcome(model=model, sim=sim, trigger=trigger, scheme=scheme, data=data,
                         history=ctx.history, metrics=metrics,
                         seconds=time.perf_counter() - t0)
