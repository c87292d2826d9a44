"""The `efrap` console script: check that the four top-level packages are ours, then run."""

from __future__ import annotations

import sys

from efrap_onnx.packages import ShadowedPackageError, check_packages


def main(argv: list[str] | None = None) -> int:
    """Run the `efrap` command line; a shadowed package is one line on stderr and exit 2."""
    try:
        check_packages()
    except ShadowedPackageError as exc:
        print(f"efrap: error: {exc}", file=sys.stderr)
        return 2
    # Imported after the check: the command line imports all four packages.
    from pipeline.cli.main import main as run_cli

    return run_cli(argv)
