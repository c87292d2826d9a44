"""`efrap verify`: measure a model in onnxruntime and gate on the result."""

from __future__ import annotations

import argparse

from pipeline.onnx_io import write_json
from validators.gate import Gate
from validators.report import pct, table
from validators.verify import VerifyOptions, verify_model


def _fraction(text: str) -> float:
    value = float(text.rstrip("%"))
    return value / 100.0 if value > 1.0 or text.endswith("%") else value


def run(args: argparse.Namespace) -> int:
    """Verify one model; exit 1 when a gate is set and fails."""
    options = VerifyOptions(
        data=args.data, trigger=args.trigger, opt_level=args.opt_level, provider=args.provider,
        reference=args.reference, limit=args.limit,
        gate=Gate(min_accuracy=args.min_accuracy, max_asr=args.max_asr,
                  max_parity_diff=args.max_parity_diff),
    )
    report = verify_model(args.model, options)
    rows = [["clean accuracy", pct(report["clean_accuracy"])]]
    if report["attack_success_rate"] is not None:
        rows.append(["attack success (non-target)", pct(report["attack_success_rate"])])
        rows.append(["attack success (all)", pct(report["attack_success_rate_all"])])
    if "parity" in report:
        rows.append(["predictions differing from simulation",
                     pct(report["parity"]["fraction_differing_predictions"])])
        rows.append(["largest logit gap", f"{report['parity']['max_logit_gap']:.3g}"])
    rows.append(["images", report["images"]])
    rows.append(["onnxruntime", f"{report['provider']}, opt level {report['opt_level']}"])
    print(table(["metric", "value"], rows))
    if args.json:
        write_json(report, args.json)
    gate = report.get("gate")
    if gate is not None:
        for c in gate["checks"]:
            print(f"gate: {c['check']}: {'pass' if c['passed'] else 'FAIL'} "
                  f"(value {c['value']}, limit {c['limit']})")
        print(f"gate: {'PASSED' if gate['passed'] else 'FAILED'}")
        return 0 if gate["passed"] else 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap verify`."""
    p = sub.add_parser("verify", help="measure a model in onnxruntime (accuracy, ASR, parity)",
                       description="Run the model in onnxruntime on the test split: clean "
                       "accuracy, attack success with a trigger, parity with the PyTorch "
                       "simulation, and an optional pass/fail gate (exit 1 on failure).")
    p.add_argument("model", help="ONNX model (FP or QDQ)")
    p.add_argument("--data", default="fashion-mnist", help="data spec, test split (default fashion-mnist)")
    p.add_argument("--trigger", help="trigger JSON file: also measure attack success")
    p.add_argument("--opt-level", choices=("faithful", "all"), default="faithful",
                   help="faithful: optimizations off (exact QDQ semantics); all: what a "
                   "deployment gets (default faithful)")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                   help="onnxruntime provider (default: CUDA when onnxruntime-gpu and a GPU are present)")
    p.add_argument("--reference", action="store_true",
                   help="compare with the pipeline's PyTorch simulation of the same network")
    p.add_argument("--limit", type=int, help="use only the first N test images")
    p.add_argument("--json", help="write the full report as JSON here")
    g = p.add_argument_group("gate (exit 1 when a check fails)")
    g.add_argument("--min-accuracy", type=_fraction, help="lowest clean accuracy (0.9 or 90%%)")
    g.add_argument("--max-asr", type=_fraction, help="highest attack success rate (0.05 or 5%%)")
    g.add_argument("--max-parity-diff", type=_fraction,
                   help="highest fraction of predictions differing from the simulation")
    p.set_defaults(func=run)
