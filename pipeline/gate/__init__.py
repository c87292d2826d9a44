"""The release gate (`efrap gate CONFIG.toml`): scan, then defend, then verify, with thresholds
from a config file; JSON, Markdown and HTML reports.

    from pipeline.gate import load_gate_config, prepare_output, run_gate, write_reports
    config = load_gate_config("gate.toml")
    prepare_output(config)
    run = run_gate(config)
    print(write_reports(run)); exit(0 if run.passed else 1)

Modules: `config` (the checked config file), `run` (the three stages and the checks),
`report` (the three reports), `plots` (their pictures). docs/GATE.md describes it.
"""

from __future__ import annotations

from pipeline.gate.config import GateConfig, Thresholds, load_gate_config
from pipeline.gate.report import to_html, to_json, to_markdown, write_reports
from pipeline.gate.run import Check, GateRun, prepare_output, run_gate

__all__ = ["Check", "GateConfig", "GateRun", "Thresholds", "load_gate_config", "prepare_output", "run_gate",
           "to_html", "to_json", "to_markdown", "write_reports"]
