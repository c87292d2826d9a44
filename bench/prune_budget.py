"""Rare-unit pruning's budget on nearest rounding: the measurement behind the default's 3%.

Usage:
    python bench/prune_budget.py [--names ZOO_NAME ...] [--models A.onnx ...] [--budgets 0.01 0.03 0.05]

Each model is quantized under the scheme its attack targets with nearest rounding, alone
and with rare-unit pruning (`--prune-rare`, pipeline/rare_units.py) at each budget, and
verified with its trigger in onnxruntime (faithful level, CPU provider, every test
image). Nearest rounding keeps the pruning's own effect apart from any learned rounding.
Prints the table, writes bench/results/prune_budget.json and fills the table between the
`results:prune` markers of docs/DEFENSE.md. Models given with --models are read as
bench/results.py reads them (trigger beside them, scheme in their metadata).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.publish import write_results, write_section
from bench.results import (
    DEFENSE_DOC,
    NEW_DOC,
    ROOT,
    Subject,
    file_subjects,
    measure,
    pair,
    stamped,
    zoo_subjects,
)
from pipeline.base.deployment import Deployment
from pipeline.base.progress import log
from pipeline.base.scheme import load_scheme
from pipeline.quantize import QuantizeOptions, quantize_file
from pipeline.rounding import NearestConfig


def measure_budgets(s: Subject, budgets: list[float], tmp: str) -> dict:
    """FP, nearest, and nearest with pruning at each budget, on one model."""
    row: dict = {"model": s.name, "scheme": s.scheme, "fp": measure(s.path, s.trigger, s.data, None)}
    for budget in [0.0, *budgets]:
        out = str(Path(tmp) / f"{s.name}.{budget:g}.onnx")
        quantize_file(s.path, out,
                      QuantizeOptions(Deployment(scheme=load_scheme(s.scheme), data=s.data),
                                      rounding=NearestConfig(prune_rare=budget)))
        row[f"{budget:g}"] = measure(out, s.trigger, s.data, None)
        log(f"{s.name} prune {budget:g}: CDA {row[f'{budget:g}']['cda']:.2f} "
            f"ASR {row[f'{budget:g}']['asr']:.2f}")
    return row


def render(rows: list[dict], budgets: list[float], command: str) -> str:
    """The Markdown table with its command."""
    headers = ["model", "scheme", "FP", "nearest", *(f"nearest + pruning {100 * b:g}%" for b in budgets)]
    lines = [f"Command: `{command}`", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [r["model"], r["scheme"], pair(r["fp"]), pair(r["0"]), *(pair(r[f"{b:g}"]) for b in budgets)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Measure, print, write the JSON and the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", nargs="*", default=None, help="zoo entries (default: every QCB)")
    parser.add_argument("--models", nargs="*", default=[], help="models built by `efrap attack`")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.01, 0.03, 0.05])
    parser.add_argument("--json", default=str(ROOT / "bench/results/prune_budget.json"))
    parser.add_argument("--doc", default=str(DEFENSE_DOC))
    args = parser.parse_args()
    subjects = zoo_subjects(args.names) + file_subjects(args.models)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure_budgets(s, args.budgets, tmp) for s in subjects]
    command = "python bench/prune_budget.py" + (" --names " + " ".join(args.names) if args.names else "") + (
        " --models " + " ".join(Path(m).name for m in args.models) if args.models else "") + (
        " --budgets " + " ".join(f"{b:g}" for b in args.budgets))
    body = render(rows, args.budgets, command)
    print(body)
    write_results(stamped({"command": command, "budgets": args.budgets, "seed": 0, "results": rows}),
                  args.json)
    write_section(Path(args.doc), "results:prune", body, NEW_DOC)


if __name__ == "__main__":
    main()
