"""CPU time of learned rounding per layer: the composed output fake-quantizer against the fused one.

Usage: python bench/layer_speed.py [--model FP.onnx] [--scheme w4a4] [--iters 10000]
           [--threads 1] [--rounds 1] [--json bench/results/layer_speed.json]

Learned rounding is the cost of `efrap defend`: every step runs the layer, its output
quantizer and the reconstruction loss forward and backward. A profile of one run on
the stored default model (cProfile, one thread) put the autograd backward first, then
the convolutions, then the elementwise ops of the output fake-quantizer (divide,
round, add, clamp, subtract, multiply, each a full-size temporary, each with its own
backward). `pipeline.qmath.fake_quant` now runs them as one autograd function with the
same values and the same gradient, bit for bit (the defended model's bytes are
unchanged; tests/test_qmath.py checks both).

This script runs EFRAP (the default preset) on every layer of the model twice per
round, once with the composed fake-quantizer ("before") and once with the fused one
("after"), in interleaved rounds so that a busy moment of the machine falls on both,
with the given torch thread count, and prints each layer's seconds (its onnxruntime
sampling included), per-iteration milliseconds and the speed-up. Both runs must write
the same model bytes, or the script fails.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.qmath as qmath
from bench.publish import write_results
from models.zoo import default_entry, zoo_path
from pipeline.base.deployment import Deployment
from pipeline.base.progress import set_quiet
from pipeline.base.provenance import versions
from pipeline.base.scheme import load_scheme
from pipeline.quantize import QuantizeOptions, quantize_file
from pipeline.rounding.efrap import EFRAP_DEFAULT
from validators.report import table

ROOT = Path(__file__).resolve().parents[1]
FUSED = qmath.fake_quant
VARIANTS = {"before (composed)": qmath.fake_quant_composed, "after (fused)": FUSED}


def run_once(model: str, scheme: str, iters: int, out: Path) -> tuple[dict[str, float], float, str]:
    """Per-layer seconds, total seconds and the output's sha256 of one EFRAP run."""
    options = QuantizeOptions(Deployment(scheme=load_scheme(scheme)), method="efrap",
                              rounding=replace(EFRAP_DEFAULT, iters=iters))
    start = time.perf_counter()
    summary, _ = quantize_file(model, str(out), options)
    total = time.perf_counter() - start
    return ({layer.layer: layer.seconds for layer in summary.layers}, total,
            hashlib.sha256(out.read_bytes()).hexdigest())


def main() -> None:
    """Measure both variants, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(zoo_path(default_entry())))
    parser.add_argument("--scheme", default="w4a4")
    parser.add_argument("--iters", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", default=str(ROOT / "bench/results/layer_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    seconds: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
    totals: dict[str, list[float]] = {v: [] for v in VARIANTS}
    digests = set()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, impl in VARIANTS.items():
                qmath.fake_quant = impl  # the module global every caller goes through
                try:
                    layers, total, digest = run_once(args.model, args.scheme, args.iters,
                                                     Path(tmp) / f"{r}.onnx")
                finally:
                    qmath.fake_quant = FUSED
                digests.add(digest)
                totals[name].append(total)
                for layer, s in layers.items():
                    seconds[name].setdefault(layer, []).append(s)
                print(f"layer_speed: round {r + 1}/{args.rounds} {name}: {total:.1f}s", flush=True)
    if len(digests) != 1:
        raise SystemExit("layer_speed: the two fake-quantizers wrote different models")
    before, after = VARIANTS
    rows, results = [], []
    for layer in seconds[before]:
        b, a = statistics.median(seconds[before][layer]), statistics.median(seconds[after][layer])
        results.append({"layer": layer, "before_s": round(b, 2), "after_s": round(a, 2),
                        "before_ms_per_iter": round(1000 * b / args.iters, 3),
                        "after_ms_per_iter": round(1000 * a / args.iters, 3), "speedup": round(b / a, 3)})
        rows.append([layer, f"{b:.1f}", f"{a:.1f}", f"{1000 * b / args.iters:.2f}",
                     f"{1000 * a / args.iters:.2f}", f"{b / a:.2f}x"])
    tb, ta = statistics.median(totals[before]), statistics.median(totals[after])
    rows.append(["whole run", f"{tb:.1f}", f"{ta:.1f}", "", "", f"{tb / ta:.2f}x"])
    print(table(["layer", "before s", "after s", "before ms/iter", "after ms/iter", "speed-up"], rows))
    print(f"EFRAP default preset, {args.iters:,} iterations per layer, {args.threads} torch thread(s), "
          f"median of {args.rounds} interleaved round(s); same output bytes: {digests.pop()[:16]}")
    write_results({
        "model": Path(args.model).name, "scheme": args.scheme, "iters": args.iters,
        "threads": args.threads, "rounds": args.rounds, "layers": results,
        "total_before_s": round(tb, 2), "total_after_s": round(ta, 2), "versions": versions(),
    }, args.json)


if __name__ == "__main__":
    main()
