"""What the benchmarks write: JSON and text without this machine's paths, tables between a doc's markers.

Results are committed and read elsewhere, so `portable` rewrites every string of a
JSON-ready value: the repository root becomes a relative path, the home folder `~` and
the temporary folder `<tmp>`, wherever they appear (file fields, commands, and paths
inside a child's last output line). `write_results` writes a result through
`pipeline.base.safe_io.write_json` (atomic, sorted keys).

A generated table lives in a doc between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``;
`write_section` replaces what is between them and keeps the text around them, so the
prose of a doc is written by hand and its tables by the benchmark.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from pipeline.base.safe_io import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
#: The home folder where a path starts there (not as the prefix of a longer name).
_HOME = re.compile(re.escape(str(Path.home())) + r"(?![\w.-])")


def portable_text(text: str) -> str:
    """`text` with machine-specific path prefixes replaced."""
    out = text.replace(f"{ROOT}/", "").replace(str(ROOT), ".")
    out = _HOME.sub("~", out)
    return out.replace(f"{tempfile.gettempdir()}/", "<tmp>/")


def portable(value: object) -> object:
    """`value` with machine-specific path prefixes replaced in every string, recursively."""
    if isinstance(value, str):
        return portable_text(value)
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v) for v in value]
    return value


def write_results(payload: dict | list, path: str | Path) -> None:
    """Write a benchmark's JSON result with portable paths (its folder made when missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(portable(payload), str(path))


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of section `name` ("results:zoo", "scan:table", ...)."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with `body` between the markers of section `name` (appended, markers and all, when missing)."""
    start, end = markers(name)
    if start not in text:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + f"{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{body}\n{end}{tail}"


def write_section(doc: Path, name: str, body: str, new_doc: str = "") -> None:
    """Put `body` into section `name` of `doc`; a missing doc starts as `new_doc`."""
    text = doc.read_text() if doc.exists() else new_doc
    write_text(doc, replace_section(text, name, body))
