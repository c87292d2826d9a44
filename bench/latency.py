"""onnxruntime CPU latency of the FP32 model against its QDQ models, and file sizes.

Usage: python bench/latency.py [--model FP.onnx] [--batch 64] [--threads 2] [--runs 50]
           [--json bench/results/latency.json]

Quantizes the model with nearest W8A8 (int8 containers), W8A8 with the first layer kept
in float (`--exclude`: a conv with one input channel gains nothing from integer
kernels), and W4A4 (int8 containers and packed int4); loads each at optimization level
`all` (what a deployment gets) and prints the median latency of a batch, the ratio to
FP32, and the file sizes. The variants are timed in interleaved rounds, so a busy
moment of the machine falls on all of them alike.

One more row runs the first-layer-float file with onnxruntime's QDQ propagation turned
off (a session setting, `optimization.disable_specified_optimizers`): that pass moves the
QuantizeLinear after the float region's MaxPool back in front of it, so the pooling runs
on uint8 in NCHW, which onnxruntime's CPU provider has no fast kernel for.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.publish import write_results
from models.zoo import default_entry, zoo_path
from pipeline.base.deployment import Deployment
from pipeline.base.onnx_io import load_model
from pipeline.base.progress import set_quiet
from pipeline.base.provenance import versions
from pipeline.base.runtime import make_session
from pipeline.base.scheme import PRESETS
from pipeline.graph import analyze
from pipeline.prepare import prepare_model
from pipeline.quantize import QuantizeOptions, calibration_images, quantize_model
from validators.report import table

NO_PROPAGATION = {"optimization.disable_specified_optimizers": "QDQPropagationTransformer"}
FLOAT_FIRST = "w8a8, first layer float"
FLOAT_FIRST_NO_PROP = "w8a8, first layer float, QDQ propagation off"


def median_latencies(models: dict[str, onnx.ModelProto], x: np.ndarray, threads: int,
                     runs: int, configs: dict[str, dict[str, str]]) -> dict[str, float]:
    """Median seconds per batch of each model at opt level all, timed in interleaved rounds."""
    sessions = {name: make_session(m, "all", "cpu", threads=threads, config=configs.get(name))
                for name, m in models.items()}
    for sess in sessions.values():
        for _ in range(5):
            sess.session.run(None, {sess.input_name: x})
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, sess in sessions.items():
            t = time.perf_counter()
            sess.session.run(None, {sess.input_name: x})
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="FP ONNX (default: the zoo's demo model)")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--json", default="bench/results/latency.json")
    args = parser.parse_args()
    set_quiet(True)
    path = args.model or os.path.relpath(zoo_path(default_entry()))
    fp = load_model(path)
    images, _ = calibration_images(fp, args.data, 1024, 0, path)
    x = images[: args.batch]
    first = analyze(prepare_model(fp)).layers[0].node
    variants = {"fp32": fp}
    for name, scheme, storage, exclude in (
            ("w8a8", "w8a8", "int8", ()), (FLOAT_FIRST, "w8a8", "int8", (first,)),
            ("w4a4 int8-containers", "w4a4", "int8", ()), ("w4a4 packed-int4", "w4a4", "int4", ())):
        variants[name], _, _ = quantize_model(
            fp, images, QuantizeOptions(Deployment(scheme=PRESETS[scheme]), weight_storage=storage,
                                        exclude=exclude))
    variants[FLOAT_FIRST_NO_PROP] = variants[FLOAT_FIRST]
    latencies = median_latencies(variants, np.asarray(x), args.threads, args.runs,
                                 {FLOAT_FIRST_NO_PROP: NO_PROPAGATION})
    rows, results = [], {}
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in variants.items():
            file = Path(tmp) / "m.onnx"
            onnx.save(model, str(file))
            size = file.stat().st_size
            lat = latencies[name]
            base = base or (lat, size)
            results[name] = {"latency_ms": lat * 1e3, "latency_ratio": lat / base[0],
                             "bytes": size, "size_ratio": size / base[1]}
            rows.append([name, f"{lat * 1e3:.2f}", f"{lat / base[0]:.2f}", size, f"{size / base[1]:.3f}"])
    print(f"model {path}, batch {args.batch}, {args.threads} threads, opt level all, CPU provider, "
          f"median of {args.runs} interleaved rounds; first layer {first}")
    print(table(["variant", "median ms", "ratio", "bytes", "size ratio"], rows))
    write_results({"model": path, "batch": args.batch, "threads": args.threads,
                   "runs": args.runs, "opt_level": "all", "provider": "cpu",
                   "session_config": {FLOAT_FIRST_NO_PROP: NO_PROPAGATION},
                   "results": results, "versions": versions()}, args.json)


if __name__ == "__main__":
    main()
