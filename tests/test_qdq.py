"""The converter's QDQ graph: parity with the simulation, fusion, storage, determinism."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pipeline.base.deployment import Deployment
from pipeline.base.runtime import make_session
from pipeline.base.scheme import PRESETS
from pipeline.graph import analyze
from pipeline.prepare import prepare_model
from pipeline.quantize import QuantizeOptions, quantize_model
from pipeline.quantized import simulate
from pipeline.torch_graph import TorchGraph


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def test_plan_rules(tiny_model: onnx.ModelProto) -> None:
    plan = analyze(prepare_model(tiny_model))
    assert [layer.op for layer in plan.layers] == ["Conv", "Conv", "Conv", "Gemm", "Gemm"]
    assert plan.layers[0].is_first and plan.layers[-1].is_last
    # The pooled tensor reuses the producing Relu's parameters instead of a new rounding.
    assert any(t.endswith("MaxPool_output_0") for t in plan.shared)
    assert all(layer.output != "logits" for layer in plan.layers[:-1])
    assert "logits" not in plan.points


@pytest.mark.parametrize("scheme", ["w8a8", "w4a4", "w4a8"])
@pytest.mark.parametrize("storage", ["int8", "int4"])
def test_qdq_matches_simulation(tiny_model: onnx.ModelProto, calib_images: np.ndarray,
                                scheme: str, storage: str) -> None:
    qdq, result, _ = quantize_model(tiny_model, calib_images,
                                    QuantizeOptions(Deployment(scheme=PRESETS[scheme]),
                                                    weight_storage=storage))
    onnx.checker.check_model(qdq)
    ort_logits = make_session(qdq, "faithful", "cpu").run(calib_images)
    sim = simulate(prepare_model(tiny_model), result, calib_images)
    # Same integers and scales; only float summation order differs.
    assert np.abs(ort_logits - sim).max() < 1e-3
    assert (ort_logits.argmax(1) == sim.argmax(1)).mean() >= 0.99
    # The simulation of the FP graph with the result equals running the QDQ graph itself.
    with torch.no_grad():
        graph = TorchGraph(prepare_model(qdq))
        qdq_sim = graph.run({"input": torch.from_numpy(calib_images)})["logits"].numpy()
    np.testing.assert_allclose(qdq_sim, sim, rtol=0, atol=1e-5)
    # Loads at the deployment optimization level too.
    make_session(qdq, "all", "cpu").run(calib_images[:4])


def test_weights_are_integers_feeding_dequantize(tiny_model: onnx.ModelProto,
                                                 calib_images: np.ndarray) -> None:
    qdq, _, _ = quantize_model(tiny_model, calib_images, QuantizeOptions(Deployment(scheme=PRESETS["w8a8"])))
    inits = {i.name: i for i in qdq.graph.initializer}
    dq_weights = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"
                  and n.name.endswith("_weight_dq")]
    assert len(dq_weights) == 5
    for node in dq_weights:
        assert inits[node.input[0]].data_type == onnx.TensorProto.INT8
        axis = next(a.i for a in node.attribute if a.name == "axis")
        assert axis == 0
    biases = [n for n in qdq.graph.node if n.name.endswith("_bias_dq")]
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT32 for n in biases)
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4
                   for i in qdq.graph.initializer)
    meta = {p.key for p in qdq.metadata_props}
    assert {"efrap.method", "efrap.scheme", "efrap.seed", "efrap.versions"} <= meta


def test_w8a8_fuses_into_qlinearconv(tiny_model: onnx.ModelProto, calib_images: np.ndarray,
                                     tmp_path: Path) -> None:
    qdq, _, _ = quantize_model(tiny_model, calib_images, QuantizeOptions(Deployment(scheme=PRESETS["w8a8"])))
    optimized = tmp_path / "optimized.onnx"
    make_session(qdq, "all", "cpu", optimized_path=str(optimized))
    ops = _ops(onnx.load(str(optimized)))
    assert ops["QLinearConv"] == 3, ops


def test_float_first_layer_quantizes_after_pooling(tiny_model: onnx.ModelProto,
                                                   calib_images: np.ndarray) -> None:
    first = analyze(prepare_model(tiny_model)).layers[0]
    opts = QuantizeOptions(Deployment(scheme=PRESETS["w8a8"]), exclude=(first.node,))
    qdq, _, _ = quantize_model(tiny_model, calib_images, opts)
    # The first point is the pooled tensor (exact: max-pooling commutes with the quantizer).
    q_inputs = [n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    assert any(name.endswith("MaxPool_output_0") for name in q_inputs), q_inputs
    default = make_session(qdq, "all", "cpu")
    # onnxruntime's QDQ propagation copies that Q in front of the pooling (slow on CPU:
    # uint8 MaxPool in NCHW); the session setting that keeps the pooling in float
    # (docs/BENCHMARKS.md) computes the same results.
    no_prop = make_session(qdq, "all", "cpu", config={
        "optimization.disable_specified_optimizers": "QDQPropagationTransformer"})
    np.testing.assert_allclose(default.run(calib_images), no_prop.run(calib_images), atol=1e-5)


def test_int4_storage_packs_and_matches(tiny_model: onnx.ModelProto,
                                        calib_images: np.ndarray) -> None:
    opts = QuantizeOptions(Deployment(scheme=PRESETS["w4a4"]))
    q8, _, _ = quantize_model(tiny_model, calib_images, opts)
    q4, _, _ = quantize_model(tiny_model, calib_images,
                              QuantizeOptions(Deployment(scheme=PRESETS["w4a4"]), weight_storage="int4"))
    types = {i.data_type for i in q4.graph.initializer}
    assert onnx.TensorProto.UINT4 in types
    assert q4.ByteSize() < q8.ByteSize()
    a = make_session(q8, "faithful", "cpu").run(calib_images)
    b = make_session(q4, "faithful", "cpu").run(calib_images)
    np.testing.assert_array_equal(a.argmax(1), b.argmax(1))
    np.testing.assert_array_equal(a, b)


def test_same_seed_same_bytes(tiny_model: onnx.ModelProto, calib_images: np.ndarray) -> None:
    opts = QuantizeOptions(Deployment(scheme=PRESETS["w4a4"], seed=3))
    a, _, _ = quantize_model(tiny_model, calib_images, opts)
    b, _, _ = quantize_model(tiny_model, calib_images, opts)
    assert a.SerializeToString() == b.SerializeToString()
