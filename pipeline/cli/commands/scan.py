"""`efrap scan`: does an FP model carry a backdoor that the deployment quantization wakes?"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.base.data import spec_files
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import model_files
from pipeline.base.runtime import PROVIDERS
from pipeline.base.safe_io import check_outputs, write_json
from pipeline.base.scheme import scheme_files
from pipeline.cli.args import (
    add_data_arg,
    add_preprocess_args,
    add_scheme_arg,
    positive_float,
    positive_int,
    seed_number,
)
from pipeline.cli.spec import release_spec
from pipeline.runner import scan_step
from pipeline.scan import CLASS_STATES, ScanReport
from validators.report import pct

#: How a figure that could not be measured is printed.
NA = "n/a"


def print_report(report: ScanReport) -> None:
    """The verdict, what was searched, the classes that stand out but are not findings and
    why, the recovered trigger's figures and the defended model's, a few lines."""
    v = report.verdict
    data = report.to_json()
    target = f", target {v.target}" if v.target is not None else ""
    if v.verdict == "inconclusive":
        print(f"verdict: inconclusive: {v.reason}")
    else:
        print(f"verdict: {v.verdict}{target} (confidence {100 * v.confidence:.1f}%): {v.reason}")
    coverage = data["coverage"]
    by_state = coverage["classes"]  # type: ignore[index]
    print("classes: " + "; ".join(f"{state} {', '.join(str(c) for c in by_state[state]) or 'none'}"
                                  for state in CLASS_STATES if by_state[state] or state == "searched"))
    for test, per in data["not_findings"].items():  # type: ignore[union-attr]
        anomaly = data["tests"][test]["per_class"]  # type: ignore[index]
        for c, why in per.items():
            print(f"not a finding: class {c}, {test} anomaly index {anomaly[c]['anomaly']:.1f} "
                  f"(threshold {report.rule.threshold:g}): {why}")
    if report.trigger_found is not None and report.figures is not None:
        f = report.trigger_found
        asr = ", ".join(f"{name} {pct(rate, NA)}" for name, rate in report.figures.asr.items())
        label = "recovered trigger" if v.target is not None else "strongest candidate"
        print(f"{label}: class {f.target}, {f.mode} {f.family}, size {100 * f.size:.2f}% of the image; "
              f"attack success in onnxruntime on {report.figures.non_target_images} held-out images: {asr}")
    if report.defended is not None:
        d = report.defended
        dt = f", target {d.verdict.target}" if d.verdict.target is not None else ""
        if d.verdict.verdict == "inconclusive":
            print(f"defended: inconclusive: {d.verdict.reason}")
        else:
            print(f"defended: {d.verdict.verdict}{dt} (confidence {100 * d.verdict.confidence:.1f}%)")
    for note in report.notes:
        if note != v.reason:  # the budget's note is the inconclusive verdict's reason, printed above
            print(f"note: {note}")
    onnxrt = report.provenance["onnxruntime"]
    print(f"scanned {report.model} in {report.seconds:.1f}s ({len(report.searched)} of {report.classes} "
          f"classes, {report.provenance['threads']} thread(s); onnxruntime {onnxrt['provider']}, "  # type: ignore[index]
          f"opt level {onnxrt['opt_level']})")  # type: ignore[index]


def _trigger_npz(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".json":
        raise EfrapError(f"{path}: --trigger-out names the trigger's JSON file (its .npz goes beside it)")
    return out.with_name(out.stem + ".npz")


def run(args: argparse.Namespace) -> int:
    """Scan one model; exit 0 whatever the verdict, "inconclusive" included (the verdict is in
    the output and the report; efrap gate and efrap audit fail an inconclusive scan)."""
    inputs = [*model_files(args.model), *scheme_files(args.scheme), *spec_files(args.calib),
              *([args.preprocess] if args.preprocess else []),
              *(model_files(args.defended) if args.defended else [])]
    outputs = {"--json": args.json, "--trigger-out": args.trigger_out,
               "--trigger-out's npz": _trigger_npz(args.trigger_out) if args.trigger_out else None}
    check_outputs(outputs, inputs)
    options = release_spec(args).scan_options()
    scanned = scan_step(Path(args.model), options, Path(args.trigger_out) if args.trigger_out else None,
                        defended=Path(args.defended) if args.defended else None)
    report = scanned.report
    print_report(report)
    if args.json:
        write_json(report.to_json(args.trigger_out if report.trigger is not None else None), args.json)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap scan`."""
    p = sub.add_parser(
        "scan", help="detect a backdoor that quantization wakes (no trigger needed)",
        description="Reverse-engineer, per class, the smallest trigger that makes the nearest-quantized "
        "model predict the class while the FP model keeps its prediction (and Neural Cleanse's trigger "
        "on the FP model alone), from clean unlabelled images; decide qcb, fp-backdoor or clean from the "
        "outliers among the classes; measure the recovered trigger in onnxruntime on held-out images. "
        "See docs/SCAN.md.")
    p.add_argument("model", help="full-precision ONNX model")
    add_scheme_arg(p)
    add_data_arg(p, note="; clean images, no labels needed")
    p.add_argument("--json", help="write the full report as JSON here")
    p.add_argument("--trigger-out", metavar="T.json",
                   help="write the recovered trigger here (its pattern and mask in T.npz beside it)")
    p.add_argument("--defended", metavar="D.onnx",
                   help="a defended QDQ model of the same FP model (efrap defend): measure the recovered "
                   "trigger on it and search it afresh")
    p.add_argument("--budget", type=positive_float, metavar="SECONDS",
                   help="wall-clock limit of the whole scan, held-out figures included; the searches share "
                   "what is left, and a scan the budget stops is 'inconclusive', with what was and was not "
                   "searched (default: none)")
    p.add_argument("--num-calib", type=positive_int, default=1024,
                   help="calibration images, as for efrap quantize (default 1024; a quarter, at most 256, "
                   "check the triggers)")
    p.add_argument("--holdout", type=positive_int, default=1000,
                   help="held-out images for the onnxruntime figures (default 1000)")
    p.add_argument("--max-targets", type=positive_int, default=10,
                   help="most classes searched; with more classes the most promising are ranked first "
                   "(default 10)")
    p.add_argument("--seed", type=seed_number, default=0,
                   help="the scan's one seed: calibration images, search batches and patterns (default 0)")
    p.add_argument("--provider", choices=PROVIDERS, default="auto",
                   help="onnxruntime provider of calibration and the figures (default auto)")
    add_preprocess_args(p)
    p.set_defaults(func=run)
