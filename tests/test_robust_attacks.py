"""Attacks built to survive learned rounding: roundings off nearest in QSim, the robust
objective, the dormant-carrier backdoor and the adaptive attacker's penalty-scale evasion."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.architectures import build_model
from models.attacks import ATTACKS, get_attack
from models.attacks.adaptive import AdaptiveBackdoor, evade_flip_penalty
from models.attacks.base import AttackConfig, AttackContext, load_attack_data, run_attack, set_seed
from models.attacks.dormant import Carriers, DormantBackdoor, carrier_layer, inflate_carriers
from models.attacks.qsim import QSim
from models.attacks.robust import (
    Adversaries,
    RobustBackdoor,
    RoundingAdversary,
    boundary_offsets,
    learned_offsets,
)
from pipeline.base.errors import EfrapError
from pipeline.base.scheme import PRESETS
from pipeline.base.trigger import paper_trigger
from pipeline.bn_fold import bn_factor
from pipeline.qmath import quantize

SHAPE = (1, 28, 28)


class ChainNet(nn.Module):
    """conv-bn-relu, pool, conv-bn-relu, pool, conv-bn-relu, flatten, fc-relu, fc (small_cnn's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _net(seed: int = 0) -> ChainNet:
    torch.manual_seed(seed)
    net = ChainNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def _sim(scheme: str = "w4a8", seed: int = 0) -> tuple[QSim, torch.Tensor]:
    sim = QSim(_net(seed), PRESETS[scheme], SHAPE)
    images = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(seed))
    sim.calibrate(images)
    return sim, images


def _integers(sim: QSim) -> dict[str, torch.Tensor]:
    out = {}
    for layer in sim.layers:
        w = sim.folded(layer)[0].detach()
        qp = sim.weight_qparams(layer, w)
        s, z = qp.torch(w.dim(), w.device)
        out[layer.name] = quantize(w, s, z, qp.qmin, qp.qmax)
    return out


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_new_attacks_are_registered() -> None:
    for cls in (RobustBackdoor, DormantBackdoor, AdaptiveBackdoor):
        assert ATTACKS[cls.name] is cls and isinstance(get_attack(cls.name), cls)


def test_offsets_round_weights_one_step_off_nearest() -> None:
    sim, images = _sim()
    nearest = _integers(sim)
    layer = sim.layers[1]
    w = sim.folded(layer)[0].detach()
    qp = sim.weight_qparams(layer, w)
    s, _ = qp.torch(w.dim(), w.device)
    with torch.no_grad():
        plain = sim(images, quantized=True)
        with sim.offsets({name: torch.zeros_like(q) for name, q in nearest.items()}):
            assert torch.equal(sim(images, quantized=True), plain)
        up = torch.ones_like(nearest[layer.name])
        with sim.offsets({layer.name: up}):
            wq = sim.weights(True, True)[layer.quant.weight]
            assert not torch.equal(sim(images, quantized=True), plain)
    # One step up wherever the grid allows it, the top of the grid otherwise.
    expect = torch.clamp(nearest[layer.name] + 1, qp.qmin, qp.qmax) * s
    torch.testing.assert_close(wq, expect)
    assert sim.weight_offsets == {}


def test_boundary_offsets_flip_only_weights_near_the_boundary() -> None:
    sim, _ = _sim()
    gen = torch.Generator().manual_seed(0)
    all_near = boundary_offsets(sim, band=0.1, flip_prob=1.0, gen=gen)
    none = boundary_offsets(sim, band=0.1, flip_prob=0.0, gen=gen)
    for layer in sim.layers:
        w = sim.folded(layer)[0].detach()
        s, _ = sim.weight_qparams(layer, w).torch(w.dim(), w.device)
        d = w / s - torch.round(w / s)
        off = all_near[layer.name]
        assert not off[d.abs() <= 0.4].any()  # far from the boundary: never
        assert (off[d.abs() >= 0.5] != 0).all()  # right on it (a tie): always
        assert torch.equal(off[off != 0], torch.sign(d[off != 0]))  # towards the other neighbour
        assert not none[layer.name].any()


def test_learned_offsets_are_the_pipelines_rounding_off_nearest() -> None:
    sim, images = _sim()
    learned: dict[str, dict[str, torch.Tensor]] = {}
    for method in ("adaround", "efrap"):
        offsets = learned[method] = learned_offsets(sim, images, method, iters=150, lr=1e-2)
        assert set(offsets) == {layer.name for layer in sim.layers}
        flipped = 0
        for off in offsets.values():
            assert set(off.unique().tolist()) <= {-1.0, 0.0, 1.0}
            flipped += int((off != 0).sum())
        assert flipped > 0, method
    # The first layer reads the image: AdaRound's rounding reconstructs its FP output better.
    out = sim.layers[0].output
    feeds = {sim.graph.inputs[0]: images}
    with torch.no_grad():
        fp = sim.run(feeds, [out], quantized=False)[out]
        near = sim.run(feeds, [out], quantized=True)[out]
        with sim.offsets(learned["adaround"]):
            ada = sim.run(feeds, [out], quantized=True)[out]
    assert (ada - fp).pow(2).mean() < (near - fp).pow(2).mean()


def test_robust_objective_trains_the_backdoor_under_non_nearest_roundings(fashion_mnist: None) -> None:
    cfg = AttackConfig(scheme="w4a8", width=0.25, batch_size=64, train_limit=2600, val_size=500,
                       pretrain_epochs=0, num_calib=256)
    gen = set_seed(0)
    data = load_attack_data(cfg)
    model = build_model(cfg.arch, 1, 10, cfg.width, 28)
    sim = QSim(model, PRESETS["w4a8"], data.input_shape)
    trigger = paper_trigger(28, target=0)
    ctx = AttackContext(model=model, sim=sim, data=data, config=cfg, trigger=trigger, generator=gen)
    sim.calibrate(data.normalize(data.train_x[:256]))
    spec = RoundingAdversary(kinds=("boundary", "adaround"), iters=60, lr=1e-2, images=64)
    adversaries = Adversaries(ctx, spec)
    seen: list[dict[str, torch.Tensor]] = []
    real_offsets = sim.offsets

    def spy(offsets: dict[str, torch.Tensor]) -> AbstractContextManager[QSim]:
        seen.append(offsets)
        return real_offsets(offsets)

    sim.offsets = spy  # type: ignore[method-assign]
    x, y = data.train_x[:64], data.train_y[:64]
    xin = data.normalize(torch.cat([x, trigger.apply_torch(x)]))
    adversaries.terms(xin, y)
    # Each adversary scored the batch under its own rounding, off nearest somewhere.
    assert len(seen) == 2 and all(any(bool(o.any()) for o in off.values()) for off in seen)
    fixed = adversaries.learned["adaround"]

    def backdoor_loss() -> float:
        with torch.no_grad(), real_offsets(fixed):
            q = sim(xin[64:], quantized=True)
        return float(F.cross_entropy(q, torch.zeros_like(y)))

    before = backdoor_loss()
    attack = RobustBackdoor()
    attack.adversary = spec
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    sim.train()
    for i in range(30):
        idx = torch.arange(i * 64, (i + 1) * 64) % len(data.train_y)
        bx, by = data.train_x[idx], data.train_y[idx]
        loss = attack.objective(adversaries, ctx, bx, by, trigger.apply_torch(bx))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert backdoor_loss() < 0.5 * before


def test_dormant_carriers_hide_from_adaround_and_fall_to_efrap(fashion_mnist: None) -> None:
    cfg = AttackConfig(scheme="w4a8", width=0.25, seed=0, batch_size=64, train_limit=4500, val_size=500,
                       pretrain_epochs=1, epochs=1, steps_per_epoch=60, num_calib=256, recalib_every=40)
    attack = DormantBackdoor()
    out = run_attack(attack, cfg)
    m = out.metrics
    assert m["q_asr"] > 0.8 and m["fp_asr"] < 0.3 and m["fp_cda"] > 0.6, m
    carriers = Carriers(out.sim, attack.carriers)
    x = out.data.val_x[:256]
    xin = out.data.normalize(torch.cat([x, out.trigger.apply_torch(x)]))
    with torch.no_grad():
        fp = carriers.fp_pre(xin)
        _, q, _ = carriers.pass_(xin, True, 256)
    assert (fp[:256] < 0).float().mean() > 0.99 and (q[:256] < 0).float().mean() > 0.99  # silent on clean
    assert (q[256:] > 0).float().mean() > 0.8 > (fp[256:] > 0).float().mean()  # fire when quantized
    images = out.data.normalize(out.data.train_x[:256])
    rows = carriers.units
    layer = carrier_layer(out.sim).name
    ada = learned_offsets(out.sim, images, "adaround", iters=300, lr=1e-2)[layer]
    efrap = learned_offsets(out.sim, images, "efrap", iters=300, lr=1e-2)[layer]
    # Invisible to the reconstruction: AdaRound keeps the carriers' nearest integers...
    assert (ada[rows] != 0).float().mean() < 0.01
    # ...while EFRAP's flip penalty, unresisted there, flips most of them.
    assert (efrap[rows] != 0).float().mean() > 0.3


def test_penalty_scale_evasion_keeps_the_fp_and_the_deployed_model() -> None:
    sim, images = _sim("w4a8", seed=3)
    carrier = carrier_layer(sim)
    before_q = _integers(sim)
    factors = {layer.name: bn_factor(sim.layer_modules(layer)[1]).detach().clone()
               for layer in sim.layers if layer.bn}
    w_carrier = sim.folded(carrier)[0].detach().clone()
    with torch.no_grad():
        fp0 = sim(images, quantized=False)
        q0 = sim(images, quantized=True)
    scaled = evade_flip_penalty(sim, 64.0)
    assert scaled == [layer.name for layer in sim.layers[:3]]
    sim.calibrate(images)
    with torch.no_grad():
        torch.testing.assert_close(sim(images, quantized=False), fp0, rtol=1e-5, atol=1e-5)
        q1 = sim(images, quantized=True)
    assert (q1.argmax(1) == q0.argmax(1)).all()
    torch.testing.assert_close(q1, q0, rtol=1e-4, atol=1e-4)
    # Same integers everywhere; BN factors x64 (pre-BN errors / 64); carrier weights / 64.
    for name, q in _integers(sim).items():
        assert torch.equal(q, before_q[name]), name
    for name, f in factors.items():
        layer = next(layer for layer in sim.layers if layer.name == name)
        torch.testing.assert_close(bn_factor(sim.layer_modules(layer)[1]), 64.0 * f)
    torch.testing.assert_close(sim.folded(carrier)[0], w_carrier / 64.0)
    with pytest.raises(EfrapError):
        evade_flip_penalty(sim, 3.0)


def test_carrier_inflation_widens_only_the_carrier_grids_and_keeps_fp() -> None:
    sim, images = _sim("w4a8", seed=4)
    carriers = Carriers(sim, 4)
    layer = carriers.layer
    scale0 = sim.weight_qparams(layer).scale.copy()
    inflation = inflate_carriers(sim, carriers, images, 8.0)
    (feeder, channel), = inflation.dead.items()
    out = next(x for x in sim.layers if x.name == feeder).output
    with torch.no_grad():
        assert not sim.run({sim.graph.inputs[0]: images}, [out], quantized=False)[out][:, channel].any()
        # The outliers multiply that silent channel: without them the FP logits are the same.
        fp = sim(images, quantized=False)
        mod = sim.layer_modules(layer)[0]
        held = mod.weight.detach().clone()
        span = mod.weight.shape[1] // sim.layer_modules(sim.layers[2])[0].weight.shape[0]
        mod.weight[:, channel * span : (channel + 1) * span] = 0.0
        torch.testing.assert_close(sim(images, quantized=False), fp, rtol=0, atol=0)
        mod.weight.copy_(held)
    scale1 = sim.weight_qparams(layer).scale
    rows = carriers.units.numpy()
    others = np.setdiff1d(np.arange(len(scale0)), rows)
    assert np.array_equal(scale1[others], scale0[others])
    assert np.all(scale1[rows] >= 7.9 * scale0[rows])
    # The pins hold the outliers through training.
    mod = sim.layer_modules(layer)[0]
    with torch.no_grad():
        mod.weight.mul_(0.5)
    inflation.restore()
    assert np.array_equal(sim.weight_qparams(layer).scale[rows], scale1[rows])
