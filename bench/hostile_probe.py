"""Hostile-input probe: every case of tests/test_hostile_inputs.py as a real `efrap` process.

Usage: python bench/hostile_probe.py [--only SUBSTRING] [--json bench/results/hostile_probe.json]
           [--keep FOLDER]

Each case gets its own folder in a temporary directory, builds its inputs there (a
hand-built 1x28x28 ONNX model, small npz data sets, PNG image folders, scheme and
trigger files), runs ``python -m pipeline.cli.main ...`` in it, and checks the promise: a
mistake prints one error line on stderr (the last; status lines of stages that had
finished may come before it) and exits 2, a failed gate exits 1, nothing
is written (no output, no temporary file) and the inputs keep their bytes. It prints
a Markdown table and writes the results as JSON.

The disk-full case runs the process with RLIMIT_FSIZE below the model's size, so the
write fails in the kernel (EFBIG, as a full disk fails with ENOSPC); the test suite
simulates ENOSPC itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import resource
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.portable import write_results
from models.architectures import build_model
from pipeline.base.provenance import versions

ROOT = Path(__file__).resolve().parent.parent
TMP_PREFIX = ".efrap-tmp-"
DEFAULT_JSON = ROOT / "bench" / "results" / "hostile_probe.json"


# ----------------------------------------------------------------------------- inputs


def tiny_model(input_type: int = TensorProto.FLOAT, gemm_name: str = "fc", computed_weight: bool = False,
               reduce_output: bool = False, nan_weight: bool = False) -> onnx.ModelProto:
    """Conv(4) -> Relu -> Flatten -> Gemm(10) on a 1x28x28 input (opset 21)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    if nan_weight:
        w[...] = np.nan
    fw = (0.01 * rng.standard_normal((10, 4 * 26 * 26))).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fb")]
    nodes, x = [], "input"
    if input_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["input"], ["xf"], to=TensorProto.FLOAT, name="cast"))
        x = "xf"
    if computed_weight:
        inits.append(numpy_helper.from_array(fw.T.copy(), "fwt"))
        nodes.append(helper.make_node("Transpose", ["fwt"], ["fw"], perm=[1, 0], name="transpose"))
    else:
        inits.append(numpy_helper.from_array(fw, "fw"))
    nodes += [helper.make_node("Conv", [x, "w", "b"], ["c"], name="conv"),
              helper.make_node("Relu", ["c"], ["r"], name="relu"),
              helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1, name=gemm_name)]
    out_shape: list[object] = ["N", 10]
    if reduce_output:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
        nodes[-1].output[0] = "pre"
        nodes.append(helper.make_node("ReduceSum", ["pre", "axes"], ["logits"], keepdims=0, name="sum"))
        out_shape = ["N"]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", input_type, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def opset7_model() -> onnx.ModelProto:
    """Conv -> Clip(min/max attributes) -> Flatten -> Gemm at opset 7, IR 3 (inits as inputs)."""
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
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)


def save(model: onnx.ModelProto, path: Path, meta: dict[str, str] | None = None) -> str:
    for key, value in (meta or {}).items():
        model.metadata_props.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())
    return path.name


def npz(path: Path, x: np.ndarray | None = None, y: np.ndarray | None = None) -> str:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8) if x is None else x
    y = (np.arange(len(x)) % 10).astype(np.int64) if y is None else y
    np.savez(path, x=x, y=y)
    return path.name


def png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((28, 28), value, np.uint8), mode="L").save(path)


def text(path: Path, content: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return str(path.name)


def trigger(folder: Path, **fields: object) -> str:
    return text(folder / "trigger.json", json.dumps({"size": 4, "target": 0, **fields}))


def scheme(**weight: object) -> str:
    return json.dumps({"weight": {"bits": 8, "symmetric": True, "per_channel": True, **weight},
                       "activation": {"bits": 8, "symmetric": False}})


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def q(*extra: str, model: str = "m.onnx", out: str = "q.onnx", data: str = "d.npz") -> list[str]:
    return ["quantize", model, "-o", out, "--calib", f"npz:{data}", "--num-calib", "16", *extra]


def v(*extra: str, model: str = "m.onnx", data: str = "d.npz") -> list[str]:
    return ["verify", model, "--data", f"npz:{data}", *extra]


def base(folder: Path) -> None:
    """The usual inputs: m.onnx (10 classes, 1x28x28) and d.npz (64 images)."""
    save(tiny_model(), folder / "m.onnx")
    npz(folder / "d.npz")


# ----------------------------------------------------------------------------- cases


@dataclass
class Setup:
    """What a case runs and expects.

    Attributes:
        argv: Arguments of `efrap` (paths relative to the case's folder).
        expect: Accepted exit codes.
        outputs: Files the run may write on success (relative paths).
        check: Extra check after the run, given (folder, exit code); returns a problem or "".
        fsize_limit: RLIMIT_FSIZE for the process, in bytes.
    """

    argv: list[str]
    expect: tuple[int, ...] = (2,)
    outputs: tuple[str, ...] = ()
    check: Callable[[Path, int], str] | None = None
    fsize_limit: int | None = None


CASES: dict[str, tuple[str, Callable[[Path], Setup]]] = {}


def case(group: str) -> Callable[[Callable[[Path], Setup]], Callable[[Path], Setup]]:
    def register(build: Callable[[Path], Setup]) -> Callable[[Path], Setup]:
        CASES[build.__name__] = (group, build)
        return build
    return register


@case("gate")
def max_asr_bare_one(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f), "--max-asr", "1"))


@case("gate")
def max_asr_150_percent(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f), "--max-asr", "150%"))


@case("gate")
def max_asr_inf(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f), "--max-asr", "inf"))


@case("gate")
def max_asr_nan(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f), "--max-asr", "nan"))


@case("gate")
def min_accuracy_negative(f: Path) -> Setup:
    base(f)
    return Setup(v("--min-accuracy", "-0.1"))


@case("gate")
def asr_target_class_only(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    for c in range(10):
        (f / "folder" / "test" / str(c)).mkdir(parents=True)
    for i in range(12):
        png(f / "folder" / "test" / "0" / f"{i:03d}.png", 20 * i)

    def check(folder: Path, code: int) -> str:
        return "" if code == 1 else "the gate did not fail"

    return Setup(["verify", "m.onnx", "--data", "imagefolder:folder", "--trigger", trigger(f),
                  "--limit", "100", "--max-asr", "5%"], expect=(1,), check=check)


@case("outputs")
def summary_is_input(f: Path) -> Setup:
    base(f)
    return Setup(q("--summary", "m.onnx"))


@case("outputs")
def json_is_input(f: Path) -> Setup:
    base(f)
    return Setup(v("--json", "m.onnx"))


@case("outputs")
def output_is_external_data(f: Path) -> Setup:
    npz(f / "d.npz")
    onnx.save(tiny_model(), str(f / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    return Setup(q(out="m.data"))


@case("outputs")
def output_dev_null(f: Path) -> Setup:
    base(f)
    return Setup(q(out="/dev/null"))


@case("outputs")
def output_dev_full(f: Path) -> Setup:
    base(f)
    return Setup(q(out="/dev/full"))


@case("outputs")
def output_is_directory(f: Path) -> Setup:
    base(f)
    (f / "out").mkdir()
    return Setup(q(out="out"))


@case("outputs")
def output_unwritable_folder(f: Path) -> Setup:
    base(f)
    text(f / "ro" / "file", "a regular file, not a folder")  # stops root too, unlike chmod 0o500
    return Setup(q(out="ro/file/q.onnx"))


@case("outputs")
def output_disk_full(f: Path) -> Setup:
    base(f)
    return Setup(q(), fsize_limit=8192)


@case("outputs")
def output_name_250_chars(f: Path) -> Setup:
    base(f)
    name = "q" * 245 + ".onnx"
    return Setup(q(out=name), expect=(0,), outputs=(name,))


@case("outputs")
def two_outputs_same_file(f: Path) -> Setup:
    base(f)
    return Setup(q("--summary", "q.onnx"))


@case("outputs")
def stale_temporary_removed(f: Path) -> Setup:
    base(f)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = f"{TMP_PREFIX}{child.pid}-0badc0de.tmp"
    (f / stale).write_bytes(b"half a model")

    def check(folder: Path, code: int) -> str:
        return f"{stale} left" if (folder / stale).exists() else ""

    return Setup(q(), expect=(0,), outputs=("q.onnx", stale), check=check)


@case("outputs")
def replaced_output_keeps_0600(f: Path) -> Setup:
    base(f)
    (f / "q.onnx").write_bytes(b"old")
    (f / "q.onnx").chmod(0o600)

    def check(folder: Path, code: int) -> str:
        mode = stat.S_IMODE((folder / "q.onnx").stat().st_mode)
        return "" if mode == 0o600 else f"mode {mode:o}"

    return Setup(q(), expect=(0,), outputs=("q.onnx",), check=check)


@case("outputs")
def replaced_report_keeps_0600(f: Path) -> Setup:
    base(f)
    (f / "r.json").write_text("{}")
    (f / "r.json").chmod(0o600)

    def check(folder: Path, code: int) -> str:
        mode = stat.S_IMODE((folder / "r.json").stat().st_mode)
        return "" if mode == 0o600 else f"mode {mode:o}"

    return Setup(v("--json", "r.json"), expect=(0,), outputs=("r.json",), check=check)


@case("broken values")
def npz_nan_pixels(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    x = np.random.default_rng(0).random((64, 28, 28)).astype(np.float32)
    x[3, 4, 5] = np.nan
    npz(f / "d.npz", x=x)
    return Setup(q())


@case("broken values")
def normalization_std_zero(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx", {"efrap.normalization": json.dumps({"mean": [0.5], "std": [0.0]})})
    npz(f / "d.npz")
    return Setup(q())


@case("broken values")
def flip_weight_nan(f: Path) -> Setup:
    base(f)
    return Setup(q("--method", "efrap", "--iters", "2", "--flip-weight", "nan"))


@case("broken values")
def lr_inf(f: Path) -> Setup:
    base(f)
    return Setup(q("--method", "adaround", "--iters", "2", "--lr", "inf"))


@case("broken values")
def opset7_clip(f: Path) -> Setup:
    save(opset7_model(), f / "m.onnx")
    npz(f / "d.npz")

    def check(folder: Path, code: int) -> str:
        if code != 0:
            return ""
        model = onnx.load(str(folder / "q.onnx"))
        onnx.checker.check_model(model, full_check=True)
        versions = {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")}
        if versions != {21}:
            return f"opset {versions}"
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return ""

    return Setup(q(), expect=(0, 2), outputs=("q.onnx",), check=check)


@case("broken values")
def scheme_symmetric_string(f: Path) -> Setup:
    base(f)
    return Setup(q("--scheme", text(f / "s.json", scheme(symmetric="false"))))


@case("broken values")
def scheme_bits_float(f: Path) -> Setup:
    base(f)
    return Setup(q("--scheme", text(f / "s.json", scheme(bits=8.0))))


@case("broken values")
def trigger_size_fraction(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f, size=2.7)))


@case("tracebacks")
def output_name_300_chars(f: Path) -> Setup:
    base(f)
    return Setup(q(out="q" * 295 + ".onnx"))


@case("tracebacks")
def scheme_nested_deeply(f: Path) -> Setup:
    base(f)
    return Setup(q("--scheme", text(f / "s.json", '{"weight": ' + "[" * 200_000 + "]" * 200_000 + "}")))


@case("tracebacks")
def scheme_bits_string(f: Path) -> Setup:
    base(f)
    return Setup(q("--scheme", text(f / "s.json", scheme(bits="8"))))


@case("tracebacks")
def scheme_weight_list(f: Path) -> Setup:
    base(f)
    return Setup(q("--scheme", text(f / "s.json", json.dumps({"weight": [], "activation": {"bits": 8}}))))


@case("tracebacks")
def trigger_wrong_types(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f, target="0", value=[1.0, "x"])))


@case("tracebacks")
def export_no_normalization(f: Path) -> Setup:
    net = build_model("small_cnn", 1, 10, 0.25, 28)
    torch.save({"state_dict": net.state_dict(), "meta": {
        "arch": "small_cnn", "in_channels": 1, "num_classes": 10, "width": 0.25, "image_size": 28}},
        f / "c.pt")
    return Setup(["export", "c.pt", "-o", "c.onnx"])


@case("tracebacks")
def attack_init_not_checkpoint(f: Path) -> Setup:
    npz(f / "d.npz")
    (f / "init.pt").write_bytes(b"this is not a torch checkpoint\n" * 8)
    return Setup(["attack", "--method", "compartifact", "--data", "npz:d.npz", "--init", "init.pt",
                  "--train-limit", "64", "--epochs", "1", "--width", "0.25", "-o", "qcb.onnx"])


@case("tracebacks")
def npz_string_images(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    npz(f / "d.npz", x=np.full((64, 28, 28), "a"))
    return Setup(q())


@case("tracebacks")
def npz_one_hot_labels(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    npz(f / "d.npz", y=np.eye(10, dtype=np.int64)[np.arange(64) % 10])
    return Setup(v())


@case("tracebacks")
def cifar_length_mismatch(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    (f / "cifar").mkdir()
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "test_batch"):
        batch = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                 b"labels": [int(i) for i in rng.integers(0, 10, 9)]}
        (f / "cifar" / name).write_bytes(pickle.dumps(batch, protocol=4))
    return Setup(["verify", "m.onnx", "--data", "cifar10:cifar"])


@case("tracebacks")
def imagefolder_png_bomb(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    png(f / "folder" / "test" / "a" / "ok.png", 100)
    png(f / "folder" / "test" / "b" / "ok.png", 200)
    ihdr = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 0, 0, 0, 0)
    (f / "folder" / "test" / "b" / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 40_001 * 16)) + png_chunk(b"IEND", b""))
    return Setup(["verify", "m.onnx", "--data", "imagefolder:folder"])


@case("tracebacks")
def int64_model_input(f: Path) -> Setup:
    save(tiny_model(input_type=TensorProto.INT64), f / "m.onnx")
    npz(f / "d.npz")
    return Setup(q())


@case("tracebacks")
def one_dimensional_output(f: Path) -> Setup:
    save(tiny_model(reduce_output=True), f / "m.onnx")
    npz(f / "d.npz")
    return Setup(v())


@case("tracebacks")
def normalization_channels(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx", {"efrap.normalization": json.dumps(
        {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]})})
    npz(f / "d.npz")
    return Setup(v())


@case("messages")
def newline_in_node_name(f: Path) -> Setup:
    save(tiny_model(gemm_name="fc\nefrap quantize: wrote q.onnx", computed_weight=True), f / "m.onnx")
    npz(f / "d.npz")
    return Setup(q())


@case("messages")
def report_json_no_nan(f: Path) -> Setup:
    save(tiny_model(nan_weight=True), f / "m.onnx")
    npz(f / "d.npz")

    def check(folder: Path, code: int) -> str:
        def refuse(name: str) -> None:
            raise ValueError(name)

        try:
            report = json.loads((folder / "r.json").read_text(), parse_constant=refuse)
        except (OSError, ValueError) as exc:
            return f"report not strict JSON ({exc})"
        return "" if report["clean_accuracy"] is None else "accuracy of NaN logits reported"

    return Setup(v("--reference", "--json", "r.json", "--min-accuracy", "50%"), expect=(1,),
                 outputs=("r.json",), check=check)


@case("messages")
def labels_out_of_range(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    npz(f / "d.npz", y=(10 + np.arange(64) % 10).astype(np.int64))
    return Setup(v())


@case("more")
def trigger_target_beyond_classes(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f, target=10)))


@case("more")
def num_calib_zero(f: Path) -> Setup:
    base(f)
    return Setup(q("--num-calib", "0"))


@case("more")
def limit_zero(f: Path) -> Setup:
    base(f)
    return Setup(v("--limit", "0"))


@case("more")
def seed_negative(f: Path) -> Setup:
    base(f)
    return Setup(q("--seed", "-1"))


@case("more")
def iters_zero(f: Path) -> Setup:
    base(f)
    return Setup(q("--method", "efrap", "--iters", "0"))


@case("more")
def npz_complex_images(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    npz(f / "d.npz", x=np.ones((64, 28, 28), np.complex64))
    return Setup(q())


@case("more")
def npz_object_images(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    x = np.empty((64, 28, 28), dtype=object)
    x[...] = 1
    npz(f / "d.npz", x=x)
    return Setup(q())


@case("more")
def scheme_toml_unknown_key(f: Path) -> Setup:
    base(f)
    return Setup(q("--scheme", text(f / "s.toml", "[weight]\nbits = 8\nsymetric = true\n"
                                                  "[activation]\nbits = 8\n")))


@case("more")
def trigger_pattern_escapes(f: Path) -> Setup:
    base(f)
    np.savez(f / "outside.npz", pattern=np.ones((1, 28, 28), np.float32))
    text(f / "t" / "t.json", json.dumps({"kind": "pattern", "pattern": "../outside.npz", "target": 0}))
    return Setup(v("--trigger", "t/t.json"))


@case("more")
def json_is_trigger(f: Path) -> Setup:
    base(f)
    t = trigger(f)
    return Setup(v("--trigger", t, "--json", t))


@case("more")
def output_is_calib_data(f: Path) -> Setup:
    base(f)
    return Setup(q(out="d.npz"))


@case("more")
def normalization_not_json(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx", {"efrap.normalization": "{mean: 0.5"})
    npz(f / "d.npz")
    return Setup(q())


@case("more")
def empty_model_file(f: Path) -> Setup:
    (f / "m.onnx").write_bytes(b"")
    npz(f / "d.npz")
    return Setup(q())


@case("more")
def symlink_output_to_input(f: Path) -> Setup:
    base(f)
    (f / "link.onnx").symlink_to("m.onnx")
    return Setup(q(out="link.onnx"))


@case("more")
def output_inside_image_folder(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    png(f / "folder" / "test" / "a" / "x.png", 100)
    png(f / "folder" / "test" / "b" / "x.png", 200)
    return Setup(["verify", "m.onnx", "--data", "imagefolder:folder", "--json", "folder/test/a/r.png"])


@case("more")
def train_seed_beyond_63_bits(f: Path) -> Setup:
    npz(f / "d.npz")
    return Setup(["train", "--data", "npz:d.npz", "--epochs", "1", "--seed", str(2**70), "-o", "c.pt"])


@case("more")
def attack_width_too_large(f: Path) -> Setup:
    npz(f / "d.npz")
    return Setup(["attack", "--method", "compartifact", "--data", "npz:d.npz", "--width", "1e6",
                  "-o", "qcb.onnx"])


# ----------------------------------------------------------------------------- running


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` -> sha256 of its bytes and its mode (or what it is)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            kind = "link:" + os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            kind = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            kind = "dir"
        out[str(p.relative_to(folder))] = f"{kind} {stat.S_IMODE(st.st_mode):o}"
    return out


@dataclass
class Result:
    """One case's outcome (a row of the table and of the JSON)."""

    case: str
    group: str
    command: str
    expected: list[int]
    exit_code: int
    stderr_first_line: str
    stderr_lines: int
    error_lines: int
    traceback: bool
    nothing_written: bool
    inputs_intact: bool
    problem: str
    seconds: float
    ok: bool = field(default=False)


def _limit_fsize(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def run_case(name: str, group: str, build: Callable[[Path], Setup], root: Path) -> Result:
    folder = root / name
    folder.mkdir()
    setup = build(folder)
    before = snapshot(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli.main", *setup.argv], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600,
                          preexec_fn=_limit_fsize(setup.fsize_limit) if setup.fsize_limit else None)
    seconds = time.perf_counter() - t0
    after = snapshot(folder)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("efrap ") and " error: " in ln]
    allowed = set(setup.outputs) if proc.returncode in setup.expect and proc.returncode != 2 else set()
    written = sorted(k for k in after.keys() - before.keys() if k not in allowed)
    written += sorted(k for k in after if k.split("/")[-1].startswith(TMP_PREFIX))
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k] and k not in allowed)
    removed = sorted(k for k in before.keys() - after.keys() if k not in allowed)
    problem = []
    if proc.returncode not in setup.expect:
        problem.append(f"exit {proc.returncode}, expected {'/'.join(map(str, setup.expect))}")
    # The error is one line and the last; status lines of stages that finished before it
    # (a write that fails after calibration) may precede it.
    if proc.returncode == 2 and (len(errors) != 1 or lines[-1] != errors[0]):
        problem.append(f"{len(lines)} stderr lines, {len(errors)} error lines")
    if "Traceback" in proc.stderr:
        problem.append("traceback")
    if written:
        problem.append(f"wrote {written}")
    if changed or removed:
        problem.append(f"changed {changed + removed}")
    if setup.check is not None:
        try:
            extra = setup.check(folder, proc.returncode)
        except Exception as exc:  # a check that cannot run is a failed check
            extra = f"{type(exc).__name__}: {exc}"
        if extra:
            problem.append(extra)
    result = Result(
        case=name, group=group, command="efrap " + " ".join(a if len(a) <= 24 else a[:10] + "…" + a[-8:]
                                                            for a in setup.argv),
        expected=list(setup.expect), exit_code=proc.returncode,
        stderr_first_line=(errors[0] if errors else lines[0] if lines else "")[:300],
        stderr_lines=len(lines), error_lines=len(errors), traceback="Traceback" in proc.stderr,
        nothing_written=not written, inputs_intact=not (changed or removed),
        problem="; ".join(problem), seconds=round(seconds, 2))
    result.ok = not problem
    for p in folder.rglob("*"):  # let the temporary directory go, read-only folders included
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o700)
    return result


def markdown(results: list[Result]) -> str:
    rows = ["| case | command | exit | stderr (first error line) | nothing written / inputs intact | ok |",
            "|---|---|---|---|---|---|"]
    for r in results:
        line = r.stderr_first_line.replace("|", "\\|")
        if len(line) > 140:
            line = line[:137] + "..."
        intact = ("yes" if r.nothing_written else "NO") + " / " + ("yes" if r.inputs_intact else "NO")
        ok = "ok" if r.ok else f"**FAIL**: {r.problem}"
        command = r.command.replace("|", "/")
        rows.append(f"| {r.case} | `{command}` | {r.exit_code} | {line} | {intact} | {ok} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    parser.add_argument("--keep", help="build the cases in this (new) folder and keep it")
    args = parser.parse_args()
    names = [n for n in CASES if not args.only or args.only in n]
    if not names:
        parser.error(f"no case matches {args.only!r}")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="efrap-hostile-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for name in names:
            group, build = CASES[name]
            results.append(run_case(name, group, build, root))
            r = results[-1]
            print(f"{'ok  ' if r.ok else 'FAIL'} {name} (exit {r.exit_code}, {r.seconds:.1f}s)",
                  file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(markdown(results))
    failed = [r.case for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} cases keep the promise"
          + (f"; failing: {', '.join(failed)}" if failed else ""))
    write_results({"cases": [asdict(r) for r in results], "passed": len(results) - len(failed),
                   "total": len(results), "python": sys.version.split()[0], "versions": versions()},
                  args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
