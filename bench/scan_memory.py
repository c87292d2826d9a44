"""Peak memory and wall time of `efrap scan` on a MobileNet-style model at 224 x 224, against its budget.

Builds a MobileNetV3-Small (10 classes, random weights with BatchNorm statistics drawn at
random, BN folded at export, ImageNet normalization recorded) and synthetic 224 x 224 RGB
images (smooth random fields, uint8 in an npz: calibration and held-out images) in a cache
folder, then runs `efrap scan` as a child process for each budget and reads the child's
peak resident memory (VmHWM) and wall time. The goals (docs/SCAN.md): peak within 2 GB,
wall time within the budget plus the start-up before the budget's clock (loading the
model and reading the data).

Usage: python bench/scan_memory.py [--cache DIR] [--threads N] [--budgets S ...] [--holdout N]
Prints a table and writes bench/results/scan_memory.json.
"""

from __future__ import annotations

import argparse
import json
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
from pipeline.base.provenance import versions
from validators.report import table

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
#: The goal: the scan's peak resident memory on a 224 x 224 model.
PEAK_GOAL_MIB = 2048


def build(cache: Path, images: int) -> tuple[Path, Path]:
    """The model and the image npz in `cache` (made once)."""
    cache.mkdir(parents=True, exist_ok=True)
    model_path, data_path = cache / "mobilenet_v3_small_224.onnx", cache / f"images_224_{images}.npz"
    if not model_path.exists():
        torch.manual_seed(0)
        model = build_model("mobilenet_v3_small", 3, 10, 1.0, 224).eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
        export_onnx(model, (3, 224, 224), str(model_path), normalization=IMAGENET)
    if not data_path.exists():
        rng = np.random.default_rng(0)
        parts = []
        for start in range(0, images, 256):  # in parts: the float fields of all images at once are GBs
            n = min(256, images - start)
            coarse = torch.from_numpy(rng.random((n, 3, 8, 8)).astype(np.float32))
            smooth = torch.nn.functional.interpolate(coarse, size=(224, 224), mode="bicubic",
                                                     align_corners=False).numpy()
            noise = rng.normal(0.0, 0.05, smooth.shape).astype(np.float32)
            parts.append(np.clip((smooth + noise) * 255, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
        np.savez(data_path, x=np.concatenate(parts), y=np.arange(images) % 10)
    return model_path, data_path


def main() -> None:
    """Build, measure, print and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.environ.get("EFRAP_BENCH_CACHE",
                                                          str(Path.home() / ".cache/efrap-onnx/scan-memory")))
    parser.add_argument("--threads", type=int, default=1, help="torch/onnxruntime threads of the child")
    parser.add_argument("--budgets", type=float, nargs="+", default=[300.0])
    parser.add_argument("--num-calib", type=int, default=1024)
    parser.add_argument("--holdout", type=int, default=256)
    parser.add_argument("--json", default=str(ROOT / "bench/results/scan_memory.json"))
    args = parser.parse_args()
    cache = Path(args.cache)
    model, data = build(cache, args.num_calib + args.holdout)
    runs = {}
    for budget in args.budgets:
        report = cache / f"scan_{budget:g}.json"
        argv = ["-m", "pipeline.cli.main", "scan", str(model), "--scheme", "w8a8", "--calib", f"npz:{data}",
                "--num-calib", str(args.num_calib), "--holdout", str(args.holdout), "--budget", f"{budget:g}",
                "--json", str(report)]
        run = run_child(argv, cache / f"scan_{budget:g}.log", args.threads).to_json()
        verdict = json.loads(report.read_text())["verdict"] if report.exists() else None
        runs[f"{budget:g}"] = {**run, "budget": budget, "verdict": verdict}
    rows = [[f"{r['budget']:g}", r["exit"], f"{r['seconds']:.0f}", f"{r['peak_mib']:,}",
             "yes" if r["peak_mib"] <= PEAK_GOAL_MIB else "NO",
             (r["verdict"] or {}).get("verdict", "-") if isinstance(r["verdict"], dict) else r["verdict"]]
            for r in runs.values()]
    print(f"efrap scan, MobileNetV3-Small at 224x224 (10 classes), {args.num_calib} calibration and "
          f"{args.holdout} held-out images, {args.threads} threads")
    headers = ["budget s", "exit", "wall s", "peak resident MiB", f"<= {PEAK_GOAL_MIB} MiB", "verdict"]
    print(table(headers, rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results({"model": "mobilenet_v3_small 224x224, 10 classes, random weights", "threads": args.threads,
                   "num_calib": args.num_calib, "holdout": args.holdout, "peak_goal_mib": PEAK_GOAL_MIB,
                   "runs": runs, "versions": versions()}, out)


if __name__ == "__main__":
    main()
