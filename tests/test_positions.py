"""Reconstruction over sampled (image, position) rows: the same layer, the same loss."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline.base.errors import EfrapError
from pipeline.graph import analyze
from pipeline.positions import draw_positions
from pipeline.prepare import prepare_model
from pipeline.qmath import QParams
from pipeline.reconstruct import build_problem, layer_forward
from pipeline.rounding import EfrapConfig, LacConfig
from pipeline.rounding.learned import EarlyStop, hard_loss
from pipeline.rounding.losses import get_loss

CASES = [
    # (in channels, out channels, kernel, strides, pads (t, l, b, r), dilations, group)
    (4, 6, 3, 1, (1, 1, 1, 1), 1, 1),
    (4, 6, 3, 2, (0, 1, 2, 1), 1, 2),
    (6, 6, 3, 1, (2, 2, 2, 2), 2, 6),
    (3, 5, 1, 1, (0, 0, 0, 0), 1, 1),
]


def _conv_relu(cin: int, cout: int, k: int, stride: int, pads: tuple[int, ...], dil: int,
               group: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(cout, cin // group, k, k)).astype(np.float32)
    b = rng.normal(size=(cout,)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[k, k],
                            strides=[stride, stride], pads=list(pads), dilations=[dil, dil], group=group)
    relu = helper.make_node("Relu", ["y"], ["z"], name="relu")
    flat = helper.make_node("Flatten", ["z"], ["out"], name="flat")
    graph = helper.make_graph([conv, relu, flat], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin, 9, 11])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _problem(case: tuple, n: int = 5):
    model = prepare_model(_conv_relu(*case))
    layer = analyze(model, "test").layers[0]
    inits = {i.name: torch.from_numpy(np.array(numpy_helper.to_array(i))) for i in model.graph.initializer}
    weight, bias = inits[layer.weight], inits[layer.bias] if layer.bias else None
    x = torch.randn(n, case[0], 9, 11, generator=torch.Generator().manual_seed(1))
    forward = layer_forward(model, layer, bias, None, torch.device("cpu"))
    with torch.no_grad():
        y = forward(x, weight)
    channels = weight.shape[0]
    qp = QParams(scale=np.full(channels, 0.05, np.float32), zero_point=np.zeros(channels, np.int64),
                 qmin=-8, qmax=7, axis=0)
    return build_problem(model, layer, weight, qp, bias, None, x, y), weight


@pytest.mark.parametrize("case", CASES)
def test_patch_rows_compute_the_conv_at_their_positions(case: tuple) -> None:
    # Groups, strides, asymmetric pads and dilations: each pooled row, run as a 1 x 1 conv,
    # is the layer's output (after its Relu) at that image and position.
    problem, weight = _problem(case)
    assert problem.positions is not None
    pooled = problem.positions(12, 3)
    assert pooled.inputs is not None and pooled.targets is not None and pooled.forward is not None
    assert pooled.inputs.shape[1:] == (case[0] * case[2] ** 2, 1, 1)
    with torch.no_grad():
        out = pooled.forward(pooled.inputs, weight)
    torch.testing.assert_close(out, pooled.targets, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES[:3])
def test_a_pool_of_every_position_gives_the_whole_cache_loss(case: tuple) -> None:
    problem, weight = _problem(case)
    assert problem.positions is not None
    pooled = problem.positions(10**6, 0)
    other = weight + 0.3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(2))
    loss = get_loss("mse")
    whole, rows = hard_loss(problem, loss, other), hard_loss(pooled, loss, other)
    assert rows == pytest.approx(whole, rel=1e-5)


def test_positions_are_drawn_per_image_without_replacement_and_by_seed() -> None:
    pos = draw_positions(images=7, positions=20, rows=30, seed=5)
    assert pos.shape == (7, 5)
    assert all(len(set(row.tolist())) == 5 for row in pos)
    assert torch.equal(pos, draw_positions(7, 20, 30, 5))
    assert not torch.equal(pos, draw_positions(7, 20, 30, 6))
    assert draw_positions(3, 4, 100, 0).shape == (3, 4)


def test_sampling_settings_are_checked() -> None:
    with pytest.raises(EfrapError, match="samples"):
        EfrapConfig(samples="pixels")
    with pytest.raises(EfrapError, match="pool"):
        EfrapConfig(pool=0)
    with pytest.raises(EfrapError, match="patience"):
        LacConfig(patience=-1)


def _up(v: torch.Tensor) -> torch.Tensor:
    return v >= 0  # soft rounding's up/down choice


def test_early_stop_waits_for_the_second_half_and_a_settled_rounding() -> None:
    stop = EarlyStop(EfrapConfig(iters=100, patience=2), every=10, decide=_up)
    v = torch.tensor([1.0, -1.0])
    assert not stop.settled(10, v)          # first half: never
    assert not stop.settled(50, v)          # first look
    assert not stop.settled(60, v)          # one calm check
    assert stop.settled(70, v)              # two calm checks
    moving = EarlyStop(EfrapConfig(iters=100, patience=2), every=10, decide=_up)
    for step, sign in zip((50, 60, 70, 80), (1.0, -1.0, 1.0, -1.0), strict=True):
        assert not moving.settled(step, torch.tensor([sign]))
    assert not EarlyStop(EfrapConfig(iters=100), every=10, decide=_up).settled(90, v)
