"""The `efrap` command line.

Each sub-command lives in its own module under `pipeline.cli.commands` and exposes
`register(subparsers)`, which adds its parser and sets `func`; `COMMANDS` lists them
in the order --help shows them. Every command takes `--threads N` (default
`OMP_NUM_THREADS`), applied to torch and onnxruntime before it runs. A user mistake
prints one line and exits 2; a failed gate exits 1; SIGTERM is turned into an exit
that runs every clean-up, so no temporary file is left behind. Text that cannot be encoded for the terminal (a
non-ASCII file name under ``LC_ALL=C``) is printed escaped, never as a traceback; a
standard output that cannot be written (a closed pipe: ``| head -c 1``; a full device:
``> /dev/full``) ends the command with one line on stderr and exit 2. ``efrap --help``
ends with a glossary of every figure the commands print, each sub-command's with its
own (`pipeline.cli.glossary`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import signal
import sys
import threading
from types import FrameType

from pipeline import __version__
from pipeline.base.errors import EfrapError, one_line
from pipeline.base.threads import add_threads_arg, resolve_threads
from pipeline.cli.args import Parser
from pipeline.cli.commands import (
    attack,
    audit,
    batch,
    defend,
    demo,
    export,
    gate,
    quantize,
    scan,
    train,
    verify,
)
from pipeline.cli.glossary import COMMAND_TERMS, glossary
from pipeline.torch_backend import apply_threads

COMMANDS = (demo, train, attack, export, quantize, defend, verify, batch, scan, audit, gate)
#: Commands whose --threads means something else: batch's is per model (docs/BATCH.md).
OWN_THREADS = ("batch",)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every registered sub-command."""
    parser = Parser(
        prog="efrap",
        description=(
            "Defend quantized models against quantization-conditioned backdoors: "
            "calibrate an ONNX model, round its weights with EFRAP, write QDQ ONNX, "
            "and verify it in onnxruntime."
        ),
    )
    parser.add_argument("--version", action="version", version=f"efrap-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    # One --threads for every command, applied in `main` before the command runs.
    for name, command_parser in sub.choices.items():
        if name not in OWN_THREADS:
            add_threads_arg(command_parser)
        if name in COMMAND_TERMS:
            command_parser.glossary = glossary(COMMAND_TERMS[name])
    parser.glossary = glossary()
    return parser


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _escape_unencodable() -> None:
    """Print characters the streams' encoding lacks as escapes instead of failing."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(OSError, ValueError):
                reconfigure(errors="backslashreplace")


#: What a failed write to a stream raises: a full or broken device, a file size limit.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EIO, errno.EDQUOT)


def _stdout_failed(exc: OSError) -> bool:
    """Whether `exc` came from writing standard output.

    Files the commands write raise EfrapError (pipeline.base.safe_io), so an OSError
    without a file name from a failed write is the stream's; otherwise stdout is tried.
    """
    if isinstance(exc, BrokenPipeError):
        return True
    if exc.filename is None and exc.errno in _WRITE_ERRNOS:
        return True
    try:
        sys.stdout.flush()
    except OSError:
        return True
    return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's own flush at exit fails no more."""
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation, AttributeError):
        fd = sys.stdout.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `efrap` console script; returns the exit code."""
    _escape_unencodable()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a one-line usage error (exit 2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        if args.command not in OWN_THREADS:
            apply_threads(resolve_threads(args.threads))
        result = args.func(args)
        sys.stdout.flush()  # here, so a failed write is reported like any other error
    except EfrapError as exc:
        print(f"efrap {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not _stdout_failed(exc):
            raise
        _silence_stdout()
        why = "it was closed" if isinstance(exc, BrokenPipeError) else exc.strerror or type(exc).__name__
        with contextlib.suppress(OSError):
            print(f"efrap {args.command}: error: cannot write to standard output ({why})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"efrap {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
