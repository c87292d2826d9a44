"""Run `efrap` (or any Python entry point) as a child process and measure it.

Wall time, exit code, the child's own peak resident memory and its last output line
(the one-line error of a failed run). The peak is the child's VmHWM from
/proc/PID/status, read while it runs: rusage's ru_maxrss of a forked child starts at
the parent's size (a parent holding torch and data would inflate every figure),
while VmHWM belongs to the program the child executes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ChildRun:
    """What one child process did."""

    exit: int
    seconds: float
    peak_mib: int
    last_line: str

    def to_json(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def run_child(argv: list[str], log: Path, threads: int = 1, timeout: float | None = None) -> ChildRun:
    """Run `python ARGV...` from the repository root, output to `log`.

    Args:
        argv: Arguments after the interpreter (e.g. ["-m", "pipeline.cli.main", "quantize", ...]).
        log: File that receives stdout and stderr.
        threads: OMP_NUM_THREADS of the child (torch's threads).
        timeout: Seconds after which the child is killed (exit -9).
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)
        deadline = None if timeout is None else t0 + timeout
        peak_kib = 0
        while True:
            peak_kib = max(peak_kib, _high_water_kib(proc.pid))
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                _, status, _ = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return ChildRun(proc.returncode, round(time.perf_counter() - t0, 1), round(peak_kib / 1024),
                    lines[-1] if lines else "")


def _high_water_kib(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM, KiB); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
