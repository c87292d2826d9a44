"""Compare defense tables of bench/results.py runs, model by model and method by method.

Usage: python bench/compare_results.py LABEL=RUN.json LABEL=RUN.json [...] [--tolerance 0.3]

Prints a Markdown table: CDA / ASR of every method in every run, and the largest
worsening (a CDA drop or an ASR rise, in points) of the last run against the first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METHODS = ("nearest", "adaround", "efrap")


def main() -> None:
    """Print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=results.json, oldest first")
    parser.add_argument("--tolerance", type=float, default=0.3, help="points (default 0.3)")
    args = parser.parse_args()
    runs = [(label, {r["model"]: r for r in json.loads(Path(path).read_text())["results"]})
            for label, path in (item.split("=", 1) for item in args.runs)]
    print("| model | method | " + " | ".join(label for label, _ in runs) + " | worst change, last vs first |")
    print("|---|---|" + "---|" * len(runs) + "---|")
    over = 0
    for model in runs[0][1]:
        for method in METHODS:
            cells, first, last = [], None, None
            for _, rows in runs:
                m = rows.get(model, {}).get(method)
                cells.append(f"{m['cda']:.2f} / {m['asr']:.2f}" if m else "-")
                if m:
                    first = first or m
                    last = m
            worst = max(first["cda"] - last["cda"], last["asr"] - first["asr"]) if first and last else 0.0
            flag = " (over)" if worst > args.tolerance else ""
            over += worst > args.tolerance
            print(f"| {model} | {method} | " + " | ".join(cells) + f" | {worst:+.2f}{flag} |")
    print(f"\n{over} figure pairs worsen by more than {args.tolerance} points.")


if __name__ == "__main__":
    main()
