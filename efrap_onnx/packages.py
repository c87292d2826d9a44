"""Which top-level packages are efrap-onnx's, and one clear error when another shadows one.

The project's layout fixes four generic top-level names: `pipeline`, `models`,
`converters` and `validators`. Another package of the same name found first on
`sys.path` (a `models/` folder with an `__init__.py` in the current directory, a
`validators` on PYTHONPATH) or installed over ours by another distribution would
otherwise surface as an ImportError deep in an import chain, or silently run someone
else's code. `check_packages` finds each name as an import would, without importing
it, and requires it to be efrap-onnx's: in the folder `efrap_onnx` itself was loaded
from, with the marker line each of our packages' `__init__.py` carries.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: The top-level packages the wheel installs beside `efrap_onnx`.
PACKAGES = ("pipeline", "models", "converters", "validators")
#: The line every one of `PACKAGES` carries in its `__init__.py`.
MARKER = "__efrap_onnx__ = True"
#: What a user can do about a shadowed package.
REMEDY = ("rename or remove the other one, or run from another folder; install efrap-onnx in its own "
          "virtual environment (README, 'Install')")


class ShadowedPackageError(ImportError):
    """One of efrap-onnx's top-level packages resolves to another package of the same name."""


def package_problem(name: str, root: Path) -> str | None:
    """Why top-level package `name` is not efrap-onnx's one under `root`, or None when it is.

    Args:
        name: A top-level package name.
        root: The folder holding efrap-onnx's packages (site-packages, or a checkout).
    """
    expected = root / name / "__init__.py"
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:  # ValueError: a module in sys.modules without a spec
        return f"efrap-onnx: the package {name!r} cannot be located ({exc}); {REMEDY}"
    if spec is None:
        return f"efrap-onnx: its package {name!r} is missing (expected {expected}); reinstall efrap-onnx"
    if spec.origin is None or Path(spec.origin).resolve() != expected.resolve():
        found = spec.origin or ", ".join(spec.submodule_search_locations or []) or "an unknown place"
        return (f"efrap-onnx: the top-level package {name!r} resolves to {found}, not to efrap-onnx's "
                f"{expected}: another package named {name!r} shadows it; {REMEDY}")
    if MARKER not in expected.read_text(encoding="utf-8", errors="replace"):
        return (f"efrap-onnx: {expected} is not efrap-onnx's (it lacks the line {MARKER!r}): another "
                f"distribution installed a package named {name!r} over it; {REMEDY}")
    return None


def check_packages(root: Path | None = None) -> None:
    """Require every one of `PACKAGES` to be efrap-onnx's own.

    Args:
        root: The folder holding efrap-onnx's packages; default: the one `efrap_onnx` is in.

    Raises:
        ShadowedPackageError: one is missing, shadowed by another package, or overwritten;
            the message names the package, where it was found and where ours should be.
    """
    root = root or Path(__file__).resolve().parent.parent
    for name in PACKAGES:
        problem = package_problem(name, root)
        if problem:
            raise ShadowedPackageError(problem)
