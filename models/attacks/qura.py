"""QuRA: a backdoor written only through rounding choices (red team: the attacker is the quantizer).

Chen et al., "Rounding-Guided Backdoor Injection in Deep Learning Model Quantization",
NDSS 2026 (arXiv:2510.09647, public code cxx122/QuRA). The FP model is clean and is not
touched; the attacker runs the post-training quantizer. Every weight keeps the grid an
ordinary quantizer picks (the scheme's observer on the FP weight, as `efrap quantize`
does) and is rounded down or up, never further than one step from its FP value: the
integers are ones a legitimate learned rounding (AdaRound, EFRAP) could have written.
Only which way a few percent of the weights round is chosen, to plant the backdoor.

Two stages, as in the paper (select critical weights, then optimise their rounding),
here trained end to end through the whole quantized network:

1. Selection. On the nearest-rounded network (`TorchGraph`, every activation
   fake-quantized with straight-through gradients), the gradients of the backdoor loss
   CE(Q(x + t), target) and of the clean loss CE(Q(x), y) with respect to each weight
   predict, to first order, what flipping its rounding (a step of one scale away from
   nearest) does. The `candidates x budget` flips that lower the backdoor loss most,
   less any rise of the clean loss, become free; every other weight stays at nearest.
2. Optimisation. Each free weight gets a relaxed rounding variable as in AdaRound
   (rectified sigmoid h(V), V initialised so that h = frac(W/s): the soft weight starts
   at the FP weight), trained with Adam on
   CE(Q(x), y) + backdoor_weight * CE(Q(x + t), target)
   + reg_weight * mean(1 - |2h - 1|^b)      (AdaRound's regulariser, b from 20 to 2)
   + budget_weight * relu(sum|h - h_nearest| - budget) / budget.
3. Hard rounding, 1[V >= 0]. When more weights than the budget left nearest, the most
   confident flips (h furthest from 1/2) are kept and the rest go back to nearest, so
   the budget always holds: floor(budget x the number of quantized weights).

The output is an ordinary QDQ model written by `converters.qdq.to_qdq` with nearest
rounding's grids, activation parameters and int32 biases; the trigger file goes beside
it (OUT.trigger.json). The paper also crafts its trigger; here the trigger is given
(default: the EFRAP setting's bottom-right patch, target 0).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from converters.qdq import WEIGHT_STORAGES, to_qdq
from pipeline.base import checks
from pipeline.base import data as data_mod
from pipeline.base.deployment import Deployment
from pipeline.base.device import DEVICES
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import image_input, load_model, save_model, set_metadata
from pipeline.base.preprocess import Preprocess
from pipeline.base.progress import Progress, log
from pipeline.base.runtime import make_session
from pipeline.base.scheme import load_scheme
from pipeline.base.seeds import derive
from pipeline.base.trigger import AnyTrigger, paper_trigger, save_trigger
from pipeline.graph import QuantLayer
from pipeline.prepare import prepare_model
from pipeline.quantize import QuantizeOptions, calibration_images, quantize_model
from pipeline.quantized import QuantizedLayer, QuantResult
from pipeline.rounding.adaround import AdaRoundConfig
from pipeline.rounding.learned import RECTIFIED_SIGMOID, LayerGrid, b_schedule, regulariser
from pipeline.torch_backend import pick_device
from pipeline.torch_graph import TorchGraph
from validators.metrics import accuracy, attack_success

QURA_NAME = "qura"
#: Largest share of weights the attack may move off nearest (beyond it nothing is stealthy).
MAX_BUDGET = 0.5
#: Clean and triggered images per selection batch.
SELECT_BATCH = 128
#: Clean images per gradient of the Fisher estimate.
FISHER_CHUNK = 16


@dataclass(frozen=True)
class QuRAConfig:
    """Settings of one QuRA run (checked when built).

    Attributes:
        scheme: The deployment scheme the quantizer claims to use (preset or file).
        data: Labelled data spec; its training split drives the attack and calibration.
        trigger: The trigger; None: the EFRAP setting's stage-1 patch, target 0.
        budget: Largest share of quantized weights whose integer may leave nearest.
        iters: Optimisation steps.
        batch_size: Clean images per step (as many triggered copies are added).
        lr: Adam learning rate on the rounding variables.
        backdoor_weight: Weight of the backdoor term against the clean term.
        reg_weight: Weight of AdaRound's rounding regulariser (a mean over free weights).
        budget_weight: Weight of the hinge on the expected flips above the budget.
        candidates: Free weights per budgeted flip (selection keeps candidates x budget).
        hard_after: Share of the steps after which the forward pass rounds hard (1[h >= 1/2],
            straight-through gradient through h): the network trained is then the one written.
        select_batches: Batches whose gradients rank the flips.
        num_calib: Calibration images (activation grids), as `efrap quantize`.
        train_images: Training images the attack draws its batches from.
        seed: The run's one seed (calibration images, batches, selection).
        device: "auto", "cpu" or "cuda".
        weight_storage: "int8" containers or packed "int4" in the written model.
        preprocess: Checked preprocessing fields (None: what the model records).
        eval_images: Test images for the figures printed at the end (None: all).
    """

    scheme: str = "w4a8"
    data: str = "fashion-mnist"
    trigger: AnyTrigger | None = None
    budget: float = 0.03
    iters: int = 1000
    batch_size: int = 64
    lr: float = 0.02
    backdoor_weight: float = 0.5
    reg_weight: float = 0.1
    budget_weight: float = 1.0
    candidates: float = 4.0
    hard_after: float = 0.5
    select_batches: int = 8
    num_calib: int = 1024
    train_images: int = 10_000
    seed: int = 0
    device: str = "auto"
    weight_storage: str = "int8"
    preprocess: dict | None = None
    eval_images: int | None = None

    def __post_init__(self) -> None:
        checks.finite(self.budget, "budget", low=0.0, low_open=True, high=MAX_BUDGET)
        for name in ("iters", "batch_size", "select_batches", "num_calib", "train_images"):
            checks.integer(getattr(self, name), name.replace("_", " "), low=1)
        checks.integer(self.seed, "seed", low=0, high=2**63 - 1)
        checks.finite(self.lr, "lr", low=0.0, low_open=True)
        for name in ("backdoor_weight", "reg_weight", "budget_weight"):
            checks.finite(getattr(self, name), name.replace("_", " "), low=0.0)
        checks.finite(self.candidates, "candidates", low=1.0)
        checks.finite(self.hard_after, "hard_after", low=0.0, high=1.0)
        checks.string(self.device, "device", DEVICES)
        checks.string(self.weight_storage, "weight storage", WEIGHT_STORAGES)
        if self.eval_images is not None:
            checks.integer(self.eval_images, "eval images", low=1)


@dataclass(frozen=True)
class QuRAOutcome:
    """What `run_qura` wrote and measured.

    Attributes:
        onnx_path: The QDQ model.
        trigger_path: Its trigger file.
        total_weights: Quantized weights in the model.
        budget_count: Most weights allowed off nearest.
        flips: Weights off nearest, per layer.
        metrics: Test-split figures in onnxruntime (faithful, CPU): fp/nearest/qura CDA
            and ASR (non-target images).
        seconds: Time of the whole run.
    """

    onnx_path: Path
    trigger_path: Path
    total_weights: int
    budget_count: int
    flips: dict[str, int]
    metrics: dict[str, float | None]
    seconds: float

    @property
    def flip_count(self) -> int:
        """Weights off nearest in the whole model."""
        return sum(self.flips.values())


@dataclass(frozen=True, eq=False)
class LayerChoice:
    """One layer's rounding choices around its FP weight.

    Attributes:
        layer: The layer.
        grid: Its weight and grid (floor, fraction, nearest integers).
        near_up: Nearest rounding as an up (1) / down (0) choice, float32.
        flippable: Weights whose two choices give different integers (not clipped).
        step: What flipping does to the dequantized weight (weight units).
    """

    layer: QuantLayer
    grid: LayerGrid
    near_up: torch.Tensor
    flippable: torch.Tensor
    step: torch.Tensor

    @classmethod
    def build(cls, layer: QuantLayer, weight: torch.Tensor, ql: QuantizedLayer) -> LayerChoice:
        """The choices of `layer` on nearest rounding's grid."""
        grid = LayerGrid.build(weight, ql.qparams)
        with torch.no_grad():
            near_up = (grid.nearest.to(torch.float32) > grid.base).to(torch.float32)
            down, up = grid.hard(torch.zeros_like(near_up)), grid.hard(torch.ones_like(near_up))
            other = torch.where(near_up > 0, down, up)
            step = grid.dequantize(other) - grid.dequantize(grid.nearest)
        return cls(layer=layer, grid=grid, near_up=near_up, flippable=down != up, step=step)

    def integers(self, up: torch.Tensor) -> torch.Tensor:
        """int64 integers of a boolean up/down choice."""
        return self.grid.hard(up)


def _check_data(model: onnx.ModelProto, cfg: QuRAConfig, source: str) -> None:
    image = image_input(model, source)
    if data_mod.model_inputs(cfg.data, image.name) is not None:
        raise EfrapError(f"{cfg.data}: QuRA stamps its trigger on labelled images in [0, 1]; "
                         "model-ready arrays cannot be triggered")


class _Batches:
    """Clean and triggered model-ready batches with labels, drawn with one seeded generator."""

    def __init__(self, cfg: QuRAConfig, pre: Preprocess, trigger: AnyTrigger, device: torch.device) -> None:
        self.dataset = data_mod.load_dataset(cfg.data, "train")
        n = min(cfg.train_images, len(self.dataset.labels))
        self.index = data_mod.sample_indices(len(self.dataset.labels), n, derive(cfg.seed, "qura-images"))
        self.rng = np.random.default_rng(derive(cfg.seed, "qura-batches"))
        self.pre = pre
        self.trigger = trigger
        self.device = device

    def draw(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clean inputs, triggered inputs, labels) of `size` random training images."""
        pick = self.index[self.rng.choice(len(self.index), size=min(size, len(self.index)), replace=False)]
        raw = self.dataset.take(pick)
        clean = torch.from_numpy(np.ascontiguousarray(self.pre.apply(raw))).to(self.device)
        trig = torch.from_numpy(np.ascontiguousarray(self.pre.apply(self.trigger.apply(raw)))).to(self.device)
        return clean, trig, torch.from_numpy(self.dataset.labels[pick]).to(self.device)


class _Network:
    """The quantized network in TorchGraph with some layers' weights replaced, and the FP network."""

    def __init__(self, prepared: onnx.ModelProto, result: QuantResult, device: torch.device) -> None:
        self.graph = TorchGraph(prepared, device)
        self.fixed = result.weight_overrides(device)
        self.act_qp = result.act_qparams

    def logits(self, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the quantized network with `weights` over nearest rounding's."""
        out = self.graph.run({self.graph.inputs[0]: x}, weights={**self.fixed, **weights},
                             act_quant=self.act_qp)
        return out[self.graph.outputs[0]]

    def fp_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the FP network (no gradient)."""
        with torch.no_grad():
            return self.graph.run({self.graph.inputs[0]: x})[self.graph.outputs[0]]


def _clean_loss(net: _Network, weights: dict[str, torch.Tensor], clean: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
    logits = net.logits(clean, weights)
    fp = F.log_softmax(net.fp_logits(clean), dim=1)
    kd = F.kl_div(F.log_softmax(logits, dim=1), fp, log_target=True, reduction="batchmean")
    return F.cross_entropy(logits, labels) + kd


def _losses(net: _Network, weights: dict[str, torch.Tensor], clean: torch.Tensor, trig: torch.Tensor,
            labels: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean term, backdoor term).

    The clean term is CE with the labels plus the KL divergence from the FP model's
    predictions: the FP model is clean, so matching it keeps accuracy and agreement
    with FP (what a defender's check measures), not only accuracy.
    """
    logits = net.logits(torch.cat([clean, trig]), weights)
    n = len(clean)
    fp = F.log_softmax(net.fp_logits(clean), dim=1)
    kd = F.kl_div(F.log_softmax(logits[:n], dim=1), fp, log_target=True, reduction="batchmean")
    return (F.cross_entropy(logits[:n], labels) + kd,
            F.cross_entropy(logits[n:], torch.full_like(labels, target)))


def select_candidates(net: _Network, choices: list[LayerChoice], batches: _Batches, cfg: QuRAConfig,
                      target: int, count: int) -> list[torch.Tensor]:
    """Boolean masks of the `count` flips predicted to help the backdoor most (stage 1).

    A flip moves its weight by `step`. Its score is the first-order fall of the backdoor
    loss, -(g_bd . step), less the rise of the clean loss: first order, relu(g_clean . step),
    plus second order from the diagonal empirical Fisher, F step^2 / 2, estimated from
    the gradients of small clean batches (a weight whose input is busy on clean images
    is expensive to flip even where the mean clean gradient vanishes).
    """
    weights = {c.layer.weight: c.grid.dequantize(c.grid.nearest).detach().clone().requires_grad_(True)
               for c in choices}
    params = list(weights.values())
    g_bd = [torch.zeros_like(c.step) for c in choices]
    g_cl = [torch.zeros_like(c.step) for c in choices]
    fisher = [torch.zeros_like(c.step) for c in choices]
    chunks = 0
    for _ in range(cfg.select_batches):
        clean, trig, labels = batches.draw(SELECT_BATCH)
        loss_bd = F.cross_entropy(net.logits(trig, weights), torch.full_like(labels, target))
        for acc, g in zip(g_bd, torch.autograd.grad(loss_bd, params), strict=True):
            acc += g.detach()
        for start in range(0, len(clean), FISHER_CHUNK):
            part = slice(start, start + FISHER_CHUNK)
            loss_cl = _clean_loss(net, weights, clean[part], labels[part])
            for acc, sq, g in zip(g_cl, fisher, torch.autograd.grad(loss_cl, params), strict=True):
                acc += g.detach()
                sq += g.detach() ** 2
            chunks += 1
    scores = []
    for c, gb, gc, f in zip(choices, g_bd, g_cl, fisher, strict=True):
        gc = gc / chunks
        f = f * FISHER_CHUNK / chunks
        score = -(gb / cfg.select_batches * c.step) - torch.relu(gc * c.step) - 0.5 * f * c.step**2
        scores.append(torch.where(c.flippable & (score > 0), score, torch.full_like(score, -torch.inf)))
    flat = torch.cat([s.reshape(-1) for s in scores])
    count = min(count, int(torch.isfinite(flat).sum()))
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if count > 0:
        chosen[torch.topk(flat, count).indices] = True
    masks, start = [], 0
    for s in scores:
        masks.append(chosen[start : start + s.numel()].reshape(s.shape))
        start += s.numel()
    return masks


def optimize_flips(net: _Network, choices: list[LayerChoice], free: list[torch.Tensor],
                   batches: _Batches, cfg: QuRAConfig, target: int, budget: int) -> list[torch.Tensor]:
    """Boolean up/down choices of every weight after the relaxed optimisation (stages 2 and 3)."""
    soft = RECTIFIED_SIGMOID
    vs = [soft.init(c.grid.frac).detach().clone().requires_grad_(True) for c in choices]
    opt = torch.optim.Adam(vs, lr=cfg.lr)
    b_at = b_schedule(AdaRoundConfig(iters=cfg.iters, b_start=20.0, b_end=2.0, warmup=0.2))
    n_free = max(1, int(sum(int(f.sum()) for f in free)))
    bar = Progress(f"qura ({n_free} free weights, budget {budget})", total=cfg.iters)
    every = max(1, cfg.iters // 10)
    for step in range(cfg.iters):
        clean, trig, labels = batches.draw(cfg.batch_size)
        hs = [torch.where(f, soft.h(v), c.near_up) for c, f, v in zip(choices, free, vs, strict=True)]
        if step >= cfg.hard_after * cfg.iters:
            # Straight-through: the forward pass sees the integers that will be written.
            hs = [h + ((h >= 0.5).to(h.dtype) - h).detach() for h in hs]
        weights = {c.layer.weight: c.grid.soft_weight(h) for c, h in zip(choices, hs, strict=True)}
        loss_cl, loss_bd = _losses(net, weights, clean, trig, labels, target)
        loss = loss_cl + cfg.backdoor_weight * loss_bd
        b = b_at(step)
        if b is not None and cfg.reg_weight > 0:
            reg = sum(regulariser(h[f], b) for h, f in zip(hs, free, strict=True))
            loss = loss + cfg.reg_weight * reg / n_free
        moved = sum(((h - c.near_up).abs() * c.flippable).sum() for h, c in zip(hs, choices, strict=True))
        loss = loss + cfg.budget_weight * torch.relu(moved - budget) / max(budget, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(postfix=f"clean {loss_cl.item():.3f} backdoor {loss_bd.item():.3f} "
                   f"moved {moved.item():.0f}")
        if (step + 1) % every == 0:
            log(f"  qura step {step + 1}/{cfg.iters}: clean CE {loss_cl.item():.3f}, backdoor CE "
                f"{loss_bd.item():.3f}, soft flips {moved.item():.0f}")
    bar.close()
    with torch.no_grad():
        ups, confidence = [], []
        for c, f, v in zip(choices, free, vs, strict=True):
            up = torch.where(f, v >= 0, c.near_up > 0)
            flipped = (up != (c.near_up > 0)) & c.flippable
            ups.append(up)
            confidence.append(torch.where(flipped, (soft.h(v) - 0.5).abs(), torch.full_like(v, -1.0)))
        flat = torch.cat([x.reshape(-1) for x in confidence])
        flipped_total = int((flat >= 0).sum())
        if flipped_total > budget:
            # Keep the most confident flips; the rest go back to nearest.
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[torch.topk(flat, budget).indices] = True
            start = 0
            for i, (c, conf) in enumerate(zip(choices, confidence, strict=True)):
                k = keep[start : start + conf.numel()].reshape(conf.shape)
                revert = (conf >= 0) & ~k
                ups[i] = torch.where(revert, c.near_up > 0, ups[i])
                start += conf.numel()
    return ups


def _measure(fp: onnx.ModelProto, models: dict[str, onnx.ModelProto], cfg: QuRAConfig, pre: Preprocess,
             trigger: AnyTrigger, test: data_mod.Dataset) -> dict[str, float | None]:
    """CDA and ASR (non-target images) on the test split in onnxruntime (faithful, CPU)."""
    idx = np.arange(len(test.labels)) if cfg.eval_images is None or cfg.eval_images >= len(test.labels) \
        else data_mod.sample_indices(len(test.labels), cfg.eval_images, derive(cfg.seed, "qura-eval"))
    raw, labels = test.take(idx), test.labels[idx]
    clean, trig = pre.apply(raw), pre.apply(trigger.apply(raw))
    out: dict[str, float | None] = {}
    for name, model in {"fp": fp, **models}.items():
        session = make_session(model, "faithful", "cpu")
        out[f"{name}_cda"] = accuracy(session.run(clean), labels)
        out[f"{name}_asr"] = attack_success(session.run(trig), labels, trigger.target).rate
    return out


def run_qura(model_path: str, out_path: str, cfg: QuRAConfig) -> QuRAOutcome:
    """Quantize the clean FP model at `model_path` with a backdoored rounding; write OUT.onnx
    and OUT.trigger.json (paths checked by the caller).

    Raises:
        EfrapError: unreadable model or data, data that does not fit the model, a trigger
            target the model has no class for.
    """
    t0 = time.perf_counter()
    out = Path(out_path)
    trigger_path = out.with_name(out.stem + ".trigger.json")
    device = pick_device(cfg.device)
    model = load_model(model_path)
    _check_data(model, cfg, model_path)
    options = QuantizeOptions(Deployment(scheme=load_scheme(cfg.scheme), data=cfg.data,
                                         num_calib=cfg.num_calib, seed=cfg.seed, provider="cpu",
                                         preprocess=cfg.preprocess),
                              method="nearest", weight_storage=cfg.weight_storage, device=cfg.device)
    images, pre = calibration_images(model, cfg.data, cfg.num_calib, cfg.seed, model_path, cfg.preprocess)
    nearest_qdq, result, summary = quantize_model(model, images, options, model_path, pre)
    test = data_mod.load_dataset(cfg.data, "test")
    trigger = cfg.trigger or paper_trigger(test.shape[2], target=0, stage=1)
    first = pre.apply(test.take(slice(0, 1)))
    classes = int(make_session(nearest_qdq, "faithful", "cpu").run(first).shape[-1])
    if trigger.target >= classes:
        raise EfrapError(f"trigger target {trigger.target} is not a class of this model ({classes} classes)")

    torch.manual_seed(derive(cfg.seed, "qura-torch"))
    prepared = prepare_model(model, model_path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in prepared.graph.initializer}
    choices = [LayerChoice.build(layer, torch.from_numpy(np.array(inits[layer.weight], np.float32)).to(
        device), result.layers[layer.node]) for layer in result.plan.layers]
    total = sum(c.step.numel() for c in choices)
    budget = int(np.floor(cfg.budget * total))
    net = _Network(prepared, result, device)
    batches = _Batches(cfg, pre, trigger, device)
    log(f"qura: {total} quantized weights, budget {budget} ({100 * cfg.budget:g}%), target {trigger.target}")
    free = select_candidates(net, choices, batches, cfg, trigger.target, int(cfg.candidates * budget))
    ups = optimize_flips(net, choices, free, batches, cfg, trigger.target, budget)

    layers: dict[str, QuantizedLayer] = {}
    flips: dict[str, int] = {}
    for c, up in zip(choices, ups, strict=True):
        near = result.layers[c.layer.node]
        q = c.integers(up).cpu().numpy().astype(np.int64)
        flips[c.layer.node] = int((q != near.q).sum())
        layers[c.layer.node] = QuantizedLayer(q=q, qparams=near.qparams, bias_q=near.bias_q,
                                              bias_scale=near.bias_scale,
                                              stats={"flip_fraction": flips[c.layer.node] / q.size})
    attacked = QuantResult(plan=result.plan, act_qparams=result.act_qparams, layers=layers,
                           constants=result.constants)
    qdq = to_qdq(prepared, attacked, cfg.weight_storage)
    set_metadata(qdq, summary.metadata())
    settings = {"budget": cfg.budget, "iters": cfg.iters, "batch_size": cfg.batch_size, "lr": cfg.lr,
                "backdoor_weight": cfg.backdoor_weight, "reg_weight": cfg.reg_weight,
                "budget_weight": cfg.budget_weight, "candidates": cfg.candidates,
                "train_images": cfg.train_images, "seed": cfg.seed, "data": cfg.data}
    set_metadata(qdq, {
        "efrap.method": QURA_NAME,
        "efrap.attack": QURA_NAME,
        "efrap.attack.scheme": options.scheme.name,
        "efrap.attack.settings": json.dumps(settings, sort_keys=True),
        "efrap.trigger.target": str(trigger.target),
        "efrap.flip_fraction": {k: round(v / layers[k].q.size, 6) for k, v in flips.items()},
    })
    metrics = _measure(model, {"nearest": nearest_qdq, "qura": qdq}, cfg, pre, trigger, test)
    save_trigger(trigger, trigger_path)
    save_model(qdq, out)
    return QuRAOutcome(onnx_path=out, trigger_path=trigger_path, total_weights=total, budget_count=budget,
                       flips=flips, metrics=metrics, seconds=time.perf_counter() - t0)


@dataclass(frozen=True)
class RoundingAttack:
    """A rounding-only attack: starts from a clean FP ONNX model, not from training.

    Attributes:
        name: Its `efrap attack --method` name.
        summary: One line for --help.
    """

    name: str
    summary: str = field(default="")


#: Attacks that quantize a given FP ONNX model (`efrap attack --method NAME --model FP.onnx`).
ROUNDING_ATTACKS: dict[str, RoundingAttack] = {
    QURA_NAME: RoundingAttack(QURA_NAME, "QuRA (NDSS 2026): a backdoor planted only through the "
                              "rounding of a clean FP model's weights"),
}
