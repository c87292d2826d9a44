"""How many threads torch and onnxruntime use, chosen on purpose.

One number, from `--threads` if given, else from `OMP_NUM_THREADS`, else each library's
own default, goes to torch (intra-op and, where torch still allows it, inter-op) and to
every onnxruntime session (`pipeline.base.runtime`). This module owns the number and the
onnxruntime side; `pipeline.torch_backend.apply_threads` gives it to torch as well, so
that the base layer imports no torch. torch reads `OMP_NUM_THREADS` by itself, onnxruntime
does not (it takes one thread per core), so without this a run asked to use one core would
still spread its sessions over all of them.

The number matters for more than speed: float sums depend on how the work is split,
so the same run on 1 and on 2 threads may differ in its last bits. It is recorded in
the run summary and in every resume checkpoint's key.
"""

from __future__ import annotations

import argparse
import os

from pipeline.base.errors import EfrapError

#: Most threads accepted (beyond any machine's cores; catches a typo such as 10000).
MAX_THREADS = 1024

ENV = "OMP_NUM_THREADS"

# Intra-op threads of onnxruntime sessions made without their own count (0: not set).
_session_threads = 0


def _count(text: str, what: str) -> int:
    value = text.strip()
    if not value.isascii() or not value.isdigit():
        raise EfrapError(f"{what} must be a positive whole number, got {text!r}")
    number = int(value)
    if not 1 <= number <= MAX_THREADS:
        raise EfrapError(f"{what} must be between 1 and {MAX_THREADS}, got {number}")
    return number


def env_threads() -> int | None:
    """The thread count `OMP_NUM_THREADS` asks for (None: unset or empty).

    OpenMP's nested form ("4,2") gives its first level, the one torch uses.

    Raises:
        EfrapError: a value that is not a count in [1, MAX_THREADS].
    """
    raw = os.environ.get(ENV, "")
    if not raw.strip():
        return None
    return _count(raw.split(",", 1)[0], ENV)


def resolve_threads(requested: int | None = None) -> int | None:
    """`requested` (from `--threads`) if given, else `OMP_NUM_THREADS`, else None (defaults)."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int):
            raise EfrapError(f"threads must be a whole number, got {requested!r}")
        return _count(str(requested), "--threads")
    return env_threads()


def set_session_threads(threads: int) -> None:
    """Threads of every onnxruntime session made without its own count (0: back to the
    `OMP_NUM_THREADS` fallback)."""
    global _session_threads
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS:
        raise EfrapError(f"threads must be a whole number in [0, {MAX_THREADS}], got {threads!r}")
    _session_threads = threads


def session_threads() -> int:
    """The thread count onnxruntime sessions get: the one set (`set_session_threads`, which
    `pipeline.torch_backend.apply_threads` calls), else `OMP_NUM_THREADS`, else 0
    (onnxruntime's default, one per core)."""
    return _session_threads or env_threads() or 0


def thread_count(text: str) -> int:
    """argparse type of `--threads`: a count in [1, MAX_THREADS]."""
    try:
        return _count(text, "--threads")
    except EfrapError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    """Add `--threads N` to a command (then call
    `pipeline.torch_backend.apply_threads(resolve_threads(args.threads))`)."""
    parser.add_argument("--threads", type=thread_count, default=None, metavar="N",
                        help=f"threads of torch and onnxruntime (default: {ENV} if set, else each "
                        "library's default); float sums depend on it, so results are reproducible "
                        "for one count")
