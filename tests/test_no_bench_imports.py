"""Neither the tests nor the package import bench/.

bench/ holds scripts that measure and write docs; it is not installed. What a test
checks must live in the package (or in a shared test module such as
tests/hostile_cases.py, which bench may import in turn), so that the rule a doc
reports has one owner and the tests exercise that owner. A test may still run a bench
script as a process (tests/test_results_tables.py does), but never import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Where no module may import bench: every test file and every installed package.
CHECKED = ("tests", "pipeline", "converters", "validators", "models", "efrap_onnx")
#: Calls that import a module named by a string.
DYNAMIC = frozenset({"import_module", "__import__"})


def _is_bench(name: str) -> bool:
    return name == "bench" or name.startswith("bench.")


def bench_imports(source: str, where: str) -> list[str]:
    """Each place in `source` that imports bench or one of its modules, as 'WHERE:LINE name'."""
    found = []
    for node in ast.walk(ast.parse(source, where)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in DYNAMIC and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [f"{where}:{node.lineno} {name}" for name in names if _is_bench(name)]
    return found


def test_the_check_sees_every_kind_of_import() -> None:
    source = ("import bench.results\nfrom bench import results\nfrom bench.publish import portable\n"
              "import importlib\nimportlib.import_module('bench.coverage')\n__import__('bench')\n"
              "import benchmark\nfrom tests.hostile_cases import CASES\n")
    assert [hit.split(" ")[1] for hit in bench_imports(source, "x.py")] == \
        ["bench.results", "bench", "bench.publish", "bench.coverage", "bench"]


@pytest.mark.parametrize("folder", CHECKED)
def test_no_module_imports_bench(folder: str) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, folder
    hits = [hit for path in files for hit in bench_imports(path.read_text(), str(path.relative_to(ROOT)))]
    assert not hits, "bench/ is scripts, not a library; move what is needed into the package:\n" + \
        "\n".join(hits)
