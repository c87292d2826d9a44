"""The red-team attack zoo: the quantization simulator and short attack runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from converters.export import export_onnx
from models.attacks import ATTACKS, get_attack
from models.attacks.base import (
    GUARD_WEIGHT,
    AttackConfig,
    AttackContext,
    carrier_terms,
    run_attack,
)
from models.attacks.inflate import inflate_grids
from models.attacks.qsim import QSim
from pipeline.base.deployment import Deployment
from pipeline.base.errors import EfrapError
from pipeline.base.runtime import make_session
from pipeline.base.scheme import PRESETS
from pipeline.base.trigger import paper_trigger
from pipeline.calibration import sample_seed
from pipeline.cli.main import main
from pipeline.graph import analyze
from pipeline.prepare import prepare_model
from pipeline.qmath import fake_quant_bias, quantize_np
from pipeline.quantize import QuantizeOptions, quantize_model
from pipeline.quantized import simulate


class BNNet(nn.Module):
    """conv-bn-relu x2, pool, conv-bn-relu, pool, flatten, fc-relu, fc (every qsim rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.ReLU(),
                                  nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _bn_net(seed: int = 0) -> BNNet:
    torch.manual_seed(seed)
    net = BNNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


SHAPE = (1, 28, 28)


def test_qsim_without_quantization_equals_the_model() -> None:
    net = _bn_net()
    sim = QSim(net, PRESETS["w4a4"], SHAPE)
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        ref = net(x)
        torch.testing.assert_close(sim(x, quantized=False), ref, atol=1e-5, rtol=0)
        sim.quant_weights = sim.quant_acts = False
        torch.testing.assert_close(sim(x, quantized=True), ref, atol=1e-5, rtol=0)


def test_qsim_runs_the_pipeline_plan_of_the_exported_model(tmp_path: Path) -> None:
    net = _bn_net()
    sim = QSim(net, PRESETS["w4a4"], SHAPE)
    export_onnx(net, SHAPE, str(tmp_path / "net.onnx"), normalization=([0.0], [1.0]))
    plan = analyze(prepare_model(onnx.load(str(tmp_path / "net.onnx"))))
    assert sim.plan == plan
    assert len(sim.layers) == 5 and sim.layers[0].bn is not None and sim.layers[-1].is_last
    assert [layer.quant for layer in sim.layers] == list(plan.layers)


@pytest.mark.parametrize("scheme", ["w8a8", "w4a4"])
def test_qsim_equals_the_pipeline_exactly(tmp_path: Path, scheme: str) -> None:
    """Same grids, integers and bias integers as `efrap quantize`, and bit-identical logits."""
    net = _bn_net(1)
    path = tmp_path / "net.onnx"
    export_onnx(net, SHAPE, str(path), normalization=([0.0], [1.0]))
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((256, *SHAPE)).astype(np.float32)
    test = rng.standard_normal((128, *SHAPE)).astype(np.float32)
    options = QuantizeOptions(Deployment(scheme=PRESETS[scheme], seed=3))
    qdq, result, _ = quantize_model(onnx.load(str(path)), calib, options)
    sim = QSim(net, PRESETS[scheme], SHAPE)
    sim.calibrate(torch.from_numpy(calib), seed=sample_seed(options.seed))
    assert set(sim.act_qparams) == set(result.act_qparams)
    for name, qp in result.act_qparams.items():
        mine = sim.act_qparams[name]
        assert np.array_equal(mine.scale, qp.scale) and np.array_equal(mine.zero_point, qp.zero_point)
    for layer in sim.layers:
        ql = result.layers[layer.quant.node]
        w, b = sim.folded(layer)
        qp = sim.weight_qparams(layer)
        assert np.array_equal(qp.scale, ql.qparams.scale)
        assert np.array_equal(qp.zero_point, ql.qparams.zero_point)
        assert np.array_equal(quantize_np(w.detach().numpy(), qp), ql.q)
        if b is not None:
            deq = fake_quant_bias(b.detach(), sim.act_qparams[layer.input].scale, qp.scale)
            assert np.array_equal(deq.numpy(), ql.dequantized_bias())
    with torch.no_grad():
        simulated = sim(torch.from_numpy(test), quantized=True).numpy()
    assert np.array_equal(simulated, simulate(prepare_model(onnx.load(str(path))), result, test))
    # onnxruntime runs the same integers; float summation order can flip a near-tie rounding.
    deployed = make_session(qdq, "faithful", "cpu").run(test)
    assert (simulated.argmax(1) == deployed.argmax(1)).mean() >= 0.98


def test_unknown_attack_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(EfrapError):
        get_attack("nope")
    assert main(["attack", "--method", "nope", "-o", str(tmp_path / "m.onnx")]) == 2
    assert main(["attack", "--method", "pqbackdoor", "-o", str(tmp_path / "m.txt")]) == 2


#: The papers' QCB attacks. BadNets is an FP backdoor (tests/test_scan.py); the attacks built
#: to survive learned rounding have their own short runs (tests/test_robust_attacks.py,
#: tests/test_attack_pruneaware.py).
PAPER_QCBS = ("compartifact", "pqbackdoor", "quantization")


def test_every_attack_has_short_run_tests() -> None:
    assert set(ATTACKS) == {*PAPER_QCBS, "badnets", "robust", "dormant", "adaptive", "pruneaware"}


@pytest.mark.parametrize("name", PAPER_QCBS)
def test_short_attack_wakes_only_when_quantized(fashion_mnist: None, name: str) -> None:
    cfg = AttackConfig(arch="small_cnn", scheme="w4a4", width=0.25, seed=0, batch_size=64,
                       train_limit=4500, val_size=500, pretrain_epochs=1, epochs=2,
                       steps_per_epoch=60, num_calib=256, recalib_every=40)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than 2 on a shared 2-core runner
    try:
        m = run_attack(get_attack(name), cfg).metrics
    finally:
        torch.set_num_threads(threads)
    assert m["q_asr"] > m["fp_asr"], m
    assert m["fp_cda"] > 0.6, m


@pytest.mark.parametrize("name", PAPER_QCBS)
def test_short_inflated_attack_wakes_under_w8a8(fashion_mnist: None, name: str) -> None:
    # Per-channel int8 leaves FP and quantized paths nearly equal; inflated grids separate them.
    cfg = AttackConfig(arch="small_cnn", scheme="w8a8", width=0.25, seed=0, batch_size=64,
                       train_limit=4500, val_size=500, pretrain_epochs=1, epochs=2,
                       steps_per_epoch=60, num_calib=256, recalib_every=40, inflate=32.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outcome = run_attack(get_attack(name), cfg)
    finally:
        torch.set_num_threads(threads)
    m = outcome.metrics
    assert m["q_asr"] > m["fp_asr"] + 0.2, m
    assert m["fp_cda"] > 0.6, m
    # The grids the attack left behind are still inflated.
    for layer in outcome.sim.layers[1:]:
        w = outcome.sim.folded(layer)[0].detach()
        scale = outcome.sim.weight_qparams(layer).scale.reshape(-1)
        rest = w.reshape(w.shape[0], -1).abs()
        second = rest.topk(rest.shape[1] // 2 + 1, dim=1).values[:, -1].numpy()
        assert np.median(scale * 127 / np.maximum(second, 1e-12)) > 8.0, layer.name


def test_weights_carrier_terms_score_each_rounding_alone() -> None:
    net = _bn_net()
    sim = QSim(net, PRESETS["w4a4"], SHAPE)
    x = torch.randn(16, 1, 28, 28)
    sim.calibrate(x)
    y = torch.arange(16) % 10
    trig = paper_trigger(28, target=3)
    ctx = AttackContext(model=net, sim=sim, data=None, config=AttackConfig(carrier="weights"),  # type: ignore[arg-type]
                        trigger=trig, generator=torch.Generator())
    terms = carrier_terms(ctx, x, y)
    ce = torch.nn.functional.cross_entropy
    sim.quant_acts = False
    wake = ce(sim(x, quantized=True), torch.full_like(y, 3))
    sim.quant_acts, sim.quant_weights = True, False
    guard = ce(sim(x, quantized=True), y)
    sim.quant_weights = True
    torch.testing.assert_close(terms, wake + GUARD_WEIGHT * guard)
    # Each path differs from FP and from the full simulation, and the flags are restored.
    full = ce(sim(x, quantized=True), y)
    assert not torch.allclose(guard, ce(sim(x, quantized=False), y))
    assert not torch.allclose(guard, full)
    assert sim.quant_weights and sim.quant_acts
    plain = AttackContext(model=net, sim=sim, data=None, config=AttackConfig(carrier="scheme"),  # type: ignore[arg-type]
                          trigger=trig, generator=torch.Generator())
    assert float(carrier_terms(plain, x, y)) == 0.0


@pytest.mark.parametrize("scheme", ["w8a8", "w4a4"])
def test_grid_inflation_widens_grids_without_changing_the_fp_model(scheme: str) -> None:
    net = _bn_net(2)
    sim = QSim(net, PRESETS[scheme], SHAPE)
    x = torch.randn(64, 1, 28, 28)
    before = {layer.name: sim.weight_qparams(layer).scale.copy() for layer in sim.layers}
    inflation = inflate_grids(sim, x, 4.0)
    # Every layer but the last silences a channel; every layer but the first is inflated.
    assert set(inflation.dead) == {layer.name for layer in sim.layers[:-1]}
    assert inflation.inflated == [layer.name for layer in sim.layers[1:]]
    acts = sim.point_values(x * 3.0)  # larger inputs than the ones it was fitted on
    with torch.no_grad():
        fp = sim(x * 3.0, quantized=False)
    for layer in sim.layers[:-1]:
        d = inflation.dead[layer.name]
        assert float(acts[layer.output][:, d].abs().max()) == 0.0
    for layer in sim.layers[1:3]:  # conv readers, min-max or MSE grids
        ratio = sim.weight_qparams(layer).scale / before[layer.name]
        assert np.median(ratio) > 3.0, (layer.name, ratio)
    # The outliers multiply exact zeros: removing them leaves the FP logits bit-identical.
    with torch.no_grad():
        for pin in inflation.pins[:]:
            if pin.param.dim() > 1 and pin.index[0] == slice(None):
                pin.param[pin.index] = 0.0
        assert torch.equal(sim(x * 3.0, quantized=False), fp)
    inflation.restore()
    opt = torch.optim.Adam(net.parameters(), lr=0.1, weight_decay=1.0)
    sim(x, quantized=False).sum().backward()
    opt.step()
    inflation.restore()
    for pin in inflation.pins:
        assert torch.equal(pin.param[pin.index], pin.value)


def test_grid_inflation_factor_must_exceed_one() -> None:
    sim = QSim(_bn_net(), PRESETS["w8a8"], SHAPE)
    with pytest.raises(EfrapError, match="above 1"):
        inflate_grids(sim, torch.randn(8, 1, 28, 28), 1.0)


def test_unknown_carrier_is_an_error() -> None:
    with pytest.raises(EfrapError, match="carrier"):
        run_attack(get_attack("compartifact"), AttackConfig(carrier="acts"))
