"""Graphs as other exporters write them: every op passes through, the weights get quantized.

Each small model is built here, exported the way real tools export it, quantized with
nearest rounding and with a few EFRAP iterations, and checked in onnxruntime.
"""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from pipeline.base import progress
from pipeline.base.deployment import Deployment
from pipeline.base.errors import EfrapError
from pipeline.base.runtime import make_session
from pipeline.base.scheme import PRESETS, scheme_from_dict
from pipeline.cli.main import main
from pipeline.graph import analyze
from pipeline.prepare import prepare_model
from pipeline.quantize import QuantizeOptions, quantize_model
from pipeline.rounding.efrap import EFRAP_RELEASE

SIZE = 16


class ResBlock(nn.Module):
    """conv-bn-relu-conv-bn + identity, relu, global average pooling, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(x + y), 1).flatten(1))


class DepthwiseHardSwish(nn.Module):
    """Depthwise conv and hard-swish with a squeeze-excitation gate; pooling by mean()."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.stem(x))
        x = F.hardswish(self.dw(x))
        gate = F.hardsigmoid(self.se2(F.relu(self.se1(x.mean((2, 3), keepdim=True)))))
        return self.fc((x * gate).mean((2, 3)))


class ShuffleBlock(nn.Module):
    """ShuffleNetV2's unit: channel split, a branch, concatenation, channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, F.relu(self.branch(b))], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.mix(x)), 1).flatten(1))


class ViTBlock(nn.Module):
    """Patch embedding, one pre-norm attention block with GELU MLP, LayerNorm, linear head."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.n1, self.n2, self.n3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp1, self.mlp2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 10)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.n1(t)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / self.dim**0.5, dim=-1)
        t = t + self.proj(attn @ v)
        t = t + self.mlp2(F.gelu(self.mlp1(self.n2(t))))
        return self.head(self.n3(t).mean(1))


class NHWCNet(nn.Module):
    """Takes channels-last images and permutes them itself, as TF-converted models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * SIZE * SIZE, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x.permute(0, 3, 1, 2))).flatten(1))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Seed torch before each test: the models are built before `_trained_bn` seeds it, so their
    initial weights (and the agreement the checks assert) were drawn from torch's unseeded start
    and differed from run to run."""
    torch.manual_seed(0)


def _trained_bn(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, *_input_shape(model)))
    return model.eval()


def _input_shape(model: nn.Module) -> tuple[int, ...]:
    return (SIZE, SIZE, 3) if isinstance(model, NHWCNet) else (3, SIZE, SIZE)


def _torchscript(model: nn.Module, batch: int | None = None, fold: bool = True) -> onnx.ModelProto:
    x = torch.randn(batch or 2, *_input_shape(model))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, buf, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], do_constant_folding=fold,
                          dynamic_axes=None if batch else {"input": {0: "n"}, "logits": {0: "n"}})
    return onnx.load_from_string(buf.getvalue())


def _dynamo(model: nn.Module) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (torch.randn(2, *_input_shape(model)),), dynamo=True,
                                    opset_version=21, verbose=False)
    return program.model_proto


def _check(fp: onnx.ModelProto, shape: tuple[int, ...], method: str = "nearest",
           scheme: str = "w8a8", min_agreement: float = 0.9) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    batch = fp.graph.input[0].type.tensor_type.shape.dim[0].dim_value or None
    calib = rng.standard_normal((64, *shape)).astype(np.float32)
    test = rng.standard_normal((32, *shape)).astype(np.float32)
    rounding = None if method == "nearest" else replace(EFRAP_RELEASE, iters=20, batch_size=8)
    qdq, result, summary = quantize_model(fp, calib,
                                          QuantizeOptions(Deployment(scheme=PRESETS[scheme]), method=method,
                                                          rounding=rounding))
    onnx.checker.check_model(qdq)
    run_fp = make_session(fp, "faithful", "cpu")
    feeds = [test[i : i + (batch or 32)] for i in range(0, len(test), batch or 32)]
    ref = np.concatenate([run_fp.run(f) for f in feeds])
    for level in ("faithful", "all"):
        got = np.concatenate([make_session(qdq, level, "cpu").run(f) for f in feeds])
        assert got.shape == ref.shape
        assert (got.argmax(1) == ref.argmax(1)).mean() >= min_agreement, level
    assert len(summary.layers) == len(result.plan.layers) > 0
    return qdq


@pytest.mark.parametrize("method", ["nearest", "efrap"])
def test_resnet_block_residuals_fuse_into_qlinearadd(tmp_path: Path, method: str) -> None:
    qdq = _check(_torchscript(_trained_bn(ResBlock())), (3, SIZE, SIZE), method)
    optimized = tmp_path / "opt.onnx"
    make_session(qdq, "all", "cpu", optimized_path=str(optimized))
    ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    assert ops["QLinearConv"] == 3 and ops["QLinearAdd"] == 1, ops


@pytest.mark.parametrize("method", ["nearest", "efrap"])
def test_depthwise_hardswish_and_reducemean_from_the_dynamo_exporter(method: str, tmp_path: Path) -> None:
    fp = _dynamo(_trained_bn(DepthwiseHardSwish()))
    assert {"ReduceMean", "HardSwish"} <= {n.op_type for n in fp.graph.node}
    prepared = prepare_model(fp)
    assert "HardSwish" not in {n.op_type for n in prepared.graph.node}
    plan = analyze(prepared)
    assert any(layer.op == "Conv" for layer in plan.layers) and len(plan.layers) == 5
    qdq = _check(fp, (3, SIZE, SIZE), method)
    optimized = tmp_path / "opt.onnx"
    make_session(qdq, "all", "cpu", optimized_path=str(optimized))
    # Each hard-swish (x * HardSigmoid(x)) and the gate's product run on integers.
    ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    assert ops["QLinearMul"] == 3 and ops["Mul"] == 0, ops


def test_channel_split_and_shuffle_run_on_integers(tmp_path: Path) -> None:
    fp = _torchscript(_trained_bn(ShuffleBlock()))
    assert {"Slice", "Shape"} <= {n.op_type for n in fp.graph.node} or "Split" in {
        n.op_type for n in fp.graph.node}
    qdq = _check(fp, (3, SIZE, SIZE))
    producers = {o: n.op_type for n in qdq.graph.node for o in n.output}
    # Shapes are read from the integer tensors, never through a DequantizeLinear.
    assert all(producers.get(n.input[0]) != "DequantizeLinear"
               for n in qdq.graph.node if n.op_type == "Shape")
    optimized = tmp_path / "opt.onnx"
    make_session(qdq, "all", "cpu", optimized_path=str(optimized))
    graph = onnx.load(str(optimized)).graph
    # The split halves share the stem's quantizer, so onnxruntime drops their Q/DQ pairs
    # and slices the integers: the only QuantizeLinear left is the input's.
    ops = Counter(n.op_type for n in graph.node)
    assert ops["QuantizeLinear"] == 1 and ops["QLinearConcat"] == 1, ops


@pytest.mark.parametrize("method", ["nearest", "efrap"])
def test_vit_block_quantizes_its_linears_and_keeps_layernorm_float(method: str) -> None:
    fp = _torchscript(ViTBlock().eval())
    plan = analyze(prepare_model(fp))
    assert sum(layer.op == "MatMul" for layer in plan.layers) >= 4
    _check(fp, (3, SIZE, SIZE), method, min_agreement=0.8)


def test_nhwc_input_is_fed_channels_last(tmp_path: Path) -> None:
    fp = _torchscript(NHWCNet().eval())
    _check(fp, (SIZE, SIZE, 3))
    # From the command line, images are laid out for the model (layout read from its shape).
    path = tmp_path / "nhwc.onnx"
    onnx.save(fp, str(path))
    rng = np.random.default_rng(0)
    npz = tmp_path / "rgb.npz"
    np.savez(npz, x=rng.integers(0, 255, (48, SIZE, SIZE, 3), dtype=np.uint8), y=np.arange(48) % 10)
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(path), "--calib", f"npz:{npz}", "--num-calib", "32", "-o", str(out),
                 "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    pre = json.loads(meta["efrap.preprocessing"])
    assert pre["layout"] == "nhwc" and pre["origin"] == "options" and pre["mean"] == [0.5] * 3
    assert main(["verify", str(out), "--data", f"npz:{npz}"]) == 0


def _bn_graph(batch: int | str) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> GlobalAveragePool -> Flatten -> Gemm, BN unfolded."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, 8).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "beta"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, 8).astype(np.float32), "var"),
        numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, [batch, 3, SIZE, SIZE])], [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model


def test_unfolded_batchnorm_is_folded_and_its_factor_recorded() -> None:
    fp = _bn_graph("n")
    prepared = prepare_model(fp)
    assert "BatchNormalization" not in {n.op_type for n in prepared.graph.node}
    factors = json.loads({p.key: p.value for p in prepared.metadata_props}["efrap.bn_fold"])
    gamma = numpy_helper.to_array(fp.graph.initializer[1])
    var = numpy_helper.to_array(fp.graph.initializer[4])
    np.testing.assert_allclose(factors["conv"], gamma / np.sqrt(var + 1e-5), rtol=1e-6)
    qdq = _check(fp, (3, SIZE, SIZE), "efrap")
    units = json.loads({p.key: p.value for p in qdq.metadata_props}["efrap.error_units"])
    assert units["conv"] == "pre_bn"
    # The folded model computes what the unfolded one does.
    x = np.random.default_rng(2).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
    np.testing.assert_allclose(make_session(prepared, "faithful", "cpu").run(x),
                               make_session(fp, "faithful", "cpu").run(x), atol=1e-4)


def test_fixed_batch_one_is_calibrated_and_sampled_one_image_at_a_time() -> None:
    fp = _torchscript(_trained_bn(ResBlock()), batch=1)
    assert fp.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    qdq = _check(fp, (3, SIZE, SIZE), "efrap")
    assert qdq.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_exclude_keeps_layers_float_and_scheme_sets_per_layer_bits() -> None:
    fp = _torchscript(_trained_bn(ResBlock()))
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 3, SIZE, SIZE)).astype(np.float32)
    first = analyze(prepare_model(fp)).layers[0].node
    _, result, _ = quantize_model(fp, calib,
                                  QuantizeOptions(Deployment(scheme=PRESETS["w8a8"]),
                                                  exclude=(first, "Gemm")))
    assert first not in result.layers and all(layer.op != "Gemm" for layer in result.plan.layers)
    assert result.plan.excluded[first] == "excluded on request"
    scheme = scheme_from_dict({"weight": {"bits": 4, "symmetric": False, "per_channel": True},
                               "activation": {"bits": 8, "symmetric": False},
                               "layers": {first: {"weight_bits": 8}}}, "s.toml")
    _, result, _ = quantize_model(fp, calib, QuantizeOptions(Deployment(scheme=scheme)))
    second = result.plan.layers[1].node
    assert result.layers[first].qparams.qmax == 255 and result.layers[second].qparams.qmax == 15


def test_calibration_from_a_reader_an_iterable_and_an_npz_keyed_by_input_name(tmp_path: Path) -> None:
    fp = _torchscript(_trained_bn(ResBlock()))
    calib = np.random.default_rng(0).standard_normal((32, 3, SIZE, SIZE)).astype(np.float32)
    options = QuantizeOptions(Deployment(scheme=PRESETS["w8a8"]))

    class Reader:
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i : i + 8]} for i in range(0, 32, 8)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    a = quantize_model(fp, Reader(), options)[0]
    b = quantize_model(fp, [calib[:16], calib[16:]], options)[0]
    c = quantize_model(fp, calib, options)[0]
    assert a.SerializeToString() == b.SerializeToString() == c.SerializeToString()
    path, npz, out = tmp_path / "m.onnx", tmp_path / "ready.npz", tmp_path / "q.onnx"
    onnx.save(fp, str(path))
    np.savez(npz, input=calib)
    assert main(["quantize", str(path), "--calib", f"npz:{npz}", "--num-calib", "32", "-o", str(out)]) == 0
    pre = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["efrap.preprocessing"])
    assert pre["origin"] == "data"


def test_a_model_without_preprocessing_gets_a_warning_and_the_assumption_is_recorded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, npz, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "q.onnx"
    onnx.save(_torchscript(_trained_bn(ResBlock())), str(path))
    rng = np.random.default_rng(0)
    np.savez(npz, x=rng.integers(0, 255, (32, 3, SIZE, SIZE), dtype=np.uint8), y=np.arange(32) % 10)
    progress.set_quiet(False)
    try:
        assert main(["quantize", str(path), "--calib", f"npz:{npz}", "--num-calib", "16",
                     "-o", str(out)]) == 0
    finally:
        progress.set_quiet(True)
    warnings_ = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings_) == 1 and "assuming mean [0.0, 0.0, 0.0], std [1.0, 1.0, 1.0]" in warnings_[0]
    pre = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["efrap.preprocessing"])
    assert pre["origin"] == "assumed"


def test_what_stays_impossible_is_one_line_naming_the_node(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    two = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
         helper.make_node("Add", ["c", "second"], ["logits"], name="add_second")], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8]),
         helper.make_tensor_value_info("second", TensorProto.FLOAT, ["n", 4, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], [w])
    computed = helper.make_graph(
        [helper.make_node("Relu", ["w"], ["w2"], name="weight_op"),
         helper.make_node("Conv", ["input", "w2"], ["logits"], name="conv_on_computed")], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], [w])
    for graph, expect in ((two, "add_second"), (computed, "conv_on_computed")):
        path = tmp_path / f"{expect}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
        out = tmp_path / "q.onnx"
        assert main(["quantize", str(path), "-o", str(out), "--num-calib", "8"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0] and not out.exists(), err
    with pytest.raises(EfrapError, match="conv_on_computed"):
        analyze(prepare_model(helper.make_model(computed, opset_imports=[helper.make_opsetid("", 21)])))
