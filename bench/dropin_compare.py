"""One changed import: onnxruntime's quantize_static against pipeline.api.quantize_static.

Usage:
    python bench/dropin_compare.py [--corpus NAME ...] [--cache DIR] [--calib 256]
        [--images 1000] [--batch 64] [--threads 1] [--runs 30]
        [--json bench/results/dropin_compare.json]

The same call (QDQ, per-channel QInt8 weights, QInt8 activations, MinMax, the same
reader of 256 model-ready training images) goes to onnxruntime's `quantize_static` and
to this project's drop-in with its default `rounding="nearest"`, on the stored clean
model and on the TorchScript exports of the corpus models named with `--corpus` (built
by bench/corpus_models.py into its cache; a model not built there is skipped and said
so). For each output: top-1 agreement with the FP model and accuracy on held-out test
images, both run by onnxruntime at opt level `all`; how many integer weights and biases
differ between the two outputs; file size; median latency of a batch at opt level `all`
on the CPU provider, timed in interleaved rounds (bench/latency.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
from onnxruntime.quantization import quantize_static as ort_quantize_static

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.corpus_models import default_cache
from bench.latency import median_latencies
from bench.publish import write_results
from models.corpus_data import fmnist32
from pipeline.api import quantize_static
from pipeline.base.data import load_dataset, sample_indices
from pipeline.base.onnx_io import image_input
from pipeline.base.preprocess import resolve
from pipeline.base.progress import set_quiet
from pipeline.base.provenance import versions
from pipeline.base.runtime import make_session
from validators.report import pct, table

CLEAN = Path(__file__).resolve().parents[1] / "models" / "zoo" / "fmnist_small_cnn_clean.onnx"
BATCH = 32


class Reader(CalibrationDataReader):
    """The user's reader: model-ready batches, rewindable (both quantizers read it)."""

    def __init__(self, name: str, images: np.ndarray) -> None:
        self.name, self.images = name, images
        self.rewind()

    def rewind(self) -> None:
        self.starts = iter(range(0, len(self.images), BATCH))

    def get_next(self) -> dict[str, np.ndarray] | None:
        start = next(self.starts, None)
        return None if start is None else {self.name: self.images[start : start + BATCH]}


def _script(quantize: Callable[..., object], model: Path, out: Path, reader: Reader) -> float:
    """The one call both quantizers get; returns its seconds."""
    start = time.perf_counter()
    quantize(
        str(model),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return time.perf_counter() - start


def _integers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Integer weights and biases feeding each Conv/Gemm/MatMul, by node and input slot."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = {
        n.output[0]: inits[n.input[0]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    }
    return {
        f"{n.name}:{k}": dq[i]
        for n in model.graph.node
        if n.op_type in ("Conv", "Gemm", "MatMul")
        for k, i in enumerate(n.input[1:], 1)
        if i in dq
    }


def _images(model_path: Path, calib: int, held: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model-ready calibration (training split) and held-out test images, test labels."""
    model = onnx.load(str(model_path))
    if model_path == CLEAN:
        train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
        x_cal = train.take(sample_indices(len(train.labels), calib, 0))
        idx = sample_indices(len(test.labels), held, 1)
        x_test, y_test = test.take(idx), test.labels[idx]
    else:  # the corpus: Fashion-MNIST padded to 32x32, three channels
        x_cal, _ = fmnist32("train", calib, seed=0)
        x_test, y_test = fmnist32("test", held, seed=1)
    pre = resolve(model, image_input(model, str(model_path)), None, str(model_path), announce=False)
    return pre.apply(x_cal), pre.apply(x_test), y_test


def compare(name: str, model_path: Path, args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Both quantizers on one model: the figures of FP and of each output."""
    x_cal, x_test, y_test = _images(model_path, args.calib, args.images)
    reader = Reader(image_input(onnx.load(str(model_path))).name, x_cal)
    outs = {
        "onnxruntime quantize_static": work / f"{name}.ort.onnx",
        "efrap-onnx quantize_static": work / f"{name}.dropin.onnx",
    }
    seconds = {
        label: _script(fn, model_path, path, reader)
        for (label, path), fn in zip(outs.items(), (ort_quantize_static, quantize_static), strict=True)
    }
    models = {"fp32": onnx.load(str(model_path)), **{k: onnx.load(str(p)) for k, p in outs.items()}}
    files = {"fp32": model_path, **outs}
    preds = {
        k: make_session(m, "all", "cpu", threads=args.threads).run(x_test).argmax(1)
        for k, m in models.items()
    }
    x = x_test[: args.batch]
    latency = median_latencies(models, x, args.threads, args.runs, {})
    theirs_key, ours_key = outs
    theirs, ours = _integers(models[theirs_key]), _integers(models[ours_key])
    differing = sum(int((ours[k] != theirs[k]).sum()) for k in ours if k in theirs)
    rows = {
        k: {
            "agreement_with_fp": float((preds[k] == preds["fp32"]).mean()),
            "accuracy": float((preds[k] == y_test).mean()),
            "bytes": files[k].stat().st_size,
            "latency_ms": 1e3 * latency[k],
            "latency_ratio": latency[k] / latency["fp32"],
            "quantize_seconds": seconds.get(k),
        }
        for k in models
    }
    return {
        "model": name,
        "images": len(x_test),
        "calibration_images": len(x_cal),
        "agreement_between_outputs": float((preds[theirs_key] == preds[ours_key]).mean()),
        "integers": {
            "compared": sum(v.size for k, v in ours.items() if k in theirs),
            "differing": differing,
            "same_layers": sorted(ours) == sorted(theirs),
        },
        "results": rows,
    }


def main() -> None:
    """Run the comparison, print a table per model and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus",
        nargs="*",
        default=[],
        metavar="NAME",
        help="corpus models (TorchScript exports in the corpus cache) to compare too",
    )
    parser.add_argument("--cache", type=Path, default=None, help="the corpus cache (bench/corpus_models.py)")
    parser.add_argument("--calib", type=int, default=256, help="calibration images (default 256)")
    parser.add_argument("--images", type=int, default=1000, help="held-out test images (default 1000)")
    parser.add_argument("--batch", type=int, default=64, help="batch of the latency runs (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (default 1)")
    parser.add_argument("--runs", type=int, default=30, help="interleaved latency rounds (default 30)")
    parser.add_argument("--json", default="bench/results/dropin_compare.json")
    args = parser.parse_args()
    set_quiet(True)
    cache = (args.cache or default_cache()).expanduser()
    models = {"fmnist_small_cnn_clean": CLEAN}
    skipped = []
    for name in args.corpus:
        path = cache / f"{name}.torchscript.onnx"
        if path.exists():
            models[name] = path
        else:
            skipped.append(name)
            print(f"{name}: not in the corpus cache (build it with bench/corpus_models.py --only {name})")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in models.items():
            entry = compare(name, path, args, Path(tmp))
            results.append(entry)
            ints = entry["integers"]
            print(
                f"\n{name}: {entry['images']} held-out test images, {entry['calibration_images']} "
                f"calibration images; the outputs agree on {pct(entry['agreement_between_outputs'])}; "
                f"integer weights and biases differing: {ints['differing']:,} of {ints['compared']:,}"
            )
            print(
                table(
                    ["model", "agreement with FP", "accuracy", "bytes", "ms / batch", "vs FP", "quantize s"],
                    [
                        [
                            k,
                            pct(r["agreement_with_fp"]),
                            pct(r["accuracy"]),
                            f"{r['bytes']:,}",
                            f"{r['latency_ms']:.2f}",
                            f"{r['latency_ratio']:.2f}",
                            "-" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.1f}",
                        ]
                        for k, r in entry["results"].items()
                    ],
                )
            )
    print(
        f"\nopt level all, CPU provider, {args.threads} thread(s), batch {args.batch}, median of "
        f"{args.runs} interleaved rounds"
    )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "calib": args.calib,
        "images": args.images,
        "batch": args.batch,
        "threads": args.threads,
        "runs": args.runs,
        "opt_level": "all",
        "provider": "cpu",
        "call": "QDQ, per_channel=True, QInt8 weights, QInt8 activations, MinMax; "
        "efrap-onnx with rounding='nearest'",
    }
    write_results({"settings": settings, "models": results, "skipped": skipped, "versions": versions()}, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
