"""Run a batch on a Ray cluster: one Ray task per model, results in the same layout as a local run.

Ray is an optional extra (the wheel's ``[ray]``, or ``pip install 'ray>=2.60'``); it is imported only here,
inside the functions that use it. Each task runs `run_job` in a temporary folder on
its worker and returns the files it wrote; the driver writes them into ``--out``,
the result last, so the output folder need not be shared with the workers. The
models, triggers and data the manifest names must be readable at the same paths on
every node (a shared file system), and efrap-onnx installed there.

A task asks for ``threads`` CPUs, and for a GPU when its method learns the rounding
(torch work) and the cluster has GPUs; nearest rounding never holds a GPU. A worker
that dies while it runs a task (killed, out of memory, its node lost) makes Ray run
the task again, up to `max_retries` times; the task starts from the beginning in a
fresh temporary folder, so nothing it half wrote is kept.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.base.errors import EfrapError, one_line
from pipeline.base.progress import Progress
from pipeline.batch.job import JOB_FILES, LOG_FILE, redirect_output, run_job
from pipeline.batch.manifest import Manifest, ModelJob
from pipeline.batch.report import BatchRun, finish, summary_line
from pipeline.batch.store import Store, Task, open_store

#: Times Ray runs a task again after its worker died (Ray's default is 3).
MAX_RETRIES = 3


def efrap_batch_model(task: Task, threads: int) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The Ray task (its worker's process title is ``ray::efrap_batch_model``): one model.

    Returns:
        The result record and every file the job wrote, by name.
    """
    with tempfile.TemporaryDirectory(prefix="efrap-batch-") as tmp:
        folder = Path(tmp)
        with redirect_output(folder / LOG_FILE):
            record = run_job(task.job, folder, task.key, task.model_sha256, task.settings, threads)
        files = {p.name: p.read_bytes() for p in folder.iterdir()
                 if p.is_file() and p.name in (*JOB_FILES, LOG_FILE)}
    return record, files


def task_resources(job: ModelJob, threads: int, cluster_gpus: float, gpus_per_task: float = 1.0
                   ) -> dict[str, float]:
    """What one model's task asks Ray for: `threads` CPUs, and a GPU for learned rounding.

    A GPU is asked for only when the method learns the rounding from data (torch runs
    the layer's reconstruction), the job may use CUDA (device auto or cuda) and the
    cluster has at least `gpus_per_task` GPUs.
    """
    wants_gpu = job.learned and job.options.device != "cpu" and cluster_gpus >= gpus_per_task > 0
    return {"num_cpus": threads, "num_gpus": gpus_per_task if wants_gpu else 0}


def run_ray(manifest: Manifest, out: str | Path, address: str | None = "auto", threads: int = 1,
            retry_failed: bool = False, max_retries: int = MAX_RETRIES, gpus_per_task: float = 1.0,
            ) -> BatchRun:
    """Run the batch as Ray tasks.

    Args:
        manifest: The checked manifest.
        out: Output folder on the driver (created; a folder from an earlier run is resumed).
        address: Ray address ("auto": the running cluster; "local": start Ray on this
            machine; or ``ray://host:port``, ``host:port``). Ignored when Ray is already
            initialized in this process (the caller's cluster is used as it is).
        threads: CPUs each task asks for, and its torch and onnxruntime threads.
        retry_failed: Run again the models whose stored result failed.
        max_retries: Times a task runs again after its worker died.
        gpus_per_task: GPUs a learned-rounding task asks for when the cluster has GPUs.

    Raises:
        EfrapError: Ray is not installed, or cannot connect.
    """
    try:
        import ray
    except ImportError:
        raise EfrapError("--ray needs Ray: pip install 'ray>=2.60' (the wheel's [ray] extra)") from None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise EfrapError(f"--threads must be a positive integer, got {threads!r}")
    started = time.perf_counter()
    with open_store(out, manifest) as store:
        tasks, skipped = store.plan(manifest, retry_failed)
        ours = not ray.is_initialized()
        if ours:
            try:
                ray.init(address=None if address == "local" else address, include_dashboard=False,
                         log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise EfrapError(f"cannot start or reach Ray at '{address}' ({one_line(str(exc))})") from None
        try:
            gpus = float(ray.cluster_resources().get("GPU", 0))
            store.log(f"batch {manifest.source}: {len(manifest.jobs)} models as Ray tasks ({threads} CPUs "
                      f"each, {gpus:g} GPUs in the cluster, up to {max_retries} retries)")
            bar = Progress(f"batch {Path(manifest.source).name}", total=len(manifest.jobs))
            bar.update(len(skipped), f"{len(skipped)} skipped")
            computed = _run(ray, store, tasks, threads, gpus, gpus_per_task, max_retries, bar)
            bar.close(f"{len(computed)} computed, {len(skipped)} skipped")
        finally:
            if ours:
                ray.shutdown()
        return finish(store, manifest, f"ray {address}, {threads} CPUs per task", computed,
                      [t.job.name for t in skipped], started)


def _run(ray: Any, store: Store, tasks: list[Task], threads: int, gpus: float, gpus_per_task: float,
         max_retries: int, bar: Progress) -> list[str]:
    """Submit every task, write each one's files as it finishes; returns the names computed."""
    remote = ray.remote(efrap_batch_model)
    refs: dict[Any, Task] = {}
    for task in tasks:
        store.prepare(task.job.name)
        resources = task_resources(task.job, threads, gpus, gpus_per_task)
        refs[remote.options(max_retries=max_retries, **resources).remote(task, threads)] = task
        store.log(f"submit {task.job.name} ({resources['num_cpus']:g} CPUs, {resources['num_gpus']:g} GPUs)")
    done: list[str] = []
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            task = refs.pop(ready[0])
            try:
                record, files = ray.get(ready[0])
                store.write_files(task.job.name, files)
            except ray.exceptions.RayError as exc:
                # The worker died more often than max_retries allows, or the task could not run.
                record = store.write_failure(task, "ray", f"{type(exc).__name__}: "
                                             f"{one_line(str(exc)).split(' Some common causes')[0][:500]}")
            store.log(summary_line(record))
            done.append(task.job.name)
            bar.update(1, f"{task.job.name}: {record['status']}")
    finally:
        if refs:
            store.log(f"batch stopped with {len(refs)} models unfinished; run it again to resume")
            for ref in refs:
                ray.cancel(ref, force=True)
    return done
