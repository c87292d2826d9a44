"""Hostile inputs and user mistakes, one test per case of the probe (bench/hostile_probe.py).

The promise: a mistake or a hostile input prints ONE line on stderr
(``efrap CMD: error: ...``) and exits 2; a failed gate exits 1; nothing is written
(no output, no temporary file), inputs are never modified; a figure that cannot be
measured is "not measurable" and fails a gate that asks for it, never 0.

Every test runs `pipeline.cli.main.main` in-process on a tiny model exported once per module
and on small data sets written in its own tmp_path.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from models.architectures import build_model
from pipeline.cli.main import main
from tests.conftest import export_tiny

TMP_PREFIX = ".efrap-tmp-"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a tiny 1x28x28, 10-class ONNX model (exported once per module)."""
    return export_tiny(tmp_path_factory.mktemp("tiny") / "tiny.onnx").read_bytes()


@pytest.fixture
def model(tmp_path: Path, tiny_bytes: bytes) -> Path:
    """The tiny model in this test's folder."""
    path = tmp_path / "tiny.onnx"
    path.write_bytes(tiny_bytes)
    return path


@pytest.fixture
def npz(tmp_path: Path) -> Path:
    """64 uint8 images 1x28x28 with labels 0..9 (both splits)."""
    return _write_npz(tmp_path / "data.npz")


def _write_npz(path: Path, x: np.ndarray | None = None, y: np.ndarray | None = None) -> Path:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8) if x is None else x
    y = (np.arange(len(x)) % 10).astype(np.int64) if y is None else y
    np.savez(path, x=x, y=y)
    return path


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _edit_model(path: Path, out: Path, meta: dict[str, str] | None = None) -> Path:
    """A copy of the model at `path` with extra metadata."""
    m = onnx.load(str(path))
    for key, value in (meta or {}).items():
        m.metadata_props.add(key=key, value=value)
    return _save(m, out)


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every path under `folder` -> (sha256 of its bytes or a kind, mode)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            digest = "link:" + os.readlink(p)
        elif p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            digest = "dir"
        out[str(p.relative_to(folder))] = (digest, st.st_mode)
    return out


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(f"{TMP_PREFIX}*")] if folder.is_dir() else []


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    line = lines[0]
    assert line.startswith("efrap ") and "error:" in line, line
    assert "Traceback" not in err
    return line


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], folder: Path,
           expect: str = "") -> str:
    """Run the CLI; it must exit 2 with one error line and leave `folder` as it was."""
    before = _snapshot(folder)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}, stderr {err!r}"
    line = _one_error_line(err)
    assert expect.lower() in line.lower(), line
    assert _snapshot(folder) == before, "the command wrote or changed a file"
    return line


def _quantize(model: Path, out: Path, data: Path, *extra: object) -> list[str]:
    return ["quantize", str(model), "-o", str(out), "--calib", f"npz:{data}", "--num-calib", "16",
            *map(str, extra)]


def _verify(model: Path, data: Path, *extra: object) -> list[str]:
    return ["verify", str(model), "--data", f"npz:{data}", *map(str, extra)]


def _trigger(folder: Path, **fields: object) -> Path:
    path = folder / "trigger.json"
    path.write_text(json.dumps({"size": 4, "target": 0, **fields}))
    return path


def _scheme(folder: Path, text: str, name: str = "scheme.json") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _scheme_json(**weight: object) -> str:
    w = {"bits": 8, "symmetric": True, "per_channel": True, **weight}
    return json.dumps({"weight": w, "activation": {"bits": 8, "symmetric": False}})


def _small_graph(input_type: int = TensorProto.FLOAT, gemm_name: str = "fc",
                 computed_weight: bool = False, reduce_output: bool = False) -> onnx.ModelProto:
    """Conv(4) -> Relu -> Flatten -> Gemm(10) on a 1x28x28 input, built by hand (opset 21).

    `computed_weight`: the Gemm's weight is a Transpose of a constant, not a constant.
    """
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    fw = numpy_helper.from_array((0.01 * rng.standard_normal((10, 4 * 26 * 26))).astype(np.float32), "fw")
    fb = numpy_helper.from_array(np.zeros(10, np.float32), "fb")
    nodes = []
    x = "input"
    if input_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["input"], ["xf"], to=TensorProto.FLOAT, name="cast"))
        x = "xf"
    if computed_weight:
        fw = numpy_helper.from_array(numpy_helper.to_array(fw).T.copy(), "fwt")
        nodes.append(helper.make_node("Transpose", ["fwt"], ["fw"], perm=[1, 0], name="transpose"))
    nodes += [
        helper.make_node("Conv", [x, "w", "b"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name=gemm_name, transB=1),
    ]
    out_shape: list[object] = ["N", 10]
    inits = [w, b, fw, fb]
    if reduce_output:
        axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
        inits.append(axes)
        nodes[-1].output[0] = "pre"
        nodes.append(helper.make_node("ReduceSum", ["pre", "axes"], ["logits"], keepdims=0, name="sum"))
        out_shape = ["N"]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", input_type, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _png(path: Path, value: int) -> None:
    Image.fromarray(np.full((28, 28), value, np.uint8), mode="L").save(path)


# ----------------------------------------------------------------------------- gate


def test_gate_bare_one_is_refused(model: Path, npz: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    trig = _trigger(tmp_path)
    _fails(_verify(model, npz, "--trigger", trig, "--max-asr", "1"), capsys, tmp_path, "max-asr")


def test_gate_percentage_above_100(model: Path, npz: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    trig = _trigger(tmp_path)
    _fails(_verify(model, npz, "--trigger", trig, "--max-asr", "150%"), capsys, tmp_path, "100%")


def test_gate_infinite_threshold(model: Path, npz: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    trig = _trigger(tmp_path)
    _fails(_verify(model, npz, "--trigger", trig, "--max-asr", "inf"), capsys, tmp_path, "finite")


def test_gate_nan_threshold(model: Path, npz: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    trig = _trigger(tmp_path)
    _fails(_verify(model, npz, "--trigger", trig, "--max-asr", "nan"), capsys, tmp_path, "finite")


def test_gate_negative_min_accuracy(model: Path, npz: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_verify(model, npz, "--min-accuracy", "-0.1"), capsys, tmp_path, "min-accuracy")


def test_gate_asr_not_measurable_on_target_class_only(model: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # An image folder sorted by class whose test split holds only the trigger's target
    # class (class folder "0"; the other nine are empty): no image can show attack success.
    root = tmp_path / "folder"
    for c in range(10):
        (root / "test" / str(c)).mkdir(parents=True)
    for i in range(12):
        _png(root / "test" / "0" / f"{i:03d}.png", 20 * i)
    trig = _trigger(tmp_path, target=0)
    before = _snapshot(tmp_path)
    code = main(["verify", str(model), "--data", f"imagefolder:{root}", "--trigger", str(trig),
                 "--limit", "100", "--max-asr", "5%"])
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    assert "Traceback" not in err and "error:" not in err
    assert "not measurable" in out
    assert "gate: FAILED" in out
    assert "0.00%" not in out.split("attack success (non-target)")[1].splitlines()[0]
    assert _snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- outputs


def test_summary_over_input_model(model: Path, npz: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_quantize(model, tmp_path / "q.onnx", npz, "--summary", model), capsys, tmp_path,
           "would overwrite the input")


def test_json_over_input_model(model: Path, npz: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_verify(model, npz, "--json", model), capsys, tmp_path, "would overwrite the input")


def test_output_over_external_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ext"
    folder.mkdir()
    m = _small_graph()
    onnx.save(m, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    assert (folder / "m.data").is_file()
    npz = _write_npz(tmp_path / "data.npz")
    _fails(_quantize(folder / "m.onnx", folder / "m.data", npz), capsys, tmp_path,
           "would overwrite the input")


def test_output_dev_null(model: Path, npz: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_quantize(model, Path("/dev/null"), npz), capsys, tmp_path, "not a regular file")


def test_output_dev_full(model: Path, npz: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_quantize(model, Path("/dev/full"), npz), capsys, tmp_path, "not a regular file")


def test_output_is_a_directory(model: Path, npz: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    _fails(_quantize(model, tmp_path / "out", npz), capsys, tmp_path, "a folder")


def test_output_in_unwritable_folder(model: Path, npz: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    # A read-only folder (0o500) stops ordinary users but not root; a "folder" that is a
    # regular file stops everyone, root included.
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    blocker = ro / "file"
    try:
        ro.chmod(0o700)
        blocker.write_text("not a folder")
        ro.chmod(0o500)
        _fails(_quantize(model, blocker / "q.onnx", npz), capsys, tmp_path, "does not exist")
    finally:
        ro.chmod(0o700)


def test_output_disk_full(model: Path, npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    def full(proto: onnx.ModelProto, path: str) -> None:
        with open(path, "wb") as fh:
            fh.write(b"\x08" * 100)  # part of the model made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx, "save", full)
    out = tmp_path / "q.onnx"
    _fails(_quantize(model, out, npz), capsys, tmp_path, "no space left")
    assert not out.exists() and not _temporaries(tmp_path)


def test_output_name_250_characters(model: Path, npz: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / ("q" * 245 + ".onnx")
    assert len(out.name) == 250
    code = main(_quantize(model, out, npz))
    err = capsys.readouterr().err
    assert code == 0, err
    assert out.is_file() and not _temporaries(tmp_path)
    onnx.checker.check_model(onnx.load(str(out)))


def test_two_outputs_same_file(model: Path, npz: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q.onnx"
    _fails(_quantize(model, out, npz, "--summary", out), capsys, tmp_path, "name the same file")


def test_stale_temporary_of_killed_run_is_removed(model: Path, npz: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = child.pid
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    stale = tmp_path / f"{TMP_PREFIX}{dead}-0badc0de.tmp"
    stale.write_bytes(b"half a model")
    alive = tmp_path / f"{TMP_PREFIX}1-0badc0de.tmp"  # pid 1 is alive: its file is kept
    alive.write_bytes(b"someone else's")
    out = tmp_path / "q.onnx"
    code = main(_quantize(model, out, npz))
    assert code == 0, capsys.readouterr().err
    assert out.is_file()
    assert not stale.exists()
    assert alive.exists()


def test_replaced_output_keeps_mode_0600(model: Path, npz: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q.onnx"
    out.write_bytes(b"old")
    out.chmod(0o600)
    code = main(_quantize(model, out, npz))
    assert code == 0, capsys.readouterr().err
    assert out.read_bytes() != b"old"
    assert (out.stat().st_mode & 0o777) == 0o600
    assert not _temporaries(tmp_path)


def test_replaced_json_report_keeps_mode_0600(model: Path, npz: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "r.json"
    report.write_text("{}")
    report.chmod(0o600)
    code = main(_verify(model, npz, "--json", report))
    assert code == 0, capsys.readouterr().err
    assert json.loads(report.read_text())["images"] == 64
    assert (report.stat().st_mode & 0o777) == 0o600


# ----------------------------------------------------------------------------- broken values


def test_nan_pixels_in_npz(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(0).random((64, 28, 28)).astype(np.float32)
    x[3, 4, 5] = np.nan
    npz = _write_npz(tmp_path / "nan.npz", x=x)
    _fails(_quantize(model, tmp_path / "q.onnx", npz), capsys, tmp_path, "NaN")


def test_zero_std_in_model_normalization(model: Path, npz: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = _edit_model(model, tmp_path / "std0.onnx",
                      {"efrap.normalization": json.dumps({"mean": [0.5], "std": [0.0]})})
    _fails(_quantize(bad, tmp_path / "q.onnx", npz), capsys, tmp_path, "std must be positive")


def test_flip_weight_nan(model: Path, npz: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_quantize(model, tmp_path / "q.onnx", npz, "--method", "efrap", "--iters", "2",
                     "--flip-weight", "nan"), capsys, tmp_path, "--flip-weight")


def test_lr_inf(model: Path, npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_quantize(model, tmp_path / "q.onnx", npz, "--method", "adaround", "--iters", "2",
                     "--lr", "inf"), capsys, tmp_path, "--lr")


def test_opset7_clip_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Opset 7: Clip takes min/max as attributes (inputs since opset 11).
    # IR 3, as old exporters wrote it: every initializer is also a graph input.
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array((0.01 * rng.standard_normal((10, 2704))).astype(np.float32), "fw"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fb")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv"),
         helper.make_node("Clip", ["c"], ["r"], min=0.0, max=6.0, name="clip"),
         helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
         helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1, name="fc")],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28]),
              *[helper.make_tensor_value_info(i.name, TensorProto.FLOAT, list(i.dims)) for i in inits]],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)
    onnx.checker.check_model(old)
    path = _save(old, tmp_path / "old.onnx")
    npz = _write_npz(tmp_path / "data.npz")
    out = tmp_path / "q.onnx"
    before = _snapshot(tmp_path)
    code = main(_quantize(path, out, npz))
    err = capsys.readouterr().err
    if code == 2:  # refusing is allowed, with one line and nothing written
        _one_error_line(err)
        assert _snapshot(tmp_path) == before
        return
    assert code == 0, err
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    assert {o.version for o in q.opset_import if o.domain in ("", "ai.onnx")} == {21}
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": np.zeros((2, 1, 28, 28), np.float32)})[0]
    assert logits.shape == (2, 10) and np.isfinite(logits).all()


def test_scheme_symmetric_string_false(model: Path, npz: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    scheme = _scheme(tmp_path, _scheme_json(symmetric="false"))
    _fails(_quantize(model, tmp_path / "q.onnx", npz, "--scheme", scheme), capsys, tmp_path,
           "true or false")


def test_scheme_bits_float(model: Path, npz: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    scheme = _scheme(tmp_path, _scheme_json(bits=8.0))
    _fails(_quantize(model, tmp_path / "q.onnx", npz, "--scheme", scheme), capsys, tmp_path,
           "must be an integer")


def test_trigger_size_fraction(model: Path, npz: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    trig = _trigger(tmp_path, size=2.7)
    _fails(_verify(model, npz, "--trigger", trig), capsys, tmp_path, "size")


# ----------------------------------------------------------------------------- former tracebacks


def test_output_name_too_long(model: Path, npz: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_quantize(model, tmp_path / ("q" * 295 + ".onnx"), npz), capsys, tmp_path, "longer than")


def test_scheme_nested_deeply(model: Path, npz: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    scheme = _scheme(tmp_path, '{"weight": ' + "[" * 200_000 + "]" * 200_000 + "}")
    _fails(_quantize(model, tmp_path / "q.onnx", npz, "--scheme", scheme), capsys, tmp_path,
           "nested")


def test_scheme_bits_string(model: Path, npz: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    scheme = _scheme(tmp_path, _scheme_json(bits="8"))
    _fails(_quantize(model, tmp_path / "q.onnx", npz, "--scheme", scheme), capsys, tmp_path,
           "must be an integer")


def test_scheme_weight_list(model: Path, npz: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    scheme = _scheme(tmp_path, json.dumps({"weight": [], "activation": {"bits": 8}}))
    _fails(_quantize(model, tmp_path / "q.onnx", npz, "--scheme", scheme), capsys, tmp_path,
           "table/object")


def test_trigger_field_wrong_types(model: Path, npz: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    trig = _trigger(tmp_path, target="0", value=[1.0, "x"])
    _fails(_verify(model, npz, "--trigger", trig), capsys, tmp_path, "target")


def test_export_checkpoint_without_normalization(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    net = build_model("small_cnn", 1, 10, 0.25, 28)
    ckpt = tmp_path / "c.pt"
    torch.save({"state_dict": net.state_dict(),
                "meta": {"arch": "small_cnn", "in_channels": 1, "num_classes": 10, "width": 0.25,
                         "image_size": 28}}, ckpt)
    _fails(["export", ckpt, "-o", tmp_path / "c.onnx"], capsys, tmp_path, "normalization")


def test_attack_init_not_a_checkpoint(npz: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    init = tmp_path / "init.pt"
    init.write_bytes(b"this is not a torch checkpoint\n" * 8)
    _fails(["attack", "--method", "compartifact", "--data", f"npz:{npz}", "--init", init,
            "--train-limit", "64", "--epochs", "1", "--width", "0.25", "-o", tmp_path / "qcb.onnx"],
           capsys, tmp_path, "init.pt")


def test_npz_string_images(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npz = _write_npz(tmp_path / "s.npz", x=np.full((64, 28, 28), "a"))
    _fails(_quantize(model, tmp_path / "q.onnx", npz), capsys, tmp_path, "dtype")


def test_npz_one_hot_labels(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npz = _write_npz(tmp_path / "h.npz", y=np.eye(10, dtype=np.int64)[np.arange(64) % 10])
    _fails(_verify(model, npz), capsys, tmp_path, "one-hot")


def test_cifar_batch_length_mismatch(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "test_batch"):
        batch = {b"batch_label": b"x", b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, 9)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=4)
    _fails(["verify", model, "--data", f"cifar10:{folder}"], capsys, tmp_path, "10 images but 9 labels")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_imagefolder_decompression_bomb(model: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "folder"
    for c in ("a", "b"):
        (root / "test" / c).mkdir(parents=True)
        _png(root / "test" / c / "ok.png", 100)
    # A PNG header declaring 40000 x 40000 grey pixels: 1.6 gigapixels once decoded.
    ihdr = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 40_001 * 16)
    (root / "test" / "b" / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b""))
    _fails(["verify", model, "--data", f"imagefolder:{root}"], capsys, tmp_path, "bomb")


def test_int64_model_input(npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _save(_small_graph(input_type=TensorProto.INT64), tmp_path / "int.onnx")
    _fails(_quantize(path, tmp_path / "q.onnx", npz), capsys, tmp_path, "float32")


def test_one_dimensional_model_output(npz: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = _save(_small_graph(reduce_output=True), tmp_path / "flat.onnx")
    _fails(_verify(path, npz), capsys, tmp_path, "rank 1")


def test_normalization_wrong_channel_count(model: Path, npz: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    bad = _edit_model(model, tmp_path / "rgbnorm.onnx", {"efrap.normalization": json.dumps(
        {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]})})
    _fails(_verify(bad, npz), capsys, tmp_path, "3 values for a 1-channel input")


# ----------------------------------------------------------------------------- messages and reports


def test_newline_in_node_name_stays_one_line(npz: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    forged = "fc\nefrap quantize: wrote q.onnx"
    path = _save(_small_graph(gemm_name=forged, computed_weight=True), tmp_path / "nl.onnx")
    line = _fails(_quantize(path, tmp_path / "q.onnx", npz), capsys, tmp_path, "fc\\nefrap")
    assert "\n" not in line


def test_report_json_without_nan(tmp_path: Path, npz: Path, tiny_bytes: bytes,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    # NaN weights make NaN logits: clean accuracy cannot be measured; the report says
    # null (not NaN, which is not JSON) and the gate that asks for it fails (exit 1).
    m = onnx.ModelProto.FromString(tiny_bytes)
    init = next(i for i in m.graph.initializer if numpy_helper.to_array(i).ndim == 4)
    arr = numpy_helper.to_array(init).copy()
    arr[...] = np.nan
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    path = _save(m, tmp_path / "nan.onnx")
    report = tmp_path / "r.json"
    code = main(_verify(path, npz, "--reference", "--json", report, "--min-accuracy", "50%"))
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    assert "Traceback" not in err

    def refuse(name: str) -> None:
        raise ValueError(f"{name} in a JSON report")

    data = json.loads(report.read_text(), parse_constant=refuse)
    assert data["clean_accuracy"] is None
    assert data["gate"]["passed"] is False
    assert "not measurable" in out


def test_labels_out_of_range(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npz = _write_npz(tmp_path / "hi.npz", y=(10 + np.arange(64) % 10).astype(np.int64))
    _fails(_verify(model, npz), capsys, tmp_path, "not a class of this model")


# ----------------------------------------------------------------------------- ten more


def test_trigger_target_beyond_classes(model: Path, npz: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    trig = _trigger(tmp_path, target=10)
    _fails(_verify(model, npz, "--trigger", trig), capsys, tmp_path, "trigger target 10")


def test_num_calib_zero(model: Path, npz: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_quantize(model, tmp_path / "q.onnx", npz, "--num-calib", "0"), capsys, tmp_path,
           "--num-calib")


def test_limit_zero(model: Path, npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_verify(model, npz, "--limit", "0"), capsys, tmp_path, "--limit")


def test_seed_negative(model: Path, npz: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_quantize(model, tmp_path / "q.onnx", npz, "--seed", "-1"), capsys, tmp_path, "--seed")


def test_npz_complex_images(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npz = _write_npz(tmp_path / "c.npz", x=np.ones((64, 28, 28), np.complex64))
    _fails(_quantize(model, tmp_path / "q.onnx", npz), capsys, tmp_path, "complex")


def test_npz_object_images(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.empty((64, 28, 28), dtype=object)
    x[...] = 1
    path = tmp_path / "o.npz"
    np.savez(path, x=x, y=np.arange(64) % 10)
    _fails(_quantize(model, tmp_path / "q.onnx", path), capsys, tmp_path, "o.npz")


def test_scheme_toml_unknown_key(model: Path, npz: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    scheme = _scheme(tmp_path, "[weight]\nbits = 8\nsymetric = true\n[activation]\nbits = 8\n",
                     "s.toml")
    _fails(_quantize(model, tmp_path / "q.onnx", npz, "--scheme", scheme), capsys, tmp_path,
           "unknown keys")


def test_trigger_pattern_escapes_folder(model: Path, npz: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "outside.npz", pattern=np.ones((1, 28, 28), np.float32))
    folder = tmp_path / "trig"
    folder.mkdir()
    trig = folder / "t.json"
    trig.write_text(json.dumps({"kind": "pattern", "pattern": "../outside.npz", "target": 0}))
    _fails(_verify(model, npz, "--trigger", trig), capsys, tmp_path, "inside the trigger's folder")


def test_json_over_trigger_file(model: Path, npz: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    trig = _trigger(tmp_path)
    _fails(_verify(model, npz, "--trigger", trig, "--json", trig), capsys, tmp_path,
           "would overwrite the input")


def test_output_over_calibration_data(model: Path, npz: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_quantize(model, npz, npz), capsys, tmp_path, "would overwrite the input")


def test_normalization_metadata_not_json(model: Path, npz: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = _edit_model(model, tmp_path / "nj.onnx", {"efrap.normalization": "{mean: 0.5"})
    _fails(_quantize(bad, tmp_path / "q.onnx", npz), capsys, tmp_path, "not valid JSON")


def test_empty_model_file(npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    _fails(_quantize(empty, tmp_path / "q.onnx", npz), capsys, tmp_path, "empty.onnx")


def test_symlink_output_to_input(model: Path, npz: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    link = tmp_path / "link.onnx"
    link.symlink_to(model)
    _fails(_quantize(model, link, npz), capsys, tmp_path, "would overwrite the input")


def test_iters_zero(model: Path, npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(_quantize(model, tmp_path / "q.onnx", npz, "--method", "efrap", "--iters", "0"), capsys,
           tmp_path, "--iters")


def test_output_inside_input_image_folder(model: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # A new file inside the data set's folder would change the data set: refused too.
    root = tmp_path / "folder"
    for c in ("a", "b"):
        (root / "test" / c).mkdir(parents=True)
        _png(root / "test" / c / "x.png", 100)
    _fails(["verify", model, "--data", f"imagefolder:{root}", "--json", root / "test" / "a" / "r.png"],
           capsys, tmp_path, "inside the input folder")


def test_train_seed_beyond_63_bits(npz: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    # torch.manual_seed overflows past 64 bits: refused where it is parsed.
    _fails(["train", "--data", f"npz:{npz}", "--epochs", "1", "--seed", str(2**70), "-o",
            tmp_path / "c.pt"], capsys, tmp_path, "--seed")


def test_attack_width_too_large(npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["attack", "--method", "compartifact", "--data", f"npz:{npz}", "--width", "1e6", "-o",
            tmp_path / "qcb.onnx"], capsys, tmp_path, "--width")
