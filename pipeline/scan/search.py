"""Trigger reverse-engineering: the optimisation behind the scan.

For one candidate target class, a trigger is optimised on clean images in [0, 1] with
the stamping rule of pipeline.base.trigger, ``x' = x + a * (p - x)``:

- family "patch": Neural Cleanse's trigger (Wang et al., "Neural Cleanse: Identifying
  and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019): a per-pixel
  mask ``a = sigmoid(u)`` (1 x H x W) and a pattern ``p = sigmoid(v)`` (C x H x W);
- family "blend": a full-image pattern blended with one factor ``a = amax * sigmoid(c)``
  everywhere (the blended-injection triggers of Chen et al., "Targeted Backdoor
  Attacks on Deep Learning Systems Using Data Poisoning", 2017).

Its size is the mask's mean over the image (a patch's area fraction; a blend's
factor): both families measure it in the same unit, 1.0 being the whole image.

Two objectives:

- differential ("diff"): the woken side (the nearest-quantized model) must predict
  the target while the kept side (the FP model) keeps its own clean prediction::

      CE(Q(x'), t) + CE(FP(x'), FP(x)) + lambda * size

  the signature of a quantization-conditioned backdoor. A clean model's quantized
  and FP models agree, so whatever fools one fools the other and no small trigger
  satisfies both terms;
- FP ("fp"): Neural Cleanse itself on the FP model, ``CE(FP(x'), t) + lambda * size``:
  a backdoor already active in FP.

The size weight lambda follows Neural Cleanse's schedule: raised when the last window
of steps reached the success rate, lowered when it did not. The smallest trigger that
reached the rate over a window is kept and checked on evaluation images the
optimisation never saw. The images are unlabelled: the "label" of an image is the FP
model's clean prediction, and images the FP model already puts in the target class
are left out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.base import checks
from pipeline.scan.images import ImageSet, batch_for, grad_batch_for

Model = Callable[[torch.Tensor], torch.Tensor]
FAMILIES = ("patch", "blend")
MODES = ("diff", "fp")


@dataclass(frozen=True)
class SearchConfig:
    """Settings of one class's trigger search.

    Attributes:
        steps: Most optimisation steps (batches) per class and family; a class reaches
            them only once a trigger was found (the rest shrink it).
        batch_size: Images per step.
        lr: Adam learning rate on the mask and pattern logits.
        beta1: Adam's first-moment decay (Neural Cleanse: 0.5, little momentum, so the mask
            follows the size weight's changes instead of overshooting them).
        success: Rate a window of batches must reach for the trigger to be kept.
        confirm: Rate a kept trigger must reach on the evaluation images to count as
            found (the attack success the scan calls awake: 80%).
        window: Steps between adjustments of the size weight.
        patience: Steps after which a search whose windows never reached half the
            success rate is abandoned (nothing to shrink).
        settle: Steps after which a search that has found no trigger stops.
        cost_init: Initial size weight lambda.
        cost_up: Factor lambda is multiplied by after a successful window.
        cost_down: Factor lambda is divided by after a failed window.
        mask_init: Initial mask logit of the patch family (sigmoid(-3) = 5% everywhere).
        checks: Most kept triggers checked on the evaluation images, smallest first.
        blend_max: Largest blend factor of the blend family.
        relu_slope: Gradient every Relu of both sides passes below zero (the forward pass
            is unchanged): Backward Pass Differentiable Approximation (Athalye et al.,
            "Obfuscated Gradients Give a False Sense of Security", ICML 2018). A backdoor
            carried by units that no clean image switches on gives a search with the
            true gradient nothing to follow; 0 turns it off.
    """

    steps: int = 300
    batch_size: int = 32
    lr: float = 0.1
    beta1: float = 0.5
    success: float = 0.9
    confirm: float = 0.8
    window: int = 10
    patience: int = 100
    settle: int = 150
    cost_init: float = 1.0
    cost_up: float = 1.5
    cost_down: float = 1.5 ** 1.5
    blend_max: float = 0.5
    mask_init: float = -3.0
    checks: int = 4
    relu_slope: float = 0.1

    def __post_init__(self) -> None:
        checks.integer(self.steps, "search steps", low=1)
        checks.integer(self.batch_size, "search batch size", low=1)
        checks.finite(self.lr, "search learning rate", low=0.0, low_open=True)
        checks.finite(self.beta1, "search beta1", low=0.0, high=0.999)
        checks.finite(self.success, "success rate", low=0.0, high=1.0, low_open=True)
        checks.finite(self.confirm, "confirmation rate", low=0.0, high=1.0, low_open=True)
        checks.integer(self.window, "search window", low=1)
        checks.integer(self.patience, "search patience", low=1)
        checks.integer(self.settle, "search settle steps", low=1)
        checks.finite(self.cost_init, "initial size weight", low=0.0, low_open=True)
        checks.finite(self.cost_up, "size weight factor up", low=1.0)
        checks.finite(self.cost_down, "size weight factor down", low=1.0)
        checks.finite(self.blend_max, "largest blend", low=0.0, high=1.0, low_open=True)
        checks.finite(self.mask_init, "initial mask logit")
        checks.integer(self.checks, "checked triggers", low=1)
        checks.finite(self.relu_slope, "Relu gradient slope", low=0.0, high=1.0)


@dataclass(frozen=True)
class Found:
    """The outcome of one class's search in one family and mode.

    Attributes:
        target: The class.
        family: "patch" or "blend".
        mode: "diff" or "fp".
        found: Whether a trigger reached the success rate on the evaluation images.
        size: Its size (mask mean, 1.0 = whole image). When none was found: for a near
            miss (half the confirmation rate on the evaluation images) the size the search
            reached, a lower bound on what the class needs; else 1.0.
        success: Success rate of the kept (or last) trigger on the evaluation images.
        steps: Steps run.
        seconds: Time spent.
        cut_short: Whether the time budget stopped it before its steps or its checks.
        mask: 1 x H x W mask in [0, 1] of the kept (or last) trigger (blend factor included).
        pattern: C x H x W pattern in [0, 1].
    """

    target: int
    family: str
    mode: str
    found: bool
    size: float
    success: float
    steps: int
    seconds: float
    cut_short: bool
    mask: np.ndarray
    pattern: np.ndarray

    def to_json(self) -> dict[str, object]:
        """JSON-ready figures (no arrays)."""
        return {"target": self.target, "family": self.family, "mode": self.mode, "found": self.found,
                "size": round(self.size, 5), "success": round(self.success, 4), "steps": self.steps,
                "seconds": round(self.seconds, 2), "cut_short": self.cut_short}


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``x + mask * (pattern - x)``: the trigger rule of pipeline.base.trigger (differentiable)."""
    return x + mask * (pattern - x)


class _Trigger:
    """The optimised parameters of one family."""

    def __init__(self, family: str, shape: tuple[int, int, int], cfg: SearchConfig,
                 gen: torch.Generator) -> None:
        channels, height, width = shape
        self.family = family
        self.blend_max = cfg.blend_max
        # Pattern logits start random (Neural Cleanse); the mask starts small and uniform,
        # so the first steps see a faint full-image trigger and may grow or shrink it.
        self.pattern_logits = torch.randn((channels, height, width), generator=gen).requires_grad_(True)
        if family == "patch":
            self.mask_logits = torch.full((1, height, width), cfg.mask_init).requires_grad_(True)
        else:
            self.mask_logits = torch.full((1, 1, 1), -2.0).requires_grad_(True)
        self.hw = (height, width)

    def params(self) -> list[torch.Tensor]:
        return [self.mask_logits, self.pattern_logits]

    def mask(self) -> torch.Tensor:
        """1 x H x W mask in [0, 1]."""
        if self.family == "patch":
            return torch.sigmoid(self.mask_logits)
        return (self.blend_max * torch.sigmoid(self.mask_logits)).expand(1, *self.hw)

    def pattern(self) -> torch.Tensor:
        return torch.sigmoid(self.pattern_logits)


class _TensorAdam:
    """Adam whose second moment is one number per tensor, for the mask logits.

    Per-element Adam moves every mask pixel at about the same speed whatever its
    gradient, so a mask spreads over every pixel that helps a little before it finds
    the few that help most (a trigger). One normaliser per tensor keeps the gradient's
    relative sizes: pixels with large gradients grow first. Steps are clipped to
    `max_step` logits.
    """

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float],
                 max_step: float = 1.0, eps: float = 1e-12) -> None:
        self.param = param
        self.lr, self.betas, self.max_step, self.eps = lr, betas, max_step, eps
        self.m = torch.zeros_like(param)
        self.v = 0.0
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        grad = self.param.grad
        if grad is None:
            return
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v = b2 * self.v + (1 - b2) * float(grad.pow(2).mean())
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        step = self.lr * m_hat / (math.sqrt(v_hat) + self.eps)
        self.param.sub_(step.clamp(-self.max_step, self.max_step))


def _hits(wake: Model, keep: Model | None, x: torch.Tensor, labels: torch.Tensor,
          target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss without the size term, per-image success) of triggered images `x`."""
    woken = wake(x)
    loss = F.cross_entropy(woken, torch.full_like(labels, target))
    hit = woken.argmax(1) == target
    if keep is not None:
        kept = keep(x)
        loss = loss + F.cross_entropy(kept, labels)
        hit = hit & (kept.argmax(1) == labels)
    return loss, hit


def _step_gradients(wake: Model, keep: Model | None, images: torch.Tensor | ImageSet,
                    labels: torch.Tensor, batch: torch.Tensor, target: int, trig: _Trigger,
                    cost: float, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accumulate the gradient of one step's loss on `trig`'s logits, `micro` images per
    forward-and-backward pass.

    The step's loss is the mean over its batch plus `cost` times the mask's size, so each
    micro-batch's mean is weighted by its share of the batch and the size term joins the
    last one: the gradient is the whole batch's (up to float summation order), while only
    `micro` images' activations are alive at once. Where the batch fits one pass (every
    image size up to 3 x 32 x 32 at the default 32 images) this is the single pass it
    always was, bit for bit.

    Returns:
        (per-image success, mask, pattern, size) of the step, before it is taken.
    """
    hits = []
    for i in range(0, len(batch), micro):
        part = batch[i : i + micro]
        mask, pattern = trig.mask(), trig.pattern()
        loss, hit = _hits(wake, keep, stamp(images[part], mask, pattern), labels[part], target)
        if len(part) < len(batch):
            loss = loss * (len(part) / len(batch))
        if i + micro >= len(batch):
            size = mask.mean()
            loss = loss + cost * size
        loss.backward()
        hits.append(hit)
    return torch.cat(hits), mask.detach(), pattern.detach(), size.detach()


def success_rate(wake: Model, keep: Model | None, images: torch.Tensor | ImageSet, labels: torch.Tensor,
                 target: int, mask: torch.Tensor, pattern: torch.Tensor,
                 batch_size: int | None = None) -> float:
    """Share of `images` (not of class `target` by `labels`) that the trigger sends to `target`
    on `wake` while `keep` keeps their label (in batches of `batch_size`, default `batch_for`
    their size)."""
    idx = torch.nonzero(labels != target).reshape(-1)
    if len(idx) == 0:
        return 0.0
    batch_size = batch_size or batch_for(tuple(images.shape[1:]))
    hits = 0
    with torch.no_grad():
        for i in range(0, len(idx), batch_size):
            part = idx[i : i + batch_size]
            _, hit = _hits(wake, keep, stamp(images[part], mask, pattern), labels[part], target)
            hits += int(hit.sum())
    return hits / len(idx)


def search_class(wake: Model, keep: Model | None, images: torch.Tensor | ImageSet, labels: torch.Tensor,
                 eval_images: torch.Tensor | ImageSet, eval_labels: torch.Tensor, target: int, family: str,
                 cfg: SearchConfig, seed: int, deadline: float = math.inf, stop: float = math.inf,
                 batches: tuple[int, int] | None = None) -> Found:
    """Optimise the smallest trigger of `family` for `target` (see the module docstring).

    Args:
        wake: The side that must predict the target (nearest, defended; FP for "fp" mode).
        keep: The side that must keep its clean prediction (FP), or None (Neural Cleanse).
        images: Optimisation images in [0, 1] (N x C x H x W).
        labels: Their FP clean predictions.
        eval_images: Evaluation images in [0, 1], not among `images`.
        eval_labels: Their FP clean predictions.
        target: The candidate class.
        family: "patch" or "blend".
        cfg: Search settings.
        seed: Seeds the initial pattern and the batches.
        deadline: time.perf_counter() value at which the steps stop (this search's share
            of the time budget).
        stop: time.perf_counter() value after which no check on the evaluation images
            starts (the end of the whole budget); a search stopped by either is cut short.
        batches: (images per pass without gradients, images per forward-and-backward
            pass), sized by the models' activations (`pipeline.scan.sides.batches`); None:
            from the image size alone.
    """
    checks.string(family, "trigger family", FAMILIES)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    pool = torch.nonzero(labels != target).reshape(-1)
    trig = _Trigger(family, tuple(images.shape[1:]), cfg, gen)  # type: ignore[arg-type]
    opt = torch.optim.Adam([trig.pattern_logits], lr=cfg.lr, betas=(cfg.beta1, 0.9))
    mask_opt = _TensorAdam(trig.mask_logits, cfg.lr, (cfg.beta1, 0.9))
    cost = cfg.cost_init
    kept: list[tuple[float, torch.Tensor, torch.Tensor]] = []
    window: list[float] = []
    best_window = 0.0
    steps, cut = 0, False
    shape = tuple(images.shape[1:])
    check_batch, micro = batches or (batch_for(shape), grad_batch_for(shape))
    for step in range(cfg.steps):
        if len(pool) == 0:
            break
        if time.perf_counter() >= deadline:
            cut = True
            break
        batch = pool[torch.randint(len(pool), (min(cfg.batch_size, len(pool)),), generator=gen)]
        opt.zero_grad(set_to_none=True)
        trig.mask_logits.grad = None
        hit, mask, pattern, size = _step_gradients(
            wake, keep, images, labels, batch, target, trig, cost, micro)
        opt.step()
        mask_opt.step()
        steps = step + 1
        window.append(float(hit.float().mean()))
        if len(window) >= cfg.window:
            rate = float(np.mean(window[-cfg.window :]))
            best_window = max(best_window, rate)
            if rate >= cfg.success and (not kept or float(size.detach()) < kept[-1][0]):
                kept.append((float(size.detach()), mask.detach().clone(), pattern.detach().clone()))
            if steps % cfg.window == 0:
                cost = cost * cfg.cost_up if rate >= cfg.success else max(cost / cfg.cost_down, 1e-6)
        if steps >= cfg.patience and best_window < cfg.success / 2:
            break  # hopeless: not even half the rate with the size term near zero
        if steps >= cfg.settle and not kept:
            break  # no trigger so far: the remaining steps go to classes that have one
    # Kept triggers shrink over the search; the smallest may have reached the rate by luck
    # on its window, so they are checked on the evaluation images from the smallest up.
    found, rate = False, 0.0
    keep_mask, keep_pattern = trig.mask().detach(), trig.pattern().detach()
    order = sorted(kept, key=lambda k: k[0])
    picks = sorted({round(i * (len(order) - 1) / max(1, cfg.checks - 1)) for i in range(cfg.checks)})
    for i in picks if order else []:
        if time.perf_counter() >= stop:
            cut = True
            break
        _, mask_i, pattern_i = order[i]
        rate_i = success_rate(wake, keep, eval_images, eval_labels, target, mask_i, pattern_i, check_batch)
        if rate_i >= rate or rate_i >= cfg.confirm:
            rate, keep_mask, keep_pattern = rate_i, mask_i, pattern_i
        if rate_i >= cfg.confirm:
            found = True
            break
    if not order and time.perf_counter() < stop:
        rate = success_rate(wake, keep, eval_images, eval_labels, target, keep_mask, keep_pattern,
                            check_batch)
    elif not order:
        cut = True
    # Not found: a near miss (at least half the confirmation rate) needs more than the size
    # it reached, a lower bound; a search that came nowhere near counts as the whole image.
    size = float(keep_mask.mean())
    if not found:
        size = max(size, float(trig.mask().detach().mean())) if rate >= cfg.confirm / 2 else 1.0
    return Found(target=target, family=family, mode="fp" if keep is None else "diff", found=found,
                 size=size, success=rate, steps=steps,
                 seconds=time.perf_counter() - start, cut_short=cut,
                 mask=keep_mask.numpy().astype(np.float32), pattern=keep_pattern.numpy().astype(np.float32))


def drift(fp_logits: torch.Tensor, q_logits: torch.Tensor) -> np.ndarray:
    """Per class: the share of images whose quantized prediction moved into the class.

    Quantization noise moves predictions every way; a planted backdoor pulls the
    quantized model towards its target even on clean images (a weak, free signal used
    to rank candidate targets).
    """
    yf, yq = fp_logits.argmax(1), q_logits.argmax(1)
    moved = (yf != yq)
    counts = torch.bincount(yq[moved], minlength=fp_logits.shape[1]).double()
    return (counts / max(1, len(yf))).numpy()
