"""Hostile-input probe: every case of tests/hostile_cases.py as a real `efrap` process.

Usage: python bench/hostile_probe.py [--only SUBSTRING] [--json bench/results/hostile_probe.json]
           [--keep FOLDER]

The cases are defined once, in `tests/hostile_cases.py`, which the tests run too (most
of them in the test process). They live beside the tests, not in the package: they are
hostile inputs built to attack the CLI, nothing a user calls, and the tests import no
bench module (tests/test_no_bench_imports.py), so the bench imports them. Here each case
builds its inputs in a folder of its own (a hand-built 1x28x28 ONNX model, small npz
data sets, PNG image folders, scheme, trigger, gate and manifest files), runs
``python -m pipeline.cli.main ...`` there, and is judged by the same `judge` against the promise:
a mistake prints one error line on stderr (the last; status lines of stages that had
finished may come before it) and exits 2, a failed gate exits 1, nothing is written (no
output, no temporary file) and the inputs keep their bytes and modes; no traceback.

It prints a Markdown table (case, command, exit code, first line of stderr, nothing
written, inputs intact, verdict; docs/BENCHMARKS.md holds the last one) and writes the
results as JSON. The disk-full case runs with RLIMIT_FSIZE below the model's size, so
the write fails in the kernel (EFBIG, as a full disk fails with ENOSPC).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.publish import write_results
from pipeline.base.provenance import versions
from tests.hostile_cases import CASES, Result, run_case

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "results" / "hostile_probe.json"
#: Longest stderr line shown in the table (the JSON keeps 300 characters).
CELL = 140


def _cell(text: str) -> str:
    """`text` fit for one Markdown table cell."""
    text = text.replace("|", "\\|")
    return text if len(text) <= CELL else text[:CELL - 3] + "..."


def markdown(results: list[Result]) -> str:
    """The results as a Markdown table, one row per case."""
    rows = ["| case | command | exit | first line of stderr | nothing written | inputs intact | verdict |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        verdict = "ok" if r.ok else f"**FAIL**: {_cell(r.problem)}"
        command = r.command.replace("|", "/")
        written, intact = ("yes" if r.nothing_written else "NO"), ("yes" if r.inputs_intact else "NO")
        rows.append(f"| {r.case} | `{command}` | {r.exit_code} | {_cell(r.stderr_first_line)} | "
                    f"{written} | {intact} | {verdict} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    parser.add_argument("--keep", help="build the cases in this (new) folder and keep it")
    args = parser.parse_args()
    names = [n for n in CASES if not args.only or args.only in n]
    if not names:
        parser.error(f"no case matches {args.only!r}")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="efrap-hostile-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for name in names:
            r = run_case(name, root, in_process=False)
            results.append(r)
            print(f"{'ok  ' if r.ok else 'FAIL'} {name} (exit {r.exit_code}, {r.seconds:.1f}s)",
                  file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(markdown(results))
    failed = [r.case for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} cases keep the promise"
          + (f"; failing: {', '.join(failed)}" if failed else ""))
    write_results({"cases": [asdict(r) for r in results], "passed": len(results) - len(failed),
                   "total": len(results), "python": sys.version.split()[0], "versions": versions()},
                  args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
