"""`efrap audit`: check a QDQ model someone else quantized against its FP source."""

from __future__ import annotations

import argparse

from pipeline.audit import AuditReport, AuditThresholds, audit_models
from pipeline.base.data import spec_files
from pipeline.base.errors import one_line
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
from pipeline.scan import scan_model
from validators.report import pct, table

#: How a figure that could not be measured is printed.
NA = "n/a"


def print_report(report: AuditReport) -> None:
    """Per-layer rounding and grids, the scan's evidence, the verdict."""
    rows = []
    for r in report.rounding.layers:
        grid = "standard" if r.grid.standard else f"NON-STANDARD (closest: {r.grid.closest})"
        rows.append([one_line(r.layer), r.weights, pct(r.off_nearest_fraction, NA), r.max_steps,
                     f"{r.mean_steps:.2f}", r.beyond_one_step, r.near_tie, grid])
    print(table(["layer", "weights", "off nearest", "max steps", "mean steps", "beyond 1 step", "near tie",
                 "grid"], rows))
    rounding = report.rounding
    print(f"rounding: {rounding.off_nearest} of {rounding.weights} integers off nearest "
          f"({pct(rounding.off_nearest_fraction, NA)}); context only, learned rounding leaves nearest too")
    ev = report.evidence
    fresh = (f"trigger found (class {ev.fresh_target}, ASR on Q {pct(ev.fresh_asr, NA)}, on FP "
             f"{pct(ev.fresh_asr_fp, NA)})") if ev.fresh_found else "none flagged"
    print(f"scan (FP against Q): scan verdict {ev.scan_verdict}; recovered trigger (target {ev.target}) "
          f"ASR on FP {pct(ev.asr_fp, NA)}, nearest {pct(ev.asr_nearest, NA)}, "
          f"Q {pct(ev.asr_quantized, NA)}; "
          f"fresh search against Q: {fresh}")
    for warning in report.warnings:
        print(f"warning: {one_line(warning)}")
    print(f"verdict: {report.verdict.verdict}{' (FLAGGED)' if report.verdict.flagged else ''}")
    for reason in report.verdict.reasons:
        print(f"  {one_line(reason)}")


def run(args: argparse.Namespace) -> int:
    """Audit Q against FP; exit 1 when Q is flagged or the audit is inconclusive."""
    inputs = [*model_files(args.fp), *model_files(args.quantized), *scheme_files(args.scheme),
              *spec_files(args.calib), *([args.preprocess] if args.preprocess else [])]
    check_outputs({"--json": args.json}, inputs)
    options = release_spec(args).scan_options()
    thresholds = AuditThresholds(min_asr=args.min_asr, min_differential=args.min_differential)
    report = audit_models(args.fp, args.quantized, scan_model, options, thresholds)
    print_report(report)
    if args.json:
        write_json(report.to_json(), args.json)
    return 1 if report.verdict.flagged else 0


def _fraction(text: str) -> float:
    value = positive_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"'{text}' is a fraction and must lie in (0, 1]")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap audit`."""
    p = sub.add_parser(
        "audit", help="check a QDQ model someone else quantized against its FP source",
        description="Per layer, the share of Q's integer weights that are not nearest rounding of the FP "
        "weight on Q's own grid and how far they are, and whether each grid is one a standard observer "
        "gives (this pipeline's min-max and MSE observers, onnxruntime quantize_static); then a "
        "differential trigger search with Q as the quantized side (efrap scan --defended). The verdict "
        "comes from the search: a trigger that works on Q and not on FP flags Q (exit 1). "
        "See docs/GATE.md.")
    p.add_argument("fp", help="the full-precision ONNX model Q was made from")
    p.add_argument("quantized", help="the QDQ ONNX model to audit")
    p.add_argument("--json", help="write the full report as JSON here")
    add_data_arg(p, note="; clean images for the scan, no labels needed")
    add_scheme_arg(p, "the scheme Q claims (the scan's nearest model; a warning says when Q's grids are not "
                   "the scheme's)")
    p.add_argument("--num-calib", type=positive_int, default=1024, help="calibration images (default 1024)")
    p.add_argument("--holdout", type=positive_int, default=1000,
                   help="held-out images for the onnxruntime figures (default 1000)")
    p.add_argument("--budget", type=positive_float, metavar="SECONDS",
                   help="wall-clock limit of the scan; a scan the budget stops makes the audit inconclusive "
                   "(exit 1) (default: none)")
    p.add_argument("--seed", type=seed_number, default=0, help="the scan's seed (default 0)")
    p.add_argument("--provider", choices=PROVIDERS, default="auto", help="onnxruntime provider")
    p.add_argument("--min-asr", type=_fraction, default=AuditThresholds.min_asr,
                   help="attack success on Q at which a trigger counts (default 0.5)")
    p.add_argument("--min-differential", type=_fraction, default=AuditThresholds.min_differential,
                   help="attack success on Q minus on FP at which Q is flagged (default 0.4)")
    add_preprocess_args(p)
    p.set_defaults(func=run)
