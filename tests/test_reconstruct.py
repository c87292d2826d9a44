"""The reconstruction driver feeds each layer what the deployed model computes."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from pipeline.base.runtime import make_session
from pipeline.graph import prepare_model
from pipeline.quantize import QuantizeOptions, quantize_model
from pipeline.reconstruct import build_problem
from pipeline.scheme import PRESETS
from pipeline.torch_graph import TorchGraph


def _ort_tensor(qdq: onnx.ModelProto, name: str, images: np.ndarray) -> np.ndarray:
    model = onnx.ModelProto.FromString(qdq.SerializeToString())
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = make_session(model, "faithful", "cpu")
    return sess.session.run([name], {"input": images})[0]


def test_cached_inputs_equal_onnxruntime(tiny_model: onnx.ModelProto,
                                         calib_images: np.ndarray) -> None:
    qdq, result, _ = quantize_model(tiny_model, calib_images, QuantizeOptions(scheme=PRESETS["w4a4"]))
    prepared = prepare_model(tiny_model)
    graph = TorchGraph(prepared)
    images = torch.from_numpy(calib_images)
    fixed = result.weight_overrides()
    for layer in result.plan.layers[1:]:
        ql = result.layers[layer.node]
        bias = ql.dequantized_bias()
        problem = build_problem(graph, layer, ql.qparams, images, fixed, result.act_qparams,
                                None if bias is None else torch.from_numpy(bias))
        # What the deployed model's layer reads: the dequantized (and grid-clipped) tensor.
        consumer = next(n for n in qdq.graph.node if n.name == layer.node)
        ort_in = _ort_tensor(qdq, consumer.input[0], calib_images)
        assert problem.inputs is not None and problem.targets is not None
        np.testing.assert_allclose(problem.inputs.numpy(), ort_in, atol=2e-3)
        # Values sit on the layer input's grid: same integers up to summation order.
        qp = result.act_qparams[layer.input]
        steps = np.abs(problem.inputs.numpy() - ort_in) / float(qp.scale)
        assert (steps > 0.5).mean() < 1e-3
        # The layer's forward with the integer weight reproduces the deployed output point.
        with torch.no_grad():
            w = torch.from_numpy(ql.dequantized_weight())
            out = problem.forward(problem.inputs, w)
        assert out.shape == problem.targets.shape


def test_fisher_and_head_fields(tiny_model: onnx.ModelProto, calib_images: np.ndarray) -> None:
    _, result, _ = quantize_model(tiny_model, calib_images, QuantizeOptions(scheme=PRESETS["w8a8"]))
    graph = TorchGraph(prepare_model(tiny_model))
    layer = result.plan.layers[2]
    ql = result.layers[layer.node]
    problem = build_problem(graph, layer, ql.qparams, torch.from_numpy(calib_images[:64]),
                            result.weight_overrides(), result.act_qparams, None,
                            needs=frozenset({"output_grads", "head"}))
    assert problem.output_grads is not None and problem.output_grads.shape == problem.targets.shape
    assert problem.head is not None and problem.head_targets is not None
    with torch.no_grad():
        logits = problem.head(problem.targets)
    np.testing.assert_allclose(logits.numpy(), problem.head_targets.numpy(), atol=1e-5)
