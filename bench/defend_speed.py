"""Wall time of `efrap defend` on the models users bring, under the default and the fast form.

Usage: python bench/defend_speed.py [--only NAME ...] [--presets default fast]
           [--default-iters A B] [--threads 2] [--timeout 3600] [--cache DIR]
           [--json bench/results/defend_speed.json]

Subjects (built into the cache once; timing does not depend on what the weights learned,
so the CIFAR-style and ImageNet-style networks get only their BatchNorm statistics from
forward passes over the calibration images):

- ``demo``: the stored zoo model `efrap demo` defends (fmnist_compartifact_w4a4, w4a4);
- ``resnet18_32``: ResNet-18 on 3 x 32 x 32 (Fashion-MNIST padded, three channels), w4a4;
- ``mobilenet_v2_224`` and ``resnet50_224``: on 3 x 224 x 224 (Fashion-MNIST scaled 8x), w4a8;
- ``rapidocr_cls``: rapidocr's text-direction classifier on rendered text lines, w4a8
  (bench/corpus_models.py fetches its wheel with ``pip download`` once).

Each run is one `efrap defend MODEL --num-calib 1024 --preset P` child process (torch and
onnxruntime at --threads), timed end to end (calibration, rounding and the held-out check)
with its peak resident memory. The fast form runs in full. The default's 10,000 steps per
layer take hours on these models, so it runs at two small step counts A and B
(--default-iters) and each layer's time is fitted as a + b * steps, then read at 10,000:
an extrapolation, marked as such. Per layer the script also gives the multiply-adds of one
step (forward and backward to the weights: 4 flops per multiply-add, as the issue counted
them) and the GFLOP/s that reached over the layer's whole time (sampling included, so a
floor on the loop's rate), against this CPU's measured matmul peak at the same threads.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper, shape_inference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.child import run_child
from bench.corpus_models import rapidocr_models
from bench.publish import write_results
from converters.export import export_onnx
from models.architectures import build_model
from models.corpus_data import FMNIST32_MEAN, FMNIST32_STD, fmnist32, text_lines
from models.zoo import load_manifest, zoo_path
from pipeline.base.data import load_dataset, sample_indices
from pipeline.base.provenance import versions
from pipeline.rounding.efrap import EFRAP_PRESETS
from validators.report import table

ROOT = Path(__file__).resolve().parents[1]
FULL_STEPS = EFRAP_PRESETS["default"].iters
NUM_CALIB = 1024
#: The rapidocr models' preprocessing as options (bench/coverage.py PADDLE).
PADDLE = ["--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--channel-order", "bgr"]
SUBJECTS = ("demo", "resnet18_32", "mobilenet_v2_224", "resnet50_224", "rapidocr_cls")


def default_cache() -> Path:
    """~/.cache/efrap-onnx/defend_speed."""
    return Path.home() / ".cache/efrap-onnx/defend_speed"


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    if not path.exists():
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, x=x, y=y)
        tmp.replace(path)
    return path


def _built(cache: Path, name: str, arch: str, size: int, images: np.ndarray) -> Path:
    """A network of `arch` at `size`, BatchNorm statistics set on `images` (normalised), as ONNX."""
    path = cache / f"{name}.onnx"
    if path.exists():
        return path
    torch.manual_seed(0)
    model = build_model(arch, 3, 10, 1.0, size)
    model.train()
    x = (images.astype(np.float32) / 255.0 - FMNIST32_MEAN[0]) / FMNIST32_STD[0]
    with torch.no_grad():
        for i in range(0, len(x), 32):
            model(torch.from_numpy(x[i : i + 32]))
    tmp = cache / f"{name}.part.onnx"
    export_onnx(model.eval(), (3, size, size), str(tmp), normalization=(FMNIST32_MEAN, FMNIST32_STD))
    tmp.replace(path)
    return path


def subject(name: str, cache: Path) -> tuple[Path, str, str, list[str]]:
    """(model, calibration data spec, scheme, extra options) of one subject."""
    if name == "demo":
        entry = next(e for e in load_manifest() if e.name == "fmnist_compartifact_w4a4")
        return zoo_path(entry), "fashion-mnist", "w4a4", []
    if name == "resnet18_32":
        x, y = fmnist32("train", NUM_CALIB, seed=0)
        u8 = np.rint(x * 255).astype(np.uint8)
        data = _npz(cache / "fmnist32_calib.npz", u8, y)
        return _built(cache, name, "resnet18", 32, u8), f"npz:{data}", "w4a4", []
    if name in ("mobilenet_v2_224", "resnet50_224"):
        train = load_dataset("fashion-mnist", "train")
        idx = sample_indices(len(train.labels), NUM_CALIB, 0)
        # 28 x 8 = 224: each pixel becomes an 8 x 8 block, three channels alike.
        u8 = train.images[idx].repeat(8, axis=2).repeat(8, axis=3).repeat(3, axis=1)
        data = _npz(cache / "fmnist224_calib.npz", u8, train.labels[idx])
        arch = "mobilenet_v2" if name.startswith("mobilenet") else "resnet50"
        return _built(cache, name, arch, 224, u8), f"npz:{data}", "w4a8", []
    if name == "rapidocr_cls":
        lines, labels = text_lines(NUM_CALIB, seed=21)
        data = _npz(cache / "lines_calib.npz", lines, labels)
        return rapidocr_models(cache)["rapidocr_cls"], f"npz:{data}", "w4a8", PADDLE
    raise SystemExit(f"defend_speed.py: unknown subject '{name}': choose from {', '.join(SUBJECTS)}")


def layer_macs(path: Path) -> dict[str, dict[str, float]]:
    """Per learned layer: multiply-adds per image and the weight's size (batch fixed to 1)."""
    model = onnx.load(str(path))
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    weights = {t.name: numpy_helper.to_array(t).size for t in model.graph.initializer}
    out: dict[str, dict[str, float]] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        size = weights.get(node.input[1])
        shape = shapes.get(node.output[0])
        if size is None or not shape:
            continue
        if node.op_type == "Conv":
            per_image = size * math.prod(shape[2:])
        else:
            per_image = size * math.prod(shape[1:-1]) if len(shape) > 2 else size
        out[node.name] = {"macs_per_image": float(per_image), "weights": float(size)}
    return out


def cpu_peak(threads: int) -> float:
    """GFLOP/s of a float32 2048 x 2048 matmul at `threads` (best of 5)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best / 1e9


def run(name: str, cache: Path, preset: str, iters: int | None, threads: int, timeout: float) -> dict:
    """One `efrap defend` of a subject; its wall time, peak memory and per-layer figures."""
    model, calib, scheme, extra = subject(name, cache)
    tag = f"{name}.{preset}" + (f".{iters}" if iters else "")
    out, summary = cache / "runs" / f"{tag}.onnx", cache / "runs" / f"{tag}.summary.json"
    out.parent.mkdir(exist_ok=True)
    for stale in (out, summary):
        stale.unlink(missing_ok=True)
    argv = ["-m", "pipeline.cli.main", "defend", str(model), "--calib", calib, "--num-calib",
            str(NUM_CALIB), "--scheme", scheme, "--preset", preset, "--device", "cpu",
            "--threads", str(threads), "--summary", str(summary), "-o", str(out), *extra]
    if iters:
        argv += ["--iters", str(iters)]
    print(f"defend_speed: {tag}: efrap {' '.join(argv[2:])}", flush=True)
    child = run_child(argv, cache / "runs" / f"{tag}.log", threads, timeout)
    row: dict = {"subject": name, "preset": preset, "iters": iters, "threads": threads,
                 **child.to_json(), "scheme": scheme}
    if child.exit not in (0, 1) or not summary.exists():  # 1: the held-out check failed
        return row
    data = json.loads(summary.read_text())
    macs = layer_macs(model)
    rounding = data.get("rounding", {})
    batch = int(rounding.get("batch_size", 32))
    layers = []
    for layer in data["layers"]:
        m = macs.get(layer["layer"], {})
        steps = layer.get("steps", rounding.get("iters", 0))
        rows_mode = rounding.get("samples") == "positions" and layer["op"] == "Conv" and \
            m.get("macs_per_image", 0) != m.get("weights", 0)
        per_step = 4 * batch * (m.get("weights", 0.0) if rows_mode else m.get("macs_per_image", 0.0))
        layers.append({"layer": layer["layer"], "seconds": layer["seconds"], "steps": steps,
                       "gflop_per_step": per_step / 1e9,
                       "gflops": per_step * steps / layer["seconds"] / 1e9 if layer["seconds"] else None})
    row.update({"calibration_seconds": data["calibration_seconds"],
                "rounding_seconds": data["rounding_seconds"], "layers": layers})
    return row


def extrapolate(a: dict, b: dict) -> dict:
    """The default at FULL_STEPS from its runs at two step counts: per layer a + b * steps."""
    total = a["seconds"] - a["rounding_seconds"]  # everything outside the layers
    layers = []
    for la, lb in zip(a["layers"], b["layers"], strict=True):
        slope = (lb["seconds"] - la["seconds"]) / max(lb["steps"] - la["steps"], 1)
        seconds = la["seconds"] + slope * (FULL_STEPS - la["steps"])
        total += seconds
        layers.append({"layer": la["layer"], "seconds": seconds, "steps": FULL_STEPS,
                       "gflop_per_step": la["gflop_per_step"], "per_step_seconds": slope,
                       "gflops": la["gflop_per_step"] / slope if slope > 0 else None})
    return {"subject": a["subject"], "preset": "default", "iters": FULL_STEPS, "threads": a["threads"],
            "seconds": total, "peak_mib": max(a["peak_mib"], b["peak_mib"]), "extrapolated_from":
            [a["iters"], b["iters"]], "layers": layers, "exit": 0, "scheme": a["scheme"]}


def main() -> None:
    """Run the subjects, print the goals table and per-layer rates, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(SUBJECTS))
    parser.add_argument("--presets", nargs="+", default=["default", "fast"], choices=tuple(EFRAP_PRESETS))
    parser.add_argument("--default-iters", nargs=2, type=int, default=[20, 120], metavar=("A", "B"),
                        help="step counts the default runs at, to extrapolate to 10,000 (0 0: full)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/defend_speed.json")
    args = parser.parse_args()
    cache = args.cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    peak = cpu_peak(args.threads)
    rows, summary = [], []
    for name in args.only:
        for preset in args.presets:
            if preset == "default" and all(args.default_iters):
                low, high = (run(name, cache, preset, n, args.threads, args.timeout)
                             for n in args.default_iters)
                rows += [low, high]
                result = extrapolate(low, high) if "layers" in low and "layers" in high else high
            else:
                result = run(name, cache, preset, None, args.threads, args.timeout)
                rows.append(result)
            summary.append(result)
    body = [[r["subject"], r["preset"], f"{r['seconds']:.0f}" + (" (extrapolated)" if "extrapolated_from" in r
                                                              else ""),
             r["peak_mib"], r["exit"],
             f"{max((x['gflops'] or 0) for x in r.get('layers', [{'gflops': 0}])):.1f}"] for r in summary]
    print(table(["subject", "preset", "seconds end to end", "peak MiB", "exit", "best layer GFLOP/s"], body))
    print(f"{args.threads} threads for torch and onnxruntime; CPU matmul peak at {args.threads} threads: "
          f"{peak:.1f} GFLOP/s")
    write_results({
        "command": "python bench/defend_speed.py " + " ".join(sys.argv[1:]), "threads": args.threads,
        "cpu_peak_gflops": peak, "num_calib": NUM_CALIB, "full_steps": FULL_STEPS, "summary": summary,
        "runs": rows, "versions": versions()}, args.json)


if __name__ == "__main__":
    main()
