"""`efrap verify`: measure a model in onnxruntime and gate on the result."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.base.data import spec_files
from pipeline.base.errors import one_line
from pipeline.base.onnx_io import model_files
from pipeline.base.runtime import PROVIDERS
from pipeline.base.safe_io import check_outputs, write_json
from pipeline.base.trigger import trigger_files
from pipeline.cli.args import (
    add_data_arg,
    add_preprocess_args,
    lower_limit,
    positive_int,
    seed_number,
    upper_limit,
)
from pipeline.cli.spec import release_spec
from pipeline.runner import verify_step
from pipeline.torch_graph import SIMULATION
from validators.report import pct, table
from validators.verify import VerifyReport


def _figure(value: float | None, why: str | None) -> str:
    """A measured fraction as a percentage; "not measurable" (and why) when it is None."""
    if value is not None:
        return pct(value)
    return f"not measurable: {one_line(why)}" if why else "not measurable"


def print_report(report: VerifyReport) -> None:
    """The measured figures as a table, then the gate's checks."""
    why = report.not_measurable
    rows = [["clean accuracy", _figure(report.clean_accuracy, why.get("accuracy"))]]
    if report.attack is not None:
        rows.append(["attack success (non-target)", _figure(report.attack.rate, why.get("asr"))])
        rows.append(["attack success (all)", _figure(report.attack.rate_all, why.get("asr"))])
    if report.parity is not None:
        if report.parity.why:
            rows.append(["parity with the simulation", f"not measured: {one_line(report.parity.why)}"])
        else:
            rows.append(["predictions differing from simulation",
                         pct(report.parity.fraction_differing_predictions)])
            rows.append(["largest logit gap", f"{report.parity.max_logit_gap:.3g}"])
    rows.append(["images", f"{report.images} ({report.image_choice})"])
    rows.append(["onnxruntime", f"{report.provider}, opt level {report.opt_level}"])
    print(table(["metric", "value"], rows))
    if report.gate is not None:
        for c in report.gate.checks:
            value = "not measurable: " + one_line(c.why) if c.value is None else f"value {c.value:.6g}"
            print(f"gate: {c.check}: {'pass' if c.passed else 'FAIL'} ({value}, limit {c.limit:g})")
        print(f"gate: {'PASSED' if report.gate.passed else 'FAILED'}")


def run(args: argparse.Namespace) -> int:
    """Verify one model; exit 1 when a gate is set and fails."""
    inputs = [*model_files(args.model), *spec_files(args.data),
              *([args.preprocess] if args.preprocess else [])]
    if args.trigger:
        inputs += trigger_files(args.trigger)
    check_outputs({"--json": args.json}, inputs)
    options = release_spec(args, quantized=False).verify_options(
        reference=SIMULATION if args.reference else None)
    report = verify_step(Path(args.model), options).output
    print_report(report)
    if args.json:
        write_json(report.to_json(), args.json)
    return 1 if report.gate is not None and not report.gate.passed else 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap verify`."""
    p = sub.add_parser("verify", help="measure a model in onnxruntime (accuracy, ASR, parity)",
                       description="Run the model in onnxruntime on the test split: clean "
                       "accuracy, attack success with a trigger, parity with the PyTorch "
                       "simulation, and an optional pass/fail gate (exit 1 on failure; a value "
                       "that cannot be measured fails its check).")
    p.add_argument("model", help="ONNX model (FP or QDQ)")
    add_data_arg(p, split="test")
    p.add_argument("--trigger", help="trigger file (JSON): also measure attack success")
    p.add_argument("--opt-level", choices=("faithful", "all"), default="faithful",
                   help="faithful: optimizations off (exact QDQ semantics); all: what a "
                   "deployment gets (default faithful)")
    p.add_argument("--provider", choices=PROVIDERS, default="auto",
                   help="onnxruntime provider (default: CUDA when onnxruntime-gpu and a GPU are present)")
    p.add_argument("--reference", action="store_true",
                   help="compare with the pipeline's PyTorch simulation of the same network")
    p.add_argument("--limit", type=positive_int,
                   help="use only N test images, chosen at random with --seed")
    p.add_argument("--seed", type=seed_number, default=0, help="seed of --limit's choice (default 0)")
    p.add_argument("--json", help="write the full report as JSON here")
    g = p.add_argument_group("gate (exit 1 when a check fails or cannot be measured)",
                             "Thresholds are fractions in [0, 1] (0.05) or percentages (5%).")
    g.add_argument("--min-accuracy", type=lower_limit, help="lowest clean accuracy (0.9 or 90%%)")
    g.add_argument("--max-asr", type=upper_limit, help="highest attack success rate (0.05 or 5%%)")
    g.add_argument("--max-parity-diff", type=upper_limit,
                   help="highest fraction of predictions differing from the simulation")
    add_preprocess_args(p)
    p.set_defaults(func=run)
