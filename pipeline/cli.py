"""The `efrap` command line.

Each sub-command lives in its own module under `pipeline.commands` and exposes
`register(subparsers)`, which adds its parser and sets `func`. Modules are found
by name, so adding a command is adding one file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from pipeline import __version__
from pipeline.errors import EfrapError

# Commands in the order --help lists them; any other module in pipeline.commands follows.
_ORDER = ["demo", "train", "attack", "export", "quantize", "defend", "verify"]


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="efrap",
        description=(
            "Defend quantized models against quantization-conditioned backdoors: "
            "calibrate an ONNX model, round its weights with EFRAP, write QDQ ONNX, "
            "and verify it in onnxruntime."
        ),
    )
    parser.add_argument("--version", action="version", version=f"efrap-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import pipeline.commands as commands

    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
    for name in names:
        importlib.import_module(f"pipeline.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `efrap` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except EfrapError as exc:
        print(f"efrap {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"efrap {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
