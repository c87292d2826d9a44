"""Wall time of EFRAP on ResNet-18 (CIFAR-style), per layer, on the GPU when there is one.

Usage: python bench/efrap_gpu.py [--arch resnet18] [--preset release|default|fast] [--iters N]
           [--num-calib 1024] [--scheme w4a4] [--device auto] [--threads N]
           [--json bench/results/efrap_gpu.json]

--preset picks EFRAP's settings (`efrap defend --preset`; default: release, the release's
10,000 iterations per layer); --iters overrides its iterations.

The model is a ResNet-18 for 3x32x32 inputs whose BatchNorm statistics are set by a
few forward passes over the calibration images; the images are real Fashion-MNIST
training images padded to 32x32 and repeated over three channels (no CIFAR-10 can be
downloaded here). Timing does not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.publish import write_results
from converters.export import export_onnx
from models.architectures import build_model
from pipeline.base.data import load_dataset, sample_indices
from pipeline.base.deployment import Deployment
from pipeline.base.provenance import versions
from pipeline.base.scheme import load_scheme
from pipeline.quantize import QuantizeOptions, quantize_model
from pipeline.rounding.efrap import EFRAP_PRESETS
from validators.report import table


def main() -> None:
    """Build the model, run EFRAP, print per-layer times and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--preset", default="release", choices=tuple(EFRAP_PRESETS))
    parser.add_argument("--iters", type=int, default=None, help="default: the preset's")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--num-calib", type=int, default=1024)
    parser.add_argument("--scheme", default="w4a4")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", default="bench/results/efrap_gpu.json")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = EFRAP_PRESETS[args.preset]
    if args.iters is not None:
        config = replace(config, iters=args.iters)
    train = load_dataset("fashion-mnist", "train")
    idx = sample_indices(len(train.labels), args.num_calib, 0)
    x = np.pad(train.images[idx], ((0, 0), (0, 0), (2, 2), (2, 2))).repeat(3, axis=1)
    mean, std = [0.286] * 3, [0.353] * 3
    images = ((x - 0.286) / 0.353).astype(np.float32)
    torch.manual_seed(0)
    model = build_model(args.arch, 3, 10, 1.0, 32)
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), 128):
            model(torch.from_numpy(images[i : i + 128]))
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model.onnx")
        export_onnx(model.eval(), (3, 32, 32), path, normalization=(mean, std))
        fp = onnx.load(path)
    options = QuantizeOptions(Deployment(scheme=load_scheme(args.scheme), num_calib=args.num_calib),
                              method="efrap", device=args.device, rounding=config)
    t0 = time.perf_counter()
    _, _, summary = quantize_model(fp, images, options)
    wall = time.perf_counter() - t0
    rows = [[layer.layer, layer.bits, f"{layer.seconds:.1f}", int(layer.stats.get("steps", config.iters)),
             f"{100 * layer.flip_fraction:.2f}%"] for layer in summary.layers]
    print(table(["layer", "bits", "seconds", "steps", "flipped"], rows))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"{args.arch}, preset {args.preset}, {config.iters} iterations/layer, {args.num_calib} images, "
          f"{args.scheme}, {torch.get_num_threads()} torch threads: "
          f"calibration {summary.calibration_seconds:.1f}s, rounding {summary.rounding_seconds:.1f}s, "
          f"{wall:.1f}s end to end on {summary.device} ({gpu})")
    write_results({"arch": args.arch, "preset": args.preset, "iters": config.iters,
                   "threads": torch.get_num_threads(), "num_calib": args.num_calib,
                   "scheme": args.scheme, "device": summary.device, "gpu": gpu,
                   "wall_seconds": wall, "layers": summary.to_json()["layers"],
                   "versions": versions()}, args.json)


if __name__ == "__main__":
    main()
