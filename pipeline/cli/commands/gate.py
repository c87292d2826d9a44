"""`efrap gate`: the release gate (scan, defend, verify) from a TOML config."""

from __future__ import annotations

import argparse

from pipeline.gate import load_gate_config, prepare_output, run_gate, write_reports
from pipeline.scan import scan_model


def run(args: argparse.Namespace) -> int:
    """Run the gate; exit 0 on pass, 1 on fail (2, from the caller, on a bad config)."""
    config = load_gate_config(args.config)
    prepare_output(config)
    result = run_gate(config, scan_model)
    print(write_reports(result))
    return 0 if result.passed else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap gate`."""
    p = sub.add_parser(
        "gate", help="release gate: scan, defend and verify a model against thresholds in a TOML file",
        description="Scan the FP model for a backdoor (efrap scan), defend it (efrap defend), verify the "
        "defended model in onnxruntime (efrap verify) with the recovered trigger, and check the "
        "thresholds of CONFIG. Writes report.json, summary.md (also printed) and report.html (one "
        "self-contained file) into the config's output folder. Exit 0: pass; 1: fail; 2: a bad config "
        "(one line naming the file and the field; nothing written). See docs/GATE.md.")
    p.add_argument("config", help="the gate's TOML (or JSON) config file")
    p.set_defaults(func=run)
