"""Peak memory of quantization on a ResNet-50-size model at 224 x 224 with 1,024 images.

Builds a ResNet-50 (25.6 M parameters, random weights with BatchNorm statistics
drawn at random, BN folded at export) and 1,024 synthetic 224 x 224 RGB images
(smooth random fields, stored as uint8 in an npz) in a cache folder, then runs
`efrap quantize` as a child process for each step and reads the child's peak
resident memory (ru_maxrss) and wall time:

- nearest W8A8 over every layer;
- EFRAP (w4a8) with a few iterations on the first layers only (`--exclude` keeps the
  rest in float): those layers have the largest activations (64 x 112 x 112 and
  256 x 56 x 56 per image), so their layer caches are the largest any layer has;
  memory, not rounding quality, is what this measures.

Usage: python bench/memory.py [--cache DIR] [--threads N] [--efrap-layers K]
Prints a table and writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.child import run_child
from bench.publish import write_results
from converters.export import export_onnx
from models.architectures import build_model
from pipeline.base.onnx_io import load_model
from pipeline.base.provenance import versions
from pipeline.graph import analyze
from pipeline.prepare import prepare_model
from validators.report import table

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def build(cache: Path) -> tuple[Path, Path]:
    """The model and the calibration npz in `cache` (made once)."""
    cache.mkdir(parents=True, exist_ok=True)
    model_path, data_path = cache / "resnet50_224.onnx", cache / "images_224.npz"
    if not model_path.exists():
        torch.manual_seed(0)
        model = build_model("resnet50", 3, 1000, 1.0, 224).eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
        export_onnx(model, (3, 224, 224), str(model_path), normalization=IMAGENET)
    if not data_path.exists():
        rng = np.random.default_rng(0)
        coarse = rng.random((1024, 8, 8, 3)).astype(np.float32)
        images = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(0, 3, 1, 2),
                                                 size=(224, 224), mode="bicubic", align_corners=False)
        noise = rng.normal(0.0, 0.05, images.shape).astype(np.float32)
        pixels = np.clip((images.numpy() + noise) * 255, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        np.savez(data_path, x=pixels, y=np.arange(1024) % 1000)
    return model_path, data_path


def main() -> None:
    """Build, measure, print and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.environ.get("EFRAP_BENCH_CACHE",
                                                          str(Path.home() / ".cache/efrap-onnx/memory")))
    parser.add_argument("--threads", type=int, default=2, help="torch/onnxruntime threads of the child")
    parser.add_argument("--efrap-layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=str(ROOT / "bench/results/memory.json"))
    args = parser.parse_args()
    cache = Path(args.cache)
    model, data = build(cache)
    layers = [layer.node for layer in analyze(prepare_model(load_model(model))).layers]
    common = [str(model), "--calib", f"npz:{data}", "--num-calib", "1024"]
    steps = {
        "nearest w8a8 (all layers)": [*common, "--scheme", "w8a8", "-o", str(cache / "q_nearest.onnx")],
        f"efrap w4a8 ({args.efrap_layers} first layers, {args.iters} iterations)": [
            *common, "--scheme", "w4a8", "--method", "efrap", "--iters", str(args.iters),
            "--exclude", ",".join(layers[args.efrap_layers:]), "-o", str(cache / "q_efrap.onnx")],
    }
    results = {name: run_child(["-m", "pipeline.cli.main", "quantize", *argv], cache / f"step{i}.log",
                               args.threads).to_json()
               for i, (name, argv) in enumerate(steps.items())}
    size = model.stat().st_size / 2**20
    rows = [[name, r["exit"], f"{r['seconds']:.0f}", f"{r['peak_mib']:,}"] for name, r in results.items()]
    print(f"ResNet-50 at 224x224 ({size:.0f} MiB ONNX, {len(layers)} layers), 1,024 calibration images, "
          f"{args.threads} threads")
    print(table(["step", "exit", "seconds", "peak resident MiB"], rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results({"model": "resnet50 224x224", "onnx_mib": round(size, 1), "layers": len(layers),
                   "images": 1024, "threads": args.threads, "steps": results, "versions": versions()}, out)


if __name__ == "__main__":
    main()
