"""The layer order of the packages, enforced on the source (an import-linter-style contract).

From the bottom up:

0. ``pipeline.base``: the deployment spec and the schemes, errors, safe I/O, data, triggers,
   progress, onnxruntime sessions, device names, seeds, value checks; no torch;
1. ``validators``: metrics, verification's limits, reports, verification in onnxruntime; no torch;
2. ``pipeline``: quantization arithmetic, observers, the plan, calibration, the
   torch simulation, reconstruction and the rounding methods, and what the base layer gets
   from torch (``pipeline.torch_backend``: the resize, the GPU check, devices, threads);
3. ``converters``: torch -> ONNX export and the QDQ writer;
4. ``pipeline.quantize``: the orchestration (FP ONNX -> QDQ ONNX), the scan, the audit, the
   release spec and the runner's steps, the gate and the batch, and ``pipeline.api`` over them
   (the drop-in for onnxruntime's quantize_static, defend, scan, verify);
5. ``models``: architectures, training, the red team's attacks, the stored zoo;
6. ``pipeline.cli``: the command line.

A module may import only from its own layer or below, and never inside a function
(a function-level import is how a cycle hides).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "converters", "validators", "models")

#: Longest prefix wins: `pipeline.quantize` sits above `converters`, the rest of
#: `pipeline` below it.
LAYERS: dict[str, int] = {
    "pipeline.base": 0,
    "pipeline": 2,
    "validators": 1,
    "converters": 3,
    "pipeline.quantize": 4,
    "pipeline.audit": 4,
    "pipeline.scan_evidence": 4,
    "pipeline.gate": 4,
    "pipeline.scan": 4,
    "pipeline.batch": 4,
    "pipeline.selfcheck": 4,
    "pipeline.repair": 4,
    "pipeline.api": 4,
    "pipeline.runner": 4,
    "pipeline.release_spec": 4,
    "models": 5,
    "pipeline.cli": 6,
}

#: Packages that import no torch, in any of their modules (verification runs on onnxruntime).
TORCH_FREE = ("pipeline.base", "validators")

#: Optional third-party dependencies that are imported where they are used, so that the
#: package works without them (each is an extra in pyproject.toml).
OPTIONAL_IMPORTS: frozenset[str] = frozenset({"ray"})


def layer_of(module: str) -> int | None:
    """The layer of a project module, by its longest matching prefix (None: not ours)."""
    best: tuple[int, int] | None = None
    for prefix, rank in LAYERS.items():
        matches = module == prefix or module.startswith(prefix + ".")
        if matches and (best is None or len(prefix) > best[0]):
            best = (len(prefix), rank)
    return None if best is None else best[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # `from pkg import sub` may name a submodule: count it as pkg.sub when that exists.
    names = []
    for alias in node.names:
        candidate = f"{prefix}.{alias.name}"
        sub = ROOT / Path(*candidate.split("."))
        names.append(candidate if sub.with_suffix(".py").exists() or sub.is_dir() else prefix)
    return names


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _walk_imports() -> tuple[list[str], list[str]]:
    """(layer violations, function-level imports) over every project module."""
    violations: list[str] = []
    nested: list[str] = []
    for path in _sources():
        module = _module_name(path)
        own = layer_of(module)
        assert own is not None, module
        tree = ast.parse(path.read_text(), str(path))
        funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        inner = {id(sub) for f in funcs for sub in ast.walk(f)
                 if isinstance(sub, ast.Import | ast.ImportFrom)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            targets = _imported(node, module, path.name == "__init__.py")
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if id(node) in inner and not all(t.split(".")[0] in OPTIONAL_IMPORTS for t in targets):
                nested.append(f"{where} imports {', '.join(targets)} inside a function")
            for target in targets:
                rank = layer_of(target)
                if rank is not None and rank > own:
                    violations.append(f"{where}: {module} (layer {own}) imports {target} "
                                      f"(layer {rank})")
    return violations, nested


def test_every_import_points_down_the_layers() -> None:
    violations, _ = _walk_imports()
    assert not violations, "\n".join(violations)


def test_no_function_level_imports() -> None:
    _, nested = _walk_imports()
    assert not nested, "\n".join(nested)


def test_no_import_cycles_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for path in _sources():
        module = _module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                deps.update(t for t in _imported(node, module, path.name == "__init__.py")
                            if layer_of(t) is not None and t != module)
        graph[module] = deps
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            # A package's __init__ importing its own submodules is not a cycle of rules.
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join([*trail, m, d]))
            if state.get(d) is None:
                visit(d, [*trail, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def _torch_free_modules() -> list[str]:
    folders = [ROOT / Path(*pkg.split(".")) for pkg in TORCH_FREE]
    return [_module_name(p) for folder in folders for p in sorted(folder.rglob("*.py"))]


def test_base_and_validators_import_no_torch() -> None:
    # A fresh interpreter: in this one, other tests have long imported torch.
    modules = _torch_free_modules()
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "    assert 'torch' not in sys.modules, name + ' imports torch'\n"
            "import validators.verify\n"
            "assert callable(validators.verify.verify_model)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "validators.verify" in modules and "pipeline.base.resize" in modules


@pytest.mark.parametrize(("module", "rank"), [
    ("pipeline.base.errors", 0), ("validators.verify", 1), ("pipeline.base.scheme", 0),
    ("pipeline.torch_backend", 2),
    ("converters.qdq", 3), ("pipeline.quantize", 4), ("models.attacks.qsim", 5), ("pipeline.cli.main", 6),
])
def test_layer_table(module: str, rank: int) -> None:
    assert layer_of(module) == rank
