"""One model of a batch: scan (where the scan exists), defend or quantize, verify; one result file.

`run_job` writes into the model's own folder:

- ``model.qdq.onnx``: the defended (or quantized) model, with its ``efrap.*`` metadata;
- ``summary.json``: the quantization summary (per layer) and the check against FP;
- ``verify_fp.json``, ``verify.json``: `efrap verify --json` of the FP model and the output;
- ``scan.json``: the scan's report, where the scan ran;
- ``result.json``, last: the figures the batch's table shows, the step that failed and its
  one-line error, times, sizes, and the key (model sha256 + settings) a re-run finds it by.

A failing step never raises out of `run_job`: its error is recorded and the result is
written, so a batch goes on with the next model. The runners give each job its share of
the machine with `limit_threads` and send its output to ``log.txt`` with `redirect_output`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.base.errors import EfrapError, one_line
from pipeline.base.onnx_io import model_files
from pipeline.base.progress import log
from pipeline.base.provenance import versions
from pipeline.base.safe_io import json_ready, write_json
from pipeline.batch.manifest import ModelJob
from pipeline.runner import defend_step, scan_step, verify_step
from pipeline.torch_backend import apply_threads
from validators.verify import VerifyReport

#: Version of result.json's layout.
RESULT_FORMAT = 1
RESULT_FILE = "result.json"
OUTPUT_FILE = "model.qdq.onnx"
LOG_FILE = "log.txt"
#: Every file a job writes, so a re-run can clear what an older run left.
JOB_FILES = (RESULT_FILE, OUTPUT_FILE, "summary.json", "verify_fp.json", "verify.json", "scan.json")


def limit_threads(threads: int) -> None:
    """Give this process `threads` threads of torch and of every onnxruntime session.

    Jobs that run side by side must not each take every core: torch's intra-op pool and
    onnxruntime's (whose default is one thread per core) would oversubscribe the machine.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise EfrapError(f"threads must be a positive integer, got {threads!r}")
    apply_threads(threads)


@contextlib.contextmanager
def redirect_output(path: Path, fd_level: bool = False) -> Iterator[None]:
    """Send stdout and stderr to the job's log file (appended).

    Args:
        path: The log file.
        fd_level: Also point file descriptors 1 and 2 at it, so native libraries'
            output goes there too (for a process that runs one job and exits).
    """
    with open(path, "a", encoding="utf-8", buffering=1) as fh:
        if fd_level:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
        with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            yield


def _figures(report: VerifyReport) -> dict[str, Any]:
    return {"clean_accuracy": report.clean_accuracy, "attack_success_rate": report.attack_success_rate,
            "attack_success_rate_all": report.attack.rate_all if report.attack else None,
            "images": report.images, "provider": report.provider}


def _bytes(path: str) -> int:
    return sum(p.stat().st_size for p in model_files(path))


def _scan(job: ModelJob, folder: Path) -> dict[str, Any]:
    """The scan's verdict and target, or why it did not run; never fails the model."""
    if not job.scan:
        return {"verdict": None, "target": None, "skipped": "scan = false in the manifest"}
    try:
        scanned = scan_step(Path(job.path), job.spec.scan_options())
        write_json(scanned.report.to_json(), folder / "scan.json")
    except Exception as exc:  # the scan's own failure is its column's, not the model's
        return {"verdict": None, "target": None, "error": one_line(f"{type(exc).__name__}: {exc}")}
    return {"verdict": scanned.report.verdict.verdict, "target": scanned.report.verdict.target}


def run_job(job: ModelJob, folder: str | Path, key: str | None, model_sha256: str | None,
            settings: dict[str, Any] | None, threads: int | None = None) -> dict[str, Any]:
    """Run one model through the scan, defend/quantize and verify, into `folder`.

    Args:
        job: The model and its settings.
        folder: Its output folder (exists).
        key: The key its result is stored under (None: the model or trigger could not
            be read, so it will run again next time).
        model_sha256: The model file's sha256 (None when unreadable).
        settings: The settings the key covers (recorded in the result).
        threads: Threads of torch and onnxruntime (None: leave them as they are).

    Returns:
        The result record as ``result.json`` (written last) holds it.
    """
    folder = Path(folder)
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    record: dict[str, Any] = {
        "format": RESULT_FORMAT, "name": job.name, "model": job.path, "model_sha256": model_sha256,
        "key": key, "settings": settings, "status": "error", "error": None, "failed_step": None,
        "step": job.step, "method": job.options.method, "scheme": job.scheme_spec,
        "trigger": job.trigger, "scan": None, "fp": None, "output": None, "check": None, "gate": None,
        "passed": None, "bytes": {}, "seconds": seconds, "threads": threads,
        "device": None, "worker": {"host": socket.gethostname(), "pid": os.getpid()},
    }
    step = "setup"
    try:
        if threads is not None:
            limit_threads(threads)
        step = "read"
        record["bytes"]["fp"] = _bytes(job.path)
        step = "scan"
        t0 = time.perf_counter()
        record["scan"] = _scan(job, folder)
        seconds["scan"] = round(time.perf_counter() - t0, 3)

        step = job.step
        log(f"{job.name}: {job.step} ({job.options.method}, scheme {job.scheme_spec})")
        t0 = time.perf_counter()
        output = folder / OUTPUT_FILE
        defended = defend_step(Path(job.path), output, job.options, job.guard)
        summary, check = defended.summary, defended.guard
        seconds["quantize"] = round(time.perf_counter() - t0, 3)
        seconds["calibration"] = round(summary.calibration_seconds, 3)
        seconds["rounding"] = round(summary.rounding_seconds, 3)
        write_json({**summary.to_json(), "guard": check.to_json() if check else None},
                   folder / "summary.json")
        record["device"] = summary.device
        record["bytes"]["output"] = output.stat().st_size
        record["check"] = check.to_json() if check else None

        step = "verify"
        verified = verify_step(output, job.spec.verify_options(), Path(job.path) if job.verify_fp else None)
        if verified.fp is not None and verified.fp_seconds is not None:
            write_json(verified.fp.to_json(), folder / "verify_fp.json")
            record["fp"] = _figures(verified.fp)
            seconds["verify_fp"] = round(verified.fp_seconds, 3)
        out = verified.output
        write_json(out.to_json(), folder / "verify.json")
        record["output"] = _figures(out)
        record["gate"] = None if out.gate is None else asdict(out.gate)
        seconds["verify"] = round(verified.seconds, 3)
        record["passed"] = (check is None or check.passed) and (out.gate is None or out.gate.passed)
        record["status"] = "done"
    except EfrapError as exc:
        record["failed_step"], record["error"] = step, one_line(str(exc))
        log(f"{job.name}: {step} failed: {record['error']}")
    except Exception as exc:  # a bug in one model's run must not stop the batch; the log has it all
        record["failed_step"] = step
        record["error"] = one_line(f"{type(exc).__name__}: {exc}")
        log(f"{job.name}: {step} failed:\n{traceback.format_exc()}")
    seconds["total"] = round(time.perf_counter() - start, 3)
    record["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record["versions"] = versions()
    write_json(record, folder / RESULT_FILE)
    return json_ready(record)  # type: ignore[return-value]  # as stored: lists, None for NaN
