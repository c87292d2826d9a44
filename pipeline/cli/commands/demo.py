"""`efrap demo`: the whole story on the stored default model and Fashion-MNIST."""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from models.zoo import default_entry, trigger_path, zoo_path
from pipeline.base.data import spec_files
from pipeline.base.deployment import Deployment
from pipeline.base.progress import log
from pipeline.base.safe_io import check_output_folder, check_outputs
from pipeline.base.scheme import PRESETS
from pipeline.cli.args import positive_int, seed_number
from pipeline.quantize import GuardOptions, QuantizeOptions, quantize_file
from pipeline.rounding import get_method
from validators.report import pct, table
from validators.verify import VerifyOptions, verify_model

# Iterations per layer for the demo's EFRAP run: the default defense's (and the release's)
# 10,000. On the stored default model (a small CNN) the whole demo takes about two minutes
# on a 2-core CPU.
DEMO_ITERS = 10_000


def run(args: argparse.Namespace) -> int:
    """Verify FP, quantize with nearest rounding (and EFRAP for a QCB model), compare."""
    start = time.perf_counter()
    entry = default_entry()
    model = str(zoo_path(entry))
    trigger = str(trigger_path(entry)) if entry.kind == "qcb" else None
    log(f"demo: model {entry.name} ({entry.kind}, {entry.architecture}), data {args.data}, "
        f"seed {args.seed}")
    verify = VerifyOptions(Deployment(data=args.data, opt_level="faithful"), trigger=trigger)
    rows = []

    def add(label: str, path: str) -> None:
        report = verify_model(path, verify)
        row = [label, pct(report.clean_accuracy), pct(report.attack_success_rate)]
        rows.append(row)
        # Each row as soon as it exists, flushed: a pipe or a CI log sees it now, not at the end.
        print(f"demo: {label}: clean accuracy {row[1]}, attack success {row[2]}", flush=True)

    add("full precision", model)
    runs = [(f"nearest {scheme}", scheme, "nearest", None) for scheme in ("w8a8", "w4a4")]
    if entry.kind == "qcb" and entry.scheme:
        iters = args.iters or DEMO_ITERS
        print(f"demo: the default defense (EFRAP, docs/DEFENSE.md) under {entry.scheme}, the scheme "
              f"the backdoor targets, {iters:,} iterations per layer (--iters to change)", flush=True)
        runs.append((f"efrap default {entry.scheme}", entry.scheme, "efrap",
                     replace(get_method("efrap").defaults, iters=iters)))
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = check_output_folder(args.out_dir, "--out-dir") if args.out_dir else Path(tmp)
        out_dir.mkdir(exist_ok=True)  # as efrap batch --out: a new folder is made, its parent must exist
        outs = {label: out_dir / f"{entry.name}.{method}.{scheme}.onnx"
                for label, scheme, method, _ in runs}
        check_outputs(outs, [model, *spec_files(args.data)])
        for label, scheme, method, config in runs:
            # Every output is checked against FP as `efrap defend` checks it (same bytes out).
            _, report = quantize_file(model, str(outs[label]),
                                      QuantizeOptions(Deployment(scheme=PRESETS[scheme], data=args.data,
                                                                 num_calib=args.num_calib, seed=args.seed),
                                                      method=method, rounding=config),
                                      GuardOptions())
            add(label, str(outs[label]))
            print(f"demo: {label} agrees with full precision on {pct(report.agreement)} of "
                  f"{report.images:,} held-out training images (relative output error "
                  f"{'n/a' if report.output_error is None else f'{report.output_error:.4f}'})", flush=True)
    print(table(["model", "clean accuracy", "attack success"], rows))
    print(f"onnxruntime {verify.opt_level} level; {time.perf_counter() - start:.0f}s in all")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap demo`."""
    p = sub.add_parser("demo", help="run the main job on the stored default model",
                       description="Verify the stored default model in full precision, quantize "
                       "it with nearest rounding (W8A8, W4A4) and, for a backdoored default, "
                       "with the default defense (EFRAP, docs/DEFENSE.md) under the scheme the backdoor "
                       "targets; print a table of clean accuracy and attack success measured in "
                       "onnxruntime. The EFRAP model is the one `efrap defend MODEL --seed SEED` "
                       "writes, byte for byte.")
    p.add_argument("--data", default="fashion-mnist", help="data spec (default fashion-mnist)")
    p.add_argument("--num-calib", type=positive_int, default=1024, help="calibration images (default 1024)")
    p.add_argument("--seed", type=seed_number, default=0, help="the runs' seed (default 0)")
    p.add_argument("--out-dir", help="keep the quantized models in this folder, made if it is new "
                   "(default: a temporary folder)")
    p.add_argument("--iters", type=positive_int, default=None,
                   help=f"EFRAP iterations per layer (default {DEMO_ITERS:,}; fewer is faster)")
    p.set_defaults(func=run)
