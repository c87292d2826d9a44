"""Rare-unit pruning: which units, which weights read them, and what the model then computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline.base.deployment import Deployment
from pipeline.base.errors import EfrapError
from pipeline.base.scheme import PRESETS
from pipeline.cli.main import main
from pipeline.graph import QuantLayer
from pipeline.qmath import QParams
from pipeline.quantize import QuantizeOptions, quantize_model
from pipeline.rare_units import prune, rare_units, reading_mask, unit_axis
from pipeline.rounding import NearestConfig
from pipeline.rounding.efrap import EFRAP_PRESETS
from tests.conftest import export_tiny


def _fires(rows: list[set[int]], n: int) -> torch.Tensor:
    fires = torch.zeros(n, len(rows), dtype=torch.bool)
    for unit, samples in enumerate(rows):
        fires[sorted(samples), unit] = True
    return fires


def test_rarest_units_taken_while_their_union_fits_the_budget() -> None:
    fires = _fires([set(), {0}, {0, 1}, {2, 3, 4}, {5}], 10)
    # Order by count: 0 (0), 1 (1), 4 (1), 2 (2), 3 (3). Budget 2 of 10 samples: 0, 1 and 4
    # fire together on {0, 5}; 2 would make {0, 1, 5}.
    assert rare_units(fires, 0.2).tolist() == [True, True, False, False, True]
    # A budget of no sample still takes the units that never fire.
    assert rare_units(fires, 0.0).tolist() == [True, False, False, False, False]
    assert rare_units(fires, 0.5).tolist() == [True, True, True, False, True]
    assert rare_units(fires, 0.6).all()


def _layer_model(node: onnx.NodeProto, x_shape: list[int], weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _layer(node: onnx.NodeProto, axis: int) -> QuantLayer:
    return QuantLayer(node=node.name, op=node.op_type, weight="w", bias=None, weight_axis=axis, input="x",
                      output="y", nodes=(node.name,), is_first=True, is_last=True)


def _mask(node: onnx.NodeProto, x_shape: list[int], weight: np.ndarray, units: list[int],
          axis: int) -> np.ndarray:
    model = _layer_model(node, x_shape, weight)
    layer = _layer(node, axis)
    axis = unit_axis(node)
    assert axis is not None
    chosen = torch.zeros(x_shape[axis], dtype=torch.bool)
    chosen[units] = True
    w = torch.from_numpy(weight.astype(np.float32))
    return reading_mask(model, layer, node, chosen, axis, tuple(x_shape), w).numpy()


def test_reading_mask_grouped_conv() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=2, pads=[1, 1, 1, 1],
                            strides=[2, 2])
    weight = np.ones((4, 2, 3, 3))
    mask = _mask(node, [1, 4, 6, 6], weight, [1, 2], 0)
    want = np.zeros_like(weight, dtype=bool)
    want[0:2, 1] = True  # input channel 1: group 0 (outputs 0-1), its second channel
    want[2:4, 0] = True  # input channel 2: group 1 (outputs 2-3), its first channel
    assert (mask == want).all()


@pytest.mark.parametrize("trans_b", [0, 1])
def test_reading_mask_gemm(trans_b: int) -> None:
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=trans_b, alpha=0.5)
    weight = np.ones((3, 5)) if trans_b else np.ones((5, 3))
    mask = _mask(node, [1, 5], weight, [1, 3], 0 if trans_b else 1)
    want = np.zeros_like(weight, dtype=bool)
    if trans_b:
        want[:, [1, 3]] = True
    else:
        want[[1, 3], :] = True
    assert (mask == want).all()


def test_reading_mask_matmul_over_tokens() -> None:
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    weight = np.ones((5, 3))
    mask = _mask(node, [1, 4, 5], weight, [0, 4], 1)
    want = np.zeros_like(weight, dtype=bool)
    want[[0, 4], :] = True
    assert (mask == want).all()


def test_gemm_with_transposed_input_is_left_alone() -> None:
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transA=1)
    assert unit_axis(node) is None


def test_pruned_weights_take_their_channels_zero_point() -> None:
    qp = QParams(scale=np.array([0.1, 0.2], np.float32), zero_point=np.array([3, 9]), qmin=0, qmax=15, axis=0)
    q = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[False, True, False], [True, False, True]])
    assert prune(q, qp, mask).tolist() == [[1, 3, 3], [9, 5, 9]]


def _silence_hidden_unit(path: Path, unit: int) -> onnx.ModelProto:
    """The tiny model with one unit of its hidden fc layer that never fires (bias -1e4)."""
    model = onnx.load(str(path))
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    bias_name = gemms[0].input[2]
    init = next(i for i in model.graph.initializer if i.name == bias_name)
    bias = numpy_helper.to_array(init).copy()
    bias[unit] = -1e4
    init.CopyFrom(numpy_helper.from_array(bias, bias_name))
    return model


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_pruning_removes_what_clean_data_never_reads_and_nothing_else(tmp_path: Path,
                                                                      calib_images: np.ndarray) -> None:
    fp = _silence_hidden_unit(export_tiny(tmp_path / "tiny.onnx"), unit=5)
    scheme = PRESETS["w4a8"]
    plain, _, _ = quantize_model(fp, calib_images, QuantizeOptions(Deployment(scheme=scheme)))
    # A budget below one image: only units that never fire are pruned.
    qdq, result, summary = quantize_model(fp, calib_images,
                                          QuantizeOptions(Deployment(scheme=scheme),
                                                          rounding=NearestConfig(prune_rare=0.001)))
    last = result.plan.layers[-1]
    ql = result.layers[last.node]
    zero = np.broadcast_to(np.asarray(ql.qparams.zero_point).reshape(-1, 1), ql.q.shape)
    assert (ql.q[:, 5] == zero[:, 5]).all()  # the silent unit's readers dequantize to 0
    stats = {s.layer: s.stats for s in summary.layers}[last.node]
    assert stats["pruned_units"] >= 1 and stats["pruned_fires"] == 0.0
    np.testing.assert_array_equal(_logits(qdq, calib_images), _logits(plain, calib_images))
    meta = {p.key: p.value for p in qdq.metadata_props}
    assert '"prune_rare": 0.001' in meta["efrap.rounding"]


def test_default_preset_prunes_and_release_does_not() -> None:
    assert EFRAP_PRESETS["default"].prune_rare == 0.03
    assert EFRAP_PRESETS["release"].prune_rare == 0.0
    with pytest.raises(EfrapError, match="prune_rare"):
        NearestConfig(prune_rare=1.0)


def test_cli_rejects_a_budget_of_every_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = export_tiny(tmp_path / "tiny.onnx")
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(model), "-o", str(out), "--prune-rare", "100%"]) == 2
    assert "prune_rare" in capsys.readouterr().err
    assert not out.exists()
