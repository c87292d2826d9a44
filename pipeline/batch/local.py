"""Run a batch on this machine: each model in its own process, `jobs` of them side by side.

Each job is a fresh process (multiprocessing's spawn: nothing inherited from the
batch's own torch or onnxruntime state) with ``cores // jobs`` threads of torch and
onnxruntime, so jobs that run together do not fight over the cores. A job that dies
(killed, out of memory, a crash in native code) is recorded as that model's error and
the batch goes on. When the batch itself is stopped (SIGTERM, Ctrl-C) it ends its jobs;
when it is killed outright, its jobs die with it (Linux: PR_SET_PDEATHSIG), so a resumed
run never races a job left over from the killed one.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from pipeline.base.errors import EfrapError
from pipeline.base.progress import Progress
from pipeline.base.threads import env_threads
from pipeline.batch.job import LOG_FILE, redirect_output, run_job
from pipeline.batch.manifest import Manifest
from pipeline.batch.report import BatchRun, finish, summary_line
from pipeline.batch.store import Store, Task, open_store

#: Seconds a stopped job has to exit after SIGTERM before it is killed.
STOP_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1


def cores() -> int:
    """CPU cores this process may use (its affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_job(jobs: int, threads: int | None = None) -> int:
    """`threads` when given, else `OMP_NUM_THREADS`, else the cores shared out among `jobs`
    (at least 1 each)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise EfrapError(f"--jobs must be a positive integer, got {jobs!r}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise EfrapError(f"--threads must be a positive integer, got {threads!r}")
        return threads
    return env_threads() or max(1, cores() // jobs)


def _die_with_parent(parent: int) -> None:
    """Be killed when the batch process dies (Linux), and leave now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # elsewhere an orphaned job finishes its model; its result is then reused
    if os.getppid() != parent:
        os._exit(1)


def _child(task: Task, folder: str, threads: int, parent: int) -> None:
    """The job process: one model, its output in the model's log file."""
    _die_with_parent(parent)
    with redirect_output(Path(folder) / LOG_FILE, fd_level=True):
        run_job(task.job, folder, task.key, task.model_sha256, task.settings, threads)


def _stop(running: dict[int, tuple[BaseProcess, Task]]) -> None:
    """End the jobs still running: SIGTERM, then SIGKILL after the grace period."""
    for process, _ in running.values():
        process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for process, _ in running.values():
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def run_tasks(store: Store, tasks: list[Task], jobs: int, threads: int, bar: Progress) -> list[str]:
    """Run `tasks`, `jobs` at a time, each in its own process; returns the names computed."""
    context = multiprocessing.get_context("spawn")
    pending = list(tasks)
    running: dict[int, tuple[BaseProcess, Task]] = {}
    done: list[str] = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                task = pending.pop(0)
                folder = store.prepare(task.job.name)
                process = context.Process(target=_child, args=(task, str(folder), threads, os.getpid()),
                                          name=f"efrap-batch-{task.job.name}", daemon=True)
                process.start()
                running[process.sentinel] = (process, task)
                store.log(f"start {task.job.name} (pid {process.pid}, {threads} threads)")
            for sentinel in wait(list(running)):
                process, task = running.pop(sentinel)  # type: ignore[arg-type]
                process.join()
                record = store.result(task.job.name)
                if record is None or record.get("key") != task.key:
                    how = f"signal {-process.exitcode}" if (process.exitcode or 0) < 0 \
                        else f"exit code {process.exitcode}"
                    record = store.write_failure(task, "process", f"the job's process ended with {how} "
                                                 f"before writing a result (see {LOG_FILE})")
                store.log(summary_line(record))
                done.append(task.job.name)
                bar.update(1, f"{task.job.name}: {record['status']}")
    finally:
        if running:
            store.log(f"batch stopped with {len(running) + len(pending)} models unfinished "
                      f"({', '.join(t.job.name for _, t in running.values())} running); run it again to "
                      "resume")
            _stop(running)
    return done


def run_local(manifest: Manifest, out: str | Path, jobs: int = 1, threads: int | None = None,
              retry_failed: bool = False) -> BatchRun:
    """Run the batch on this machine.

    Args:
        manifest: The checked manifest.
        out: Output folder (created; a folder from an earlier run is resumed).
        jobs: Models run side by side, each in its own process.
        threads: Threads of torch and onnxruntime per job (None: cores // jobs).
        retry_failed: Run again the models whose stored result failed.

    Returns:
        The run, after results.csv, results.json and index.html are written.
    """
    threads = threads_per_job(jobs, threads)
    started = time.perf_counter()
    with open_store(out, manifest) as store:
        store.log(f"batch {manifest.source}: {len(manifest.jobs)} models, up to {jobs} at a time with "
                  f"{threads} threads each ({cores()} cores)")
        tasks, skipped = store.plan(manifest, retry_failed)
        bar = Progress(f"batch {Path(manifest.source).name}", total=len(manifest.jobs))
        bar.update(len(skipped), f"{len(skipped)} skipped")
        computed = run_tasks(store, tasks, jobs, threads, bar)
        bar.close(f"{len(computed)} computed, {len(skipped)} skipped")
        return finish(store, manifest, f"local, {jobs} jobs x {threads} threads", computed,
                      [t.job.name for t in skipped], started)
