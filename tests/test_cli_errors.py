"""Bad input: a clear one-line error, a non-zero exit, and nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.cli.main import main
from tests.conftest import export_tiny


def _run_fails(argv: list[str], capsys: pytest.CaptureFixture[str], out: Path | None,
               expect: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and "Traceback" not in "\n".join(err)
    last = err[-1]
    assert last.startswith("efrap ") and "error:" in last
    assert expect in last, last
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q.onnx"
    _run_fails(["quantize", str(tmp_path / "nope.onnx"), "-o", str(out)], capsys, out, "no such file")


def test_corrupt_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\xffthis is not a protobuf" * 10)
    out = tmp_path / "q.onnx"
    _run_fails(["quantize", str(bad), "-o", str(out)], capsys, out, "bad.onnx")


def test_no_quantizable_ops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 1, 28, 28])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10),
              str(path))
    out = tmp_path / "q.onnx"
    _run_fails(["quantize", str(path), "-o", str(out), "--num-calib", "8"], capsys, out,
               "no Conv, Gemm or MatMul")


def test_external_data_outside_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "secret.bin").write_bytes(np.ones(8 * 9, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    weight = numpy_helper.from_array(np.ones((8, 1, 3, 3), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../secret.bin")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 8, 26, 26])], [weight])
    path = folder / "ext.onnx"
    with open(path, "wb") as fh:
        fh.write(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)],
                                   ir_version=10).SerializeToString())
    out = tmp_path / "q.onnx"
    _run_fails(["quantize", str(path), "-o", str(out)], capsys, out, "outside the model's folder")


def test_unknown_scheme(tiny_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tiny_onnx.parent / "q.onnx"
    _run_fails(["quantize", str(tiny_onnx), "-o", str(out), "--scheme", "w3a3"], capsys, out,
               "unknown scheme")


def test_missing_dataset(tiny_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tiny_onnx.parent / "q.onnx"
    _run_fails(["quantize", str(tiny_onnx), "-o", str(out), "--calib",
                f"mnist:{tiny_onnx.parent / 'no-such-folder'}"], capsys, out, "no-such-folder")


def test_data_shape_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rgb = export_tiny(tmp_path / "rgb.onnx", in_channels=3)
    npz = tmp_path / "grey.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, x=rng.integers(0, 255, (16, 28, 28), dtype=np.uint8), y=np.arange(16) % 10)
    out = tmp_path / "q.onnx"
    _run_fails(["quantize", str(rgb), "-o", str(out), "--calib", f"npz:{npz}"], capsys, out,
               "rgb.onnx")


def test_nan_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = export_tiny(tmp_path / "nan.onnx")
    model = onnx.load(str(path))
    init = model.graph.initializer[0]
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(path))
    out = tmp_path / "q.onnx"
    _run_fails(["quantize", str(path), "-o", str(out)], capsys, out, "NaN or Inf")


def test_output_equals_input(tiny_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tiny_onnx.read_bytes()
    _run_fails(["quantize", str(tiny_onnx), "-o", str(tiny_onnx)], capsys, None, "would overwrite the input")
    assert tiny_onnx.read_bytes() == before


def test_verify_bad_trigger(tiny_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trig = tiny_onnx.parent / "t.json"
    trig.write_text('{"size": 4}')
    _run_fails(["verify", str(tiny_onnx), "--trigger", str(trig), "--data", "fashion-mnist"],
               capsys, None, "t.json")
