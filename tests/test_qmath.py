"""The simulation's arithmetic equals onnxruntime's QuantizeLinear/DequantizeLinear."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from pipeline.base.runtime import make_session
from pipeline.base.scheme import TensorQuant
from pipeline.observers import ActivationStats, observe_activation, observe_weight
from pipeline.qmath import (
    QParams,
    dequantize_np,
    fake_quant,
    fake_quant_composed,
    fake_quant_qp,
    qparams_from_range,
    quantize_np,
)


def _ort_qdq(x: np.ndarray, scale: float, zp: int, dtype: int) -> np.ndarray:
    np_type = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}[dtype]
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [onnx.numpy_helper.from_array(np.array(scale, np.float32), "s"),
         onnx.numpy_helper.from_array(np.array(zp, np_type), "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    sess = make_session(model, "faithful", "cpu")
    return sess.session.run(None, {"x": x})[0]


@pytest.mark.parametrize(("scale", "zp", "dtype", "qmin", "qmax"), [
    (0.1, 0, TensorProto.INT8, -128, 127),
    (0.0371, 128, TensorProto.UINT8, 0, 255),
    (0.3, 7, TensorProto.UINT8, 0, 255),
])
def test_fake_quant_matches_onnxruntime_on_ties(scale: float, zp: int, dtype: int,
                                               qmin: int, qmax: int) -> None:
    rng = np.random.default_rng(1)
    s32 = np.float32(scale)
    # Exact half-way points, their float neighbours, and values outside the grid.
    ties = (np.arange(-300, 300) + 0.5).astype(np.float32) * s32
    near = np.concatenate([ties, np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf)])
    x = np.concatenate([near, rng.normal(0, 20 * scale, 5000).astype(np.float32)])
    expected = _ort_qdq(x, scale, zp, dtype)
    qp = QParams(np.array(s32), np.array(zp), qmin, qmax)
    got = fake_quant_qp(torch.from_numpy(x), qp).numpy()
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(dequantize_np(quantize_np(x, qp), qp), expected)


def test_qparams_include_zero_and_cover_range() -> None:
    qp = qparams_from_range(np.array(0.5), np.array(3.0), 0, 255, symmetric=False)
    assert qp.zero_point == 0
    assert quantize_np(np.array([3.0], np.float32), qp)[0] == 255
    qp = qparams_from_range(np.array(-1.0), np.array(3.0), 0, 15, symmetric=False)
    assert dequantize_np(quantize_np(np.array([0.0], np.float32), qp), qp)[0] == 0.0


def test_symmetric_grids() -> None:
    w = np.array([[-1.0, 0.5], [2.0, -0.25]], np.float32)
    restricted = observe_weight(w, TensorQuant(bits=8, symmetric=True, per_channel=True), 0)
    np.testing.assert_allclose(restricted.scale, [1 / 127, 2 / 127], rtol=1e-6)
    full4 = observe_weight(w, TensorQuant(bits=4, symmetric=True, per_channel=True,
                                          symmetric_range="full"), 0)
    np.testing.assert_allclose(full4.scale, [2 / 15, 4 / 15], rtol=1e-6)
    q = quantize_np(w, full4)
    assert q.min() >= -8 and q.max() <= 7 and q[1, 0] == 7  # 7.5 rounds to 8, clipped to 7


def test_mse_observer_is_no_worse_than_minmax() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(16, 64)).astype(np.float32)
    errs = {}
    for obs in ("minmax", "mse"):
        qp = observe_weight(w, TensorQuant(bits=4, symmetric=False, per_channel=True, observer=obs), 0)
        errs[obs] = ((dequantize_np(quantize_np(w, qp), qp) - w) ** 2).mean(axis=1)
    assert np.all(errs["mse"] <= errs["minmax"] + 1e-12)
    sample = rng.exponential(size=20000).astype(np.float32)
    stats = ActivationStats(float(sample.min()), float(sample.max()), sample)
    for obs in ("minmax", "percentile", "mse"):
        qp = observe_activation(stats, TensorQuant(bits=4, symmetric=False, observer=obs))
        assert qp.qmin == 0 and qp.qmax == 15 and float(qp.scale) > 0


@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_fake_quant_equals_the_composition_bit_for_bit(per_channel: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 5, 5, generator=gen) * 3
    x0[0, 0, 0, :3] = torch.tensor([0.25, 0.75, -0.25])  # ties at scale 0.5 (round half to even)
    scale = torch.tensor([0.5, 0.07, 0.3, 1.1]).reshape(1, 4, 1, 1) if per_channel else torch.tensor(0.5)
    zero = torch.tensor([0.0, 3.0, -2.0, 1.0]).reshape(1, 4, 1, 1) if per_channel else torch.tensor(2.0)
    upstream = torch.randn(8, 4, 5, 5, generator=gen)
    outs, grads = [], []
    for fq in (fake_quant_composed, fake_quant):
        x = x0.clone().requires_grad_(True)
        y = fq(x, scale, zero, -8, 7)
        (y * upstream).sum().backward()
        outs.append(y.detach())
        grads.append(x.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    assert (grads[1] == 0).any() and (grads[1] != 0).any()  # saturated and passed-through both occur
    # A learned step size takes the composition, which differentiates the scale too.
    s = torch.tensor(0.5, requires_grad=True)
    fake_quant(x0, s, torch.tensor(0.0), -8, 7).sum().backward()
    assert s.grad is not None
