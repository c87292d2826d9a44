"""Hostile inputs and user mistakes: the one list of cases, read by the tests and by the bench.

`tests/test_hostile_inputs.py` runs every case (in this process, unless the case needs
its own: a resource limit, a locale, a broken standard output, a file that could
block); `bench/hostile_probe.py` runs every case as a real ``efrap`` process and
prints the table. Both judge a run with `judge`, against the promise: a mistake or a
hostile input prints ONE error line (``efrap CMD: error: ...``, the last line on
stderr; status lines of stages that had finished may come before it), exits 2, and
writes nothing (no output, no temporary file); inputs keep their bytes and modes; a
failed gate exits 1; no run shows a traceback.

Each case is a function that builds its inputs in an empty folder (a hand-built
1x28x28 ONNX model, small npz data sets, PNG image folders, scheme, trigger, gate and
manifest files) and returns a `Setup`: the arguments of ``efrap`` (paths relative to
the folder), the accepted exit codes, the text the error line must contain, the files
a successful run must write, and any further check. No case can pass a run that did
nothing: a refusal must name its reason, a success must leave its outputs or pass its
check (`tests/test_hostile_inputs.py` holds every case to that).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import resource
import stat
import struct
import subprocess
import sys
import time
import traceback
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from models.architectures import build_model
from pipeline.cli.main import main as efrap_main

ROOT = Path(__file__).resolve().parent.parent
TMP_PREFIX = ".efrap-tmp-"


# ----------------------------------------------------------------------------- inputs


def tiny_model(input_type: int = TensorProto.FLOAT, gemm_name: str = "fc", computed_weight: bool = False,
               reduce_output: bool = False, nan_weight: bool = False, channels: int = 1) -> onnx.ModelProto:
    """Conv(4) -> Relu -> Flatten -> Gemm(10) on a `channels` x 28 x 28 input (opset 21).

    Args:
        input_type: The graph input's type (a Cast to float follows a non-float input).
        gemm_name: The Gemm node's name.
        computed_weight: The Gemm's weight is a Transpose of a constant, not a constant.
        reduce_output: The logits are summed to one value per image (a rank-1 output).
        nan_weight: Every weight of the Conv is NaN.
        channels: The input's channels.
    """
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, channels, 3, 3)).astype(np.float32)
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
        nodes, "g", [helper.make_tensor_value_info("input", input_type, ["N", channels, 28, 28])],
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
    """Write `model` (with extra metadata) to `path`; returns the file's name."""
    for key, value in (meta or {}).items():
        model.metadata_props.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())
    return path.name


def npz(path: Path, x: np.ndarray | None = None, y: np.ndarray | None = None, n: int = 64) -> str:
    """`n` random uint8 28x28 images labelled 0..9 in turn (or the given arrays) as x and y."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if x is None else x
    y = (np.arange(len(x)) % 10).astype(np.int64) if y is None else y
    np.savez(path, x=x, y=y)
    return path.name


def png(path: Path, value: int) -> None:
    """A 28x28 grey PNG of one value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((28, 28), value, np.uint8), mode="L").save(path)


def text(path: Path, content: str) -> str:
    """Write `content` to `path` (folders made); returns the path relative to its case folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path.name


def trigger(folder: Path, **fields: object) -> str:
    """A patch trigger file (size 4, target 0, and `fields`)."""
    return text(folder / "trigger.json", json.dumps({"size": 4, "target": 0, **fields}))


def scheme(**weight: object) -> str:
    """A W8A8 scheme's JSON text with `weight` fields overridden."""
    return json.dumps({"weight": {"bits": 8, "symmetric": True, "per_channel": True, **weight},
                       "activation": {"bits": 8, "symmetric": False}})


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk (length, kind, data, CRC)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def q(*extra: str, model: str = "m.onnx", out: str = "q.onnx", data: str = "d.npz") -> list[str]:
    """`efrap quantize` on 16 calibration images."""
    return ["quantize", model, "-o", out, "--calib", f"npz:{data}", "--num-calib", "16", *extra]


def v(*extra: str, model: str = "m.onnx", data: str = "d.npz") -> list[str]:
    """`efrap verify`."""
    return ["verify", model, "--data", f"npz:{data}", *extra]


def base(folder: Path) -> None:
    """The usual inputs: m.onnx (10 classes, 1x28x28) and d.npz (64 images)."""
    save(tiny_model(), folder / "m.onnx")
    npz(folder / "d.npz")


#: A manifest's defaults: the cheapest run (nearest W8A8 on 16 images, no scan).
MANIFEST_DEFAULTS = {"data": "npz:d.npz", "method": "nearest", "scheme": "w8a8", "scan": False,
                     "num_calib": 16, "holdout": 16}


def manifest_toml(models: str, rounding: str = "") -> str:
    """A TOML manifest with `MANIFEST_DEFAULTS`, a [defaults.rounding] table and `models`."""
    lines = ["[defaults]", *(f"{k} = {json.dumps(v)}" for k, v in MANIFEST_DEFAULTS.items())]
    if rounding:
        lines += ["[defaults.rounding]", rounding]
    return "\n".join([*lines, models, ""])


def gate_toml(extra: str = "", output: str = "gate-out") -> str:
    """A gate config on m.onnx and d.npz, with `extra` tables."""
    return f'model = "m.onnx"\ndata = "npz:d.npz"\nscheme = "w8a8"\noutput = "{output}"\n{extra}'


#: An attack that runs in seconds on random data: 2,200 images leave 200 to train on once
#: 2,000 are held out; 2 steps of one epoch leave the backdoor awake in full precision.
QUICK_ATTACK = ["attack", "--method", "compartifact", "--data", "npz:big.npz", "--train-limit", "2200",
                "--steps-per-epoch", "2", "--epochs", "1", "--pretrain-epochs", "1", "--width", "0.25",
                "--device", "cpu", "-o", "qcb.onnx"]


def quick_attack_data(folder: Path) -> None:
    """big.npz: 2,300 random images, enough for `QUICK_ATTACK`."""
    npz(folder / "big.npz", n=2300)


def run_quietly(argv: list[str], folder: Path) -> int:
    """Run ``efrap`` in this process in `folder`, its output discarded (to build an input)."""
    with _in_folder(folder), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        return efrap_main(argv)


def metadata(path: Path) -> dict[str, str]:
    """An ONNX file's metadata_props."""
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


# ----------------------------------------------------------------------------- cases


@dataclass
class Run:
    """What one run of ``efrap`` did."""

    folder: Path
    code: int
    stdout: str
    stderr: str


@dataclass
class Setup:
    """What a case runs and expects.

    Attributes:
        argv: Arguments of `efrap` (paths relative to the case's folder).
        expect: Accepted exit codes.
        message: Text the error line must hold when the run exits 2 (case-insensitive).
        outputs: Files a run that exits 0 or 1 (when expected) must leave, written or
            replaced (relative paths).
        removes: Files such a run may remove.
        check: Extra check after the run; returns a problem or "".
        fsize_limit: RLIMIT_FSIZE for the process, in bytes.
        env: Environment variables set for the process (a locale).
        stdout: "pipe" (read back), "closed" (a pipe whose reader is gone) or "full" (/dev/full).
        process: Run it as its own process in the tests too (a file that could block).
        timeout: Seconds the run may take.
    """

    argv: list[str]
    expect: tuple[int, ...] = (2,)
    message: str = ""
    outputs: tuple[str, ...] = ()
    removes: tuple[str, ...] = ()
    check: Callable[[Run], str] | None = None
    fsize_limit: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    stdout: str = "pipe"
    process: bool = False
    timeout: float = 600.0

    @property
    def own_process(self) -> bool:
        """Whether only a process of its own can run the case as it is meant."""
        return self.process or self.fsize_limit is not None or bool(self.env) or self.stdout != "pipe"


CASES: dict[str, tuple[str, Callable[[Path], Setup]]] = {}


def case(group: str) -> Callable[[Callable[[Path], Setup]], Callable[[Path], Setup]]:
    """Register a case under its function's name."""
    def register(build: Callable[[Path], Setup]) -> Callable[[Path], Setup]:
        CASES[build.__name__] = (group, build)
        return build
    return register


@case("gate")
def max_asr_bare_one(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f), "--max-asr", "1"), message="max-asr")


@case("gate")
def max_asr_150_percent(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f), "--max-asr", "150%"), message="100%")


@case("gate")
def max_asr_inf(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f), "--max-asr", "inf"), message="finite")


@case("gate")
def max_asr_nan(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f), "--max-asr", "nan"), message="finite")


@case("gate")
def min_accuracy_negative(f: Path) -> Setup:
    base(f)
    return Setup(v("--min-accuracy", "-0.1"), message="min-accuracy")


@case("gate")
def asr_target_class_only(f: Path) -> Setup:
    # The test split holds only the trigger's target class (folder "0"; the other nine
    # are empty): no image can show attack success, so the gate that asks for it fails.
    save(tiny_model(), f / "m.onnx")
    for c in range(10):
        (f / "folder" / "test" / str(c)).mkdir(parents=True)
    for i in range(12):
        png(f / "folder" / "test" / "0" / f"{i:03d}.png", 20 * i)

    def check(run: Run) -> str:
        if "not measurable" not in run.stdout or "gate: FAILED" not in run.stdout:
            return "attack success not reported as not measurable, or the gate passed"
        row = run.stdout.split("attack success (non-target)")[1].splitlines()[0]
        return "attack success reported as 0.00%" if "0.00%" in row else ""

    return Setup(["verify", "m.onnx", "--data", "imagefolder:folder", "--trigger", trigger(f),
                  "--limit", "100", "--max-asr", "5%"], expect=(1,), check=check)


@case("outputs")
def summary_is_input(f: Path) -> Setup:
    base(f)
    return Setup(q("--summary", "m.onnx"), message="would overwrite the input")


@case("outputs")
def json_is_input(f: Path) -> Setup:
    base(f)
    return Setup(v("--json", "m.onnx"), message="would overwrite the input")


@case("outputs")
def output_is_external_data(f: Path) -> Setup:
    npz(f / "d.npz")
    onnx.save(tiny_model(), str(f / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    return Setup(q(out="m.data"), message="would overwrite the input")


@case("outputs")
def output_dev_null(f: Path) -> Setup:
    base(f)
    return Setup(q(out="/dev/null"), message="not a regular file")


@case("outputs")
def output_dev_full(f: Path) -> Setup:
    base(f)
    return Setup(q(out="/dev/full"), message="not a regular file")


@case("outputs")
def output_is_directory(f: Path) -> Setup:
    base(f)
    (f / "out").mkdir()
    return Setup(q(out="out"), message="a folder")


@case("outputs")
def output_unwritable_folder(f: Path) -> Setup:
    base(f)
    text(f / "ro" / "file", "a regular file, not a folder")  # stops root too, unlike chmod 0o500
    return Setup(q(out="ro/file/q.onnx"), message="does not exist")


@case("outputs")
def output_disk_full(f: Path) -> Setup:
    # RLIMIT_FSIZE below the model's size: the write fails in the kernel (EFBIG, as a
    # full disk fails with ENOSPC), after calibration and rounding.
    base(f)
    return Setup(q(), message="cannot write", fsize_limit=8192)


@case("outputs")
def output_trailing_separator(f: Path) -> Setup:
    # "nodir/" names a folder; writing a file called "nodir" instead would surprise.
    base(f)
    return Setup(q(out="nodir/"), message="must name a file")


@case("outputs")
def output_name_250_chars(f: Path) -> Setup:
    base(f)
    name = "q" * 245 + ".onnx"

    def check(run: Run) -> str:
        onnx.checker.check_model(onnx.load(str(run.folder / name)))
        return ""

    return Setup(q(out=name), expect=(0,), outputs=(name,), check=check)


@case("outputs")
def two_outputs_same_file(f: Path) -> Setup:
    base(f)
    return Setup(q("--summary", "q.onnx"), message="name the same file")


@case("outputs")
def stale_temporary_removed(f: Path) -> Setup:
    # A temporary file of a killed run (its process gone) is removed; one of a live
    # process (pid 1) is someone else's and stays.
    base(f)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = f"{TMP_PREFIX}{child.pid}-0badc0de.tmp"
    alive = f"{TMP_PREFIX}1-0badc0de.tmp"
    (f / stale).write_bytes(b"half a model")
    (f / alive).write_bytes(b"someone else's")

    def check(run: Run) -> str:
        if (run.folder / stale).exists():
            return f"{stale} left"
        return "" if (run.folder / alive).exists() else f"{alive} of a live process removed"

    return Setup(q(), expect=(0,), outputs=("q.onnx",), removes=(stale,), check=check)


@case("outputs")
def replaced_output_keeps_0600(f: Path) -> Setup:
    base(f)
    (f / "q.onnx").write_bytes(b"old")
    (f / "q.onnx").chmod(0o600)

    def check(run: Run) -> str:
        out = run.folder / "q.onnx"
        mode = stat.S_IMODE(out.stat().st_mode)
        if out.read_bytes() == b"old":
            return "not replaced"
        return "" if mode == 0o600 else f"mode {mode:o}"

    return Setup(q(), expect=(0,), outputs=("q.onnx",), check=check)


@case("outputs")
def replaced_report_keeps_0600(f: Path) -> Setup:
    base(f)
    (f / "r.json").write_text("{}")
    (f / "r.json").chmod(0o600)

    def check(run: Run) -> str:
        report = run.folder / "r.json"
        mode = stat.S_IMODE(report.stat().st_mode)
        if json.loads(report.read_text()).get("images") != 64:
            return "report not replaced"
        return "" if mode == 0o600 else f"mode {mode:o}"

    return Setup(v("--json", "r.json"), expect=(0,), outputs=("r.json",), check=check)


@case("broken values")
def npz_nan_pixels(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    x = np.random.default_rng(0).random((64, 28, 28)).astype(np.float32)
    x[3, 4, 5] = np.nan
    npz(f / "d.npz", x=x)
    return Setup(q(), message="NaN")


@case("broken values")
def normalization_std_zero(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx", {"efrap.normalization": json.dumps({"mean": [0.5], "std": [0.0]})})
    npz(f / "d.npz")
    return Setup(q(), message="std must be positive")


@case("broken values")
def flip_weight_nan(f: Path) -> Setup:
    base(f)
    return Setup(q("--method", "efrap", "--iters", "2", "--flip-weight", "nan"), message="--flip-weight")


@case("broken values")
def lr_inf(f: Path) -> Setup:
    base(f)
    return Setup(q("--method", "adaround", "--iters", "2", "--lr", "inf"), message="--lr")


@case("broken values")
def opset7_clip(f: Path) -> Setup:
    # Opset 7: Clip takes min/max as attributes. Converting or refusing are both kept
    # promises; a converted model must be valid opset 21 that onnxruntime runs.
    save(opset7_model(), f / "m.onnx")
    npz(f / "d.npz")

    def check(run: Run) -> str:
        if run.code != 0:
            return ""
        model = onnx.load(str(run.folder / "q.onnx"))
        onnx.checker.check_model(model, full_check=True)
        versions = {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")}
        if versions != {21}:
            return f"opset {versions}"
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {"input": np.zeros((2, 1, 28, 28), np.float32)})[0]
        return "" if logits.shape == (2, 10) and np.isfinite(logits).all() else "bad logits"

    return Setup(q(), expect=(0, 2), message="opset", outputs=("q.onnx",), check=check)


@case("broken values")
def scheme_symmetric_string(f: Path) -> Setup:
    base(f)
    return Setup(q("--scheme", text(f / "s.json", scheme(symmetric="false"))), message="true or false")


@case("broken values")
def scheme_bits_float(f: Path) -> Setup:
    base(f)
    return Setup(q("--scheme", text(f / "s.json", scheme(bits=8.0))), message="must be an integer")


@case("broken values")
def trigger_size_fraction(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f, size=2.7)), message="size")


@case("tracebacks")
def output_name_300_chars(f: Path) -> Setup:
    base(f)
    return Setup(q(out="q" * 295 + ".onnx"), message="longer than")


@case("tracebacks")
def scheme_nested_deeply(f: Path) -> Setup:
    base(f)
    return Setup(q("--scheme", text(f / "s.json", '{"weight": ' + "[" * 200_000 + "]" * 200_000 + "}")),
                 message="nested")


@case("tracebacks")
def scheme_bits_string(f: Path) -> Setup:
    base(f)
    return Setup(q("--scheme", text(f / "s.json", scheme(bits="8"))), message="must be an integer")


@case("tracebacks")
def scheme_weight_list(f: Path) -> Setup:
    base(f)
    return Setup(q("--scheme", text(f / "s.json", json.dumps({"weight": [], "activation": {"bits": 8}}))),
                 message="table/object")


@case("tracebacks")
def trigger_wrong_types(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f, target="0", value=[1.0, "x"])), message="target")


@case("tracebacks")
def export_no_normalization(f: Path) -> Setup:
    net = build_model("small_cnn", 1, 10, 0.25, 28)
    torch.save({"state_dict": net.state_dict(), "meta": {
        "arch": "small_cnn", "in_channels": 1, "num_classes": 10, "width": 0.25, "image_size": 28}},
        f / "c.pt")
    return Setup(["export", "c.pt", "-o", "c.onnx"], message="normalization")


@case("tracebacks")
def attack_init_not_checkpoint(f: Path) -> Setup:
    npz(f / "d.npz")
    (f / "init.pt").write_bytes(b"this is not a torch checkpoint\n" * 8)
    return Setup(["attack", "--method", "compartifact", "--data", "npz:d.npz", "--init", "init.pt",
                  "--train-limit", "64", "--epochs", "1", "--width", "0.25", "-o", "qcb.onnx"],
                 message="init.pt: not a readable torch checkpoint")


@case("tracebacks")
def npz_string_images(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    npz(f / "d.npz", x=np.full((64, 28, 28), "a"))
    return Setup(q(), message="dtype")


@case("tracebacks")
def npz_one_hot_labels(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    npz(f / "d.npz", y=np.eye(10, dtype=np.int64)[np.arange(64) % 10])
    return Setup(v(), message="one-hot")


@case("tracebacks")
def cifar_length_mismatch(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    (f / "cifar").mkdir()
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "test_batch"):
        batch = {b"batch_label": b"x", b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                 b"labels": [int(i) for i in rng.integers(0, 10, 9)]}
        (f / "cifar" / name).write_bytes(pickle.dumps(batch, protocol=4))
    return Setup(["verify", "m.onnx", "--data", "cifar10:cifar"], message="10 images but 9 labels")


@case("tracebacks")
def imagefolder_png_bomb(f: Path) -> Setup:
    # A PNG header declaring 40000 x 40000 grey pixels: 1.6 gigapixels once decoded.
    save(tiny_model(), f / "m.onnx")
    png(f / "folder" / "test" / "a" / "ok.png", 100)
    png(f / "folder" / "test" / "b" / "ok.png", 200)
    ihdr = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 0, 0, 0, 0)
    (f / "folder" / "test" / "b" / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 40_001 * 16)) + png_chunk(b"IEND", b""))
    return Setup(["verify", "m.onnx", "--data", "imagefolder:folder"], message="bomb")


@case("tracebacks")
def int64_model_input(f: Path) -> Setup:
    save(tiny_model(input_type=TensorProto.INT64), f / "m.onnx")
    npz(f / "d.npz")
    return Setup(q(), message="float32")


@case("tracebacks")
def one_dimensional_output(f: Path) -> Setup:
    save(tiny_model(reduce_output=True), f / "m.onnx")
    npz(f / "d.npz")
    return Setup(v(), message="rank 1")


@case("tracebacks")
def normalization_channels(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx", {"efrap.normalization": json.dumps(
        {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]})})
    npz(f / "d.npz")
    return Setup(v(), message="3 values for a 1-channel input")


@case("messages")
def newline_in_node_name(f: Path) -> Setup:
    # A node name holding a newline cannot forge a second line of output.
    save(tiny_model(gemm_name="fc\nefrap quantize: wrote q.onnx", computed_weight=True), f / "m.onnx")
    npz(f / "d.npz")
    return Setup(q(), message="fc\\nefrap")


@case("messages")
def report_json_no_nan(f: Path) -> Setup:
    # NaN weights make NaN logits: clean accuracy cannot be measured; the report says
    # null (not NaN, which is not JSON) and the gate that asks for it fails (exit 1).
    save(tiny_model(nan_weight=True), f / "m.onnx")
    npz(f / "d.npz")

    def check(run: Run) -> str:
        def refuse(name: str) -> None:
            raise ValueError(name)

        try:
            report = json.loads((run.folder / "r.json").read_text(), parse_constant=refuse)
        except (OSError, ValueError) as exc:
            return f"report not strict JSON ({exc})"
        if report["clean_accuracy"] is not None or report["gate"]["passed"] is not False:
            return "accuracy of NaN logits reported, or the gate passed"
        return "" if "not measurable" in run.stdout else "'not measurable' not printed"

    return Setup(v("--reference", "--json", "r.json", "--min-accuracy", "50%"), expect=(1,),
                 outputs=("r.json",), check=check)


@case("messages")
def labels_out_of_range(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    npz(f / "d.npz", y=(10 + np.arange(64) % 10).astype(np.int64))
    return Setup(v(), message="not a class of this model")


@case("more")
def trigger_target_beyond_classes(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f, target=10)), message="trigger target 10")


@case("more")
def num_calib_zero(f: Path) -> Setup:
    base(f)
    return Setup(q("--num-calib", "0"), message="--num-calib")


@case("more")
def limit_zero(f: Path) -> Setup:
    base(f)
    return Setup(v("--limit", "0"), message="--limit")


@case("more")
def seed_negative(f: Path) -> Setup:
    base(f)
    return Setup(q("--seed", "-1"), message="--seed")


@case("more")
def iters_zero(f: Path) -> Setup:
    base(f)
    return Setup(q("--method", "efrap", "--iters", "0"), message="--iters")


@case("more")
def npz_complex_images(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    npz(f / "d.npz", x=np.ones((64, 28, 28), np.complex64))
    return Setup(q(), message="complex")


@case("more")
def npz_object_images(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx")
    x = np.empty((64, 28, 28), dtype=object)
    x[...] = 1
    npz(f / "d.npz", x=x)
    return Setup(q(), message="d.npz: not a readable .npz")


@case("more")
def scheme_toml_unknown_key(f: Path) -> Setup:
    base(f)
    return Setup(q("--scheme", text(f / "s.toml", "[weight]\nbits = 8\nsymetric = true\n"
                                                  "[activation]\nbits = 8\n")), message="unknown key")


@case("more")
def trigger_pattern_escapes(f: Path) -> Setup:
    base(f)
    np.savez(f / "outside.npz", pattern=np.ones((1, 28, 28), np.float32))
    text(f / "t" / "t.json", json.dumps({"kind": "pattern", "pattern": "../outside.npz", "target": 0}))
    return Setup(v("--trigger", "t/t.json"), message="inside the trigger's folder")


@case("more")
def json_is_trigger(f: Path) -> Setup:
    base(f)
    t = trigger(f)
    return Setup(v("--trigger", t, "--json", t), message="would overwrite the input")


@case("more")
def output_is_calib_data(f: Path) -> Setup:
    base(f)
    return Setup(q(out="d.npz"), message="would overwrite the input")


@case("more")
def normalization_not_json(f: Path) -> Setup:
    save(tiny_model(), f / "m.onnx", {"efrap.normalization": "{mean: 0.5"})
    npz(f / "d.npz")
    return Setup(q(), message="not valid JSON")


@case("more")
def empty_model_file(f: Path) -> Setup:
    (f / "m.onnx").write_bytes(b"")
    npz(f / "d.npz")
    return Setup(q(), message="m.onnx: not a readable ONNX model")


@case("more")
def symlink_output_to_input(f: Path) -> Setup:
    base(f)
    (f / "link.onnx").symlink_to("m.onnx")
    return Setup(q(out="link.onnx"), message="would overwrite the input")


@case("more")
def output_inside_image_folder(f: Path) -> Setup:
    # A new file inside the data set's folder would change the data set.
    save(tiny_model(), f / "m.onnx")
    png(f / "folder" / "test" / "a" / "x.png", 100)
    png(f / "folder" / "test" / "b" / "x.png", 200)
    return Setup(["verify", "m.onnx", "--data", "imagefolder:folder", "--json", "folder/test/a/r.png"],
                 message="inside the input folder")


@case("more")
def train_seed_beyond_63_bits(f: Path) -> Setup:
    npz(f / "d.npz")
    return Setup(["train", "--data", "npz:d.npz", "--epochs", "1", "--seed", str(2**70), "-o", "c.pt"],
                 message="--seed")


@case("more")
def attack_width_too_large(f: Path) -> Setup:
    npz(f / "d.npz")
    return Setup(["attack", "--method", "compartifact", "--data", "npz:d.npz", "--width", "1e6",
                  "-o", "qcb.onnx"], message="--width")


# ----------------------------------------------------------------------------- data loss


@case("data loss")
def batch_model_in_output_folder(f: Path) -> Setup:
    # The model lies where the batch writes (and first deletes) model a's output.
    base(f)
    (f / "out" / "a").mkdir(parents=True)
    save(tiny_model(), f / "out" / "a" / "model.qdq.onnx")
    text(f / "b.toml", manifest_toml('[[model]]\nname = "a"\npath = "out/a/model.qdq.onnx"'))
    return Setup(["batch", "b.toml", "--out", "out"], message="the output folder of model 'a'")


@case("data loss")
def batch_manifest_is_results_json(f: Path) -> Setup:
    # The batch writes results.json into --out: here, over the manifest itself.
    base(f)
    text(f / "results.json", json.dumps({"defaults": MANIFEST_DEFAULTS, "model": [{"path": "m.onnx"}]}))
    return Setup(["batch", "results.json", "--out", "."], message="would overwrite the input")


@case("data loss")
def batch_lock_is_folder(f: Path) -> Setup:
    base(f)
    text(f / "b.toml", manifest_toml('[[model]]\npath = "m.onnx"'))
    (f / "out" / "batch.lock").mkdir(parents=True)
    return Setup(["batch", "b.toml", "--out", "out"], message="batch.lock is a folder")


# ----------------------------------------------------------------------------- duplicate keys


@case("duplicate keys")
def gate_config_duplicate_key(f: Path) -> Setup:
    base(f)
    text(f / "gate.json", '{"model": "m.onnx", "data": "npz:d.npz", "scheme": "w4a4", "output": "out", '
                          '"scheme": "w8a8"}')
    return Setup(["gate", "gate.json"], message="duplicate key 'scheme'")


@case("duplicate keys")
def trigger_duplicate_key(f: Path) -> Setup:
    base(f)
    text(f / "t.json", '{"size": 4, "target": 0, "target": 5}')
    return Setup(v("--trigger", "t.json"), message="duplicate key 'target'")


@case("duplicate keys")
def scheme_duplicate_key(f: Path) -> Setup:
    base(f)
    text(f / "s.json", '{"weight": {"bits": 4, "bits": 8, "symmetric": true}, "activation": {"bits": 8}}')
    return Setup(q("--scheme", "s.json"), message="duplicate key 'bits'")


# ----------------------------------------------------------------------------- numbers and caps


@case("numbers and caps")
def max_asr_digit_separator(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f), "--max-asr", "0.0_1"), message="plain decimal")


@case("numbers and caps")
def max_asr_arabic_indic_digits(f: Path) -> Setup:
    base(f)
    return Setup(v("--trigger", trigger(f), "--max-asr", "\u0660.\u0660\u0661"), message="plain decimal")


@case("numbers and caps")
def defend_iters_too_many(f: Path) -> Setup:
    base(f)
    return Setup(["defend", "m.onnx", "-o", "q.onnx", "--calib", "npz:d.npz", "--iters", str(10**12)],
                 message="--iters must be at most 1,000,000")


@case("numbers and caps")
def num_calib_too_many(f: Path) -> Setup:
    base(f)
    return Setup(q("--num-calib", str(2**62)), message="--num-calib must be at most")


@case("numbers and caps")
def batch_iters_too_many(f: Path) -> Setup:
    base(f)
    text(f / "b.toml", manifest_toml('[[model]]\npath = "m.onnx"\nmethod = "efrap"', f"iters = {10**12}"))
    return Setup(["batch", "b.toml", "--out", "out"], message="iters must be at most 1,000,000")


@case("numbers and caps")
def gate_max_targets_two(f: Path) -> Setup:
    # The scan compares at least three classes; the config is refused before any output.
    base(f)
    text(f / "gate.toml", gate_toml("[scan]\nmax_targets = 2\n"))
    return Setup(["gate", "gate.toml"], message="max_targets must be at least 3")


@case("numbers and caps")
def gate_output_symlink(f: Path) -> Setup:
    base(f)
    (f / "elsewhere").mkdir()
    (f / "gate-out").symlink_to("elsewhere")
    text(f / "gate.toml", gate_toml())
    return Setup(["gate", "gate.toml"], message="symbolic link")


@case("numbers and caps")
def attack_train_limit_no_batch(f: Path) -> Setup:
    # 2,100 of the 2,300 images less the 2,000 held out leave no batch of 128 to train on
    # (was "ValueError: Expected positive integer total_steps" from the scheduler).
    quick_attack_data(f)
    return Setup(["attack", "--method", "compartifact", "--data", "npz:big.npz", "--train-limit", "2100",
                  "--steps-per-epoch", "5", "--epochs", "1", "--pretrain-epochs", "1", "-o", "qcb.onnx"],
                 message="--train-limit 2100 leaves fewer than one batch")


# One count, one cap, wherever it is written (pipeline/base/limits.py): the command line,
# a gate config and a batch manifest refuse the same value, before any output.


@case("numbers and caps")
def gate_defend_iters_too_many(f: Path) -> Setup:
    base(f)
    text(f / "gate.toml", gate_toml(f"[defend]\niters = {10**12}\n"))
    return Setup(["gate", "gate.toml"], message="defend.iters must be at most 1,000,000")


@case("numbers and caps")
def gate_verify_limit_too_many(f: Path) -> Setup:
    base(f)
    text(f / "gate.toml", gate_toml(f"[verify]\nlimit = {2**62}\n"))
    return Setup(["gate", "gate.toml"], message="verify.limit must be at most 10,000,000")


@case("numbers and caps")
def batch_limit_too_many(f: Path) -> Setup:
    base(f)
    text(f / "b.toml", manifest_toml(f'[[model]]\npath = "m.onnx"\nlimit = {2**62}'))
    return Setup(["batch", "b.toml", "--out", "out"], message="limit must be at most 10,000,000")


@case("numbers and caps")
def scan_max_targets_two(f: Path) -> Setup:
    base(f)
    return Setup(["scan", "m.onnx", "--scheme", "w8a8", "--calib", "npz:d.npz", "--max-targets", "2"],
                 message="--max-targets must be at least 3")


@case("numbers and caps")
def scan_num_calib_four(f: Path) -> Setup:
    # The scan needs 8 calibration images (a quarter checks the triggers), as scan.num_calib.
    base(f)
    return Setup(["scan", "m.onnx", "--scheme", "w8a8", "--calib", "npz:d.npz", "--num-calib", "4"],
                 message="argument --num-calib must be at least 8")


@case("numbers and caps")
def gate_scan_num_calib_four(f: Path) -> Setup:
    base(f)
    text(f / "gate.toml", gate_toml("[scan]\nnum_calib = 4\n"))
    return Setup(["gate", "gate.toml"], message="scan.num_calib must be at least 8")


@case("numbers and caps")
def batch_num_calib_four_with_scan(f: Path) -> Setup:
    # The batch's scan calibrates on the model's num_calib images: refused when the manifest
    # is read (was: the batch ran, and the scan column said "error").
    base(f)
    text(f / "b.toml", manifest_toml('[[model]]\npath = "m.onnx"\nscan = true\nnum_calib = 4'))
    return Setup(["batch", "b.toml", "--out", "out"], message="num_calib must be at least 8 while scan is on")


# ----------------------------------------------------------------------------- hangs and memory


@case("hangs and memory")
def imagefolder_fifo(f: Path) -> Setup:
    # Opening a FIFO for reading blocks until a writer comes: run apart, with a timeout.
    save(tiny_model(), f / "m.onnx")
    png(f / "folder" / "test" / "a" / "ok.png", 100)
    png(f / "folder" / "test" / "b" / "ok.png", 200)
    os.mkfifo(f / "folder" / "test" / "b" / "x.png")
    return Setup(["verify", "m.onnx", "--data", "imagefolder:folder"], message="not a regular file",
                 process=True, timeout=120)


@case("hangs and memory")
def npz_deflate_bomb(f: Path) -> Setup:
    # A valid npz of 1.5 MB: 2,000,000 x 28 x 28 deflated zero pixels (1.5 GiB once read;
    # numpy took 1.87 GB for --limit 10). Refused from the array headers, before numpy
    # allocates anything; its own process, so that a regression cannot take the tests'.
    base(f)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (2_000_000, 28, 28)})
    labels = io.BytesIO()
    np.save(labels, (np.arange(2_000_000) % 10).astype(np.uint8))
    rows = bytes(10_000 * 28 * 28)
    with zipfile.ZipFile(f / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            for _ in range(200):
                member.write(rows)
        archive.writestr("y.npy", labels.getvalue())
    return Setup(v("--limit", "10", data="bomb.npz"), message="refusing a possible decompression bomb",
                 process=True, timeout=120)


# ----------------------------------------------------------------------------- output streams


@case("output streams")
def locale_c_non_ascii_output(f: Path) -> Setup:
    # An ASCII locale: the names arrive as undecodable bytes (surrogates) and are written
    # and printed all the same.
    save(tiny_model(), f / "modèle.onnx")
    npz(f / "dätä.npz")
    return Setup(q(model="modèle.onnx", out="qé.onnx", data="dätä.npz"), expect=(0,), outputs=("qé.onnx",),
                 env={"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""})


@case("output streams")
def locale_c_non_ascii_error(f: Path) -> Setup:
    npz(f / "dätä.npz")
    return Setup(v(model="absent_é.onnx", data="dätä.npz"), message="no such file",
                 check=lambda run: "" if "absent_" in run.stderr else "the missing file is not named",
                 env={"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""})


@case("output streams")
def stdout_dev_full(f: Path) -> Setup:
    base(f)
    return Setup(v(), message="cannot write to standard output", stdout="full")


@case("output streams")
def stdout_closed_pipe(f: Path) -> Setup:
    # As `efrap verify ... | head -c 1` once head has gone.
    base(f)
    return Setup(v(), message="cannot write to standard output", stdout="closed")


# ----------------------------------------------------------------------------- attack and export


@case("attack and export")
def attack_fp_asr_warning(f: Path) -> Setup:
    # Random labels and two steps: the backdoor answers in full precision too.
    quick_attack_data(f)

    def check(run: Run) -> str:
        if not any(line.startswith("warning: ") and "attack success" in line
                   for line in run.stderr.splitlines()):
            return "no warning about the FP attack success"
        return "" if "efrap.attack.warning" in metadata(run.folder / "qcb.onnx") else \
            "warning not recorded in the model's metadata"

    return Setup(QUICK_ATTACK, expect=(0,), outputs=("qcb.onnx", "qcb.pt", "qcb.trigger.json"), check=check)


@case("attack and export")
def export_attack_checkpoint(f: Path) -> Setup:
    quick_attack_data(f)
    code = run_quietly(QUICK_ATTACK, f)
    if code != 0:
        raise RuntimeError(f"building the attack's checkpoint failed (exit {code})")

    def check(run: Run) -> str:
        meta = metadata(run.folder / "e.onnx")
        return "" if meta.get("efrap.attack") == "compartifact" else f"metadata {sorted(meta)}"

    return Setup(["export", "qcb.pt", "-o", "e.onnx"], expect=(0,), outputs=("e.onnx",), check=check)


# ----------------------------------------------------------------------------- preprocessing


def warned(*needles: str, absent: str = "") -> Callable[[Run], str]:
    """A check: one warning line on stderr holds every needle, and no line holds `absent`."""
    def check(run: Run) -> str:
        lines = [ln for ln in run.stderr.splitlines() if ln.startswith("warning: ")]
        if not any(all(n in ln for n in needles) for ln in lines):
            return f"no warning saying {' and '.join(map(repr, needles))}"
        return f"warned {absent!r}" if absent and absent in run.stderr else ""
    return check


@case("preprocessing")
def mean_in_0_255_units_without_input_scale(f: Path) -> Setup:
    # A mean in 0-255 units on [0, 1] pixels puts every input far below zero (was accepted
    # silently). The warning is read from a real process: in the tests progress is quiet.
    save(tiny_model(channels=3), f / "m.onnx")
    npz(f / "d.npz", x=np.random.default_rng(0).integers(0, 256, (64, 28, 28, 3), dtype=np.uint8))
    return Setup(v("--mean", "104,117,123", "--std", "58,57,57"), expect=(0,),
                 check=warned("mean is in 0-255 units", "--input-scale 255"), process=True)


@case("preprocessing")
def mean_without_std(f: Path) -> Setup:
    # A mean alone is preprocessing given (was warned as "no mean and std ... given").
    base(f)
    return Setup(v("--mean", "0.5"), expect=(0,), process=True,
                 check=warned("a mean is given without a std", absent="no mean"))


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
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "special"
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
    error_line: str
    stderr_lines: int
    error_lines: int
    traceback: bool
    nothing_written: bool
    inputs_intact: bool
    problem: str
    seconds: float
    own_process: bool
    ok: bool = False


@contextlib.contextmanager
def _in_folder(folder: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def run_in_process(setup: Setup, folder: Path) -> Run:
    """Run ``efrap`` through `pipeline.cli.main.main` in this process, in `folder`."""
    out, err = io.StringIO(), io.StringIO()
    with _in_folder(folder), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = efrap_main(list(setup.argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # a bug: the traceback is what the judge looks for
            traceback.print_exc(file=err)
            code = 1
    return Run(folder, code, out.getvalue(), err.getvalue())


def run_process(setup: Setup, folder: Path) -> Run:
    """Run ``python -m pipeline.cli.main`` as its own process in `folder`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1",
           **setup.env}
    env = {k: v for k, v in env.items() if v != ""}
    limit = setup.fsize_limit

    def prepare() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with contextlib.ExitStack() as stack:
        if setup.stdout == "full":
            stdout: int | io.IOBase = stack.enter_context(open("/dev/full", "wb"))
        elif setup.stdout == "closed":
            reader, writer = os.pipe()
            os.close(reader)  # the reader is gone before anything is written
            stack.callback(os.close, writer)
            stdout = writer
        else:
            stdout = subprocess.PIPE
        try:
            proc = subprocess.run([sys.executable, "-m", "pipeline.cli.main", *setup.argv], cwd=folder,
                                  env=env, stdout=stdout, stderr=subprocess.PIPE, timeout=setup.timeout,
                                  preexec_fn=prepare if limit is not None else None, check=False)
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode("utf-8", "replace") if exc.stderr else ""
            return Run(folder, 124, "", err + f"\n(timed out after {setup.timeout:g}s)")
    return Run(folder, proc.returncode, _decode(proc.stdout), _decode(proc.stderr))


def _decode(data: bytes | None) -> str:
    return data.decode("utf-8", "replace") if data else ""


def _relative(line: str, folder: Path) -> str:
    """`line` with the case folder's path taken out (the folder is temporary)."""
    for prefix in {str(folder.resolve()), str(folder)}:
        line = line.replace(prefix + "/", "")
    return line


def judge(name: str, group: str, setup: Setup, before: dict[str, str], after: dict[str, str], run: Run,
          seconds: float, own_process: bool) -> Result:
    """Check one run against the promise (the module docstring) and the case's own checks."""
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("efrap ") and " error: " in ln]
    succeeded = run.code in setup.expect and run.code != 2
    allowed = set(setup.outputs) | set(setup.removes) if succeeded else set()
    # New files not allowed, and any new temporary file (a run must remove its own).
    written = sorted(k for k in after.keys() - before.keys()
                     if k not in allowed or k.split("/")[-1].startswith(TMP_PREFIX))
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k] and k not in allowed)
    removed = sorted(k for k in before.keys() - after.keys() if k not in allowed)
    missing = sorted(k for k in setup.outputs if k not in after) if succeeded else []
    problem = []
    if run.code not in setup.expect:
        problem.append(f"exit {run.code}, expected {'/'.join(map(str, setup.expect))}")
    if run.code == 2:
        # One error line, the last; status lines of stages that finished may precede it.
        if len(errors) != 1 or lines[-1] != errors[0]:
            problem.append(f"{len(lines)} stderr lines, {len(errors)} error lines")
        elif setup.message.lower() not in errors[0].lower():
            problem.append(f"the error line lacks {setup.message!r}")
    if "Traceback" in run.stderr:
        problem.append("traceback")
    if written:
        problem.append(f"wrote {written}")
    if missing:
        problem.append(f"did not write {missing}")
    if changed or removed:
        problem.append(f"changed {changed + removed}")
    if setup.check is not None and run.code in setup.expect:
        try:
            extra = setup.check(run)
        except Exception as exc:  # a check that cannot run is a failed check
            extra = f"{type(exc).__name__}: {exc}"
        if extra:
            problem.append(extra)
    command = "efrap " + " ".join(a if len(a) <= 24 else a[:10] + "…" + a[-8:] for a in setup.argv)
    return Result(
        case=name, group=group, command=command, expected=list(setup.expect), exit_code=run.code,
        stderr_first_line=_relative(lines[0] if lines else "", run.folder)[:300],
        error_line=_relative(errors[0] if errors else "", run.folder)[:300],
        stderr_lines=len(lines), error_lines=len(errors), traceback="Traceback" in run.stderr,
        nothing_written=not written, inputs_intact=not (changed or removed),
        problem="; ".join(problem), seconds=round(seconds, 2), own_process=own_process, ok=not problem)


def prepare(name: str, root: Path) -> tuple[str, Setup, Path, dict[str, str]]:
    """Build case `name` in a new folder under `root`.

    Returns:
        The case's group, its setup, its folder and the folder's snapshot.
    """
    group, build = CASES[name]
    folder = root / name
    folder.mkdir()
    setup = build(folder)
    return group, setup, folder, snapshot(folder)


def run_case(name: str, root: Path, in_process: bool = True) -> Result:
    """Build case `name` in a new folder under `root`, run it and judge it.

    Args:
        name: A key of `CASES`.
        root: Where the case's folder is made.
        in_process: Run in this process when the case allows it (the tests); False runs
            every case as its own process (the bench).
    """
    group, setup, folder, before = prepare(name, root)
    own = setup.own_process or not in_process
    t0 = time.perf_counter()
    run = run_process(setup, folder) if own else run_in_process(setup, folder)
    seconds = time.perf_counter() - t0
    result = judge(name, group, setup, before, snapshot(folder), run, seconds, own)
    for p in folder.rglob("*"):  # let the temporary folder go, read-only folders included
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o700)
    return result
