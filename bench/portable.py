"""Benchmark JSON without this machine's paths: results are committed and read elsewhere.

`portable` rewrites every string of a JSON-ready value: the repository root becomes a
relative path, the home folder `~` and the temporary folder `<tmp>`, wherever they appear
(file fields, and paths inside a child's last output line). `write_results` writes the
result through `pipeline.base.safe_io.write_json`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.base.safe_io import write_json

ROOT = Path(__file__).resolve().parents[1]


def portable(value: object) -> object:
    """`value` with machine-specific path prefixes replaced, recursively."""
    if isinstance(value, str):
        out = value.replace(f"{ROOT}/", "").replace(str(ROOT), ".")
        out = out.replace(f"{Path.home()}/", "~/")
        return out.replace(f"{tempfile.gettempdir()}/", "<tmp>/")
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v) for v in value]
    return value


def write_results(payload: dict, path: str | Path) -> None:
    """Write a benchmark's JSON result with portable paths."""
    write_json(portable(payload), str(path))
