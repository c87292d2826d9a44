"""The batch's output folder: a folder per model, the batch log, and which models a run skips.

Layout of ``--out``::

    batch.log            every run's decisions (skip, run, done, error), appended
    batch.lock           held while a batch runs here (a second batch on the folder is refused)
    results.csv/.json    the table of the last run (pipeline.batch.report)
    index.html
    <name>/              one folder per model (pipeline.batch.job: result.json and the rest)

A model is skipped when its ``result.json`` holds the key of the model file's sha256
and the settings it would run with now (`manifest.result_key`): a run that was
killed resumes with the models it had not finished, and a changed model or setting
runs again. A model whose stored result failed is skipped too, unless the run asks to
retry failed models.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipeline.base.errors import EfrapError, one_line
from pipeline.base.onnx_io import model_files
from pipeline.base.progress import log
from pipeline.base.safe_io import file_sha256, write_bytes, write_json
from pipeline.batch.job import JOB_FILES, LOG_FILE, RESULT_FILE, RESULT_FORMAT, scan_available
from pipeline.batch.manifest import Manifest, ModelJob, result_key

LOG_NAME = "batch.log"
LOCK_NAME = "batch.lock"


@dataclass(frozen=True)
class Task:
    """A model to run, with the key its result will be stored under.

    Attributes:
        job: The model and its settings.
        key: The result's key; None when the model or trigger could not be read (the
            job then fails with the reason, and runs again next time).
        model_sha256: The model file's sha256, or None.
        settings: The settings the key covers, or None.
    """

    job: ModelJob
    key: str | None
    model_sha256: str | None
    settings: dict[str, Any] | None


def task_for(job: ModelJob) -> Task:
    """The job with its key (model file sha256 + settings, external data and trigger included).

    A file that is there but is no ONNX model still has a key: its failure is stored and
    skipped like a result. A missing model or trigger file has none: it runs (and fails)
    every time, until the file is there.
    """
    try:
        sha = file_sha256(job.path)
        settings = job.settings(scan_available())
    except (EfrapError, OSError):
        return Task(job, None, None, None)  # the job reports the same problem as its error
    with contextlib.suppress(EfrapError, OSError):
        files = model_files(job.path)
        if len(files) > 1:
            settings["external_data"] = {str(p.relative_to(files[0].parent)): file_sha256(p)
                                         for p in files[1:]}
    return Task(job, result_key(sha, settings), sha, settings)


class BatchLog:
    """Lines to ``batch.log`` (timestamped) and to stderr."""

    def __init__(self, fh: TextIO) -> None:
        self._fh = fh

    def __call__(self, message: str) -> None:
        """Record one line."""
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self._fh.write(f"{stamp} {one_line(message)}\n")
        self._fh.flush()
        log(message)


class Store:
    """The output folder of one batch run (see the module docstring); made by `open_store`."""

    def __init__(self, root: Path, log: BatchLog) -> None:
        self.root = root
        self.log = log

    def folder(self, name: str) -> Path:
        """The model's folder."""
        return self.root / name

    def result(self, name: str) -> dict[str, Any] | None:
        """The stored result of a model, or None (none, unreadable, or another format)."""
        path = self.folder(name) / RESULT_FILE
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("format") != RESULT_FORMAT:
            return None
        return record

    def plan(self, manifest: Manifest, retry_failed: bool = False) -> tuple[list[Task], list[Task]]:
        """(tasks to run, tasks skipped because their result exists), logging each decision."""
        run, skip = [], []
        for job in manifest.jobs:
            task = task_for(job)
            stored = self.result(job.name)
            if task.key is not None and stored is not None and stored.get("key") == task.key:
                if stored.get("status") == "done" or not retry_failed:
                    self.log(f"skip {job.name}: a result exists for this model (sha256 "
                             f"{task.model_sha256[:12] if task.model_sha256 else '-'}) and settings (key "
                             f"{task.key[:12]}), {stored.get('status')} at {stored.get('finished')}")
                    skip.append(task)
                    continue
                self.log(f"retry {job.name}: its stored result failed ({stored.get('error')})")
            elif stored is not None:
                self.log(f"rerun {job.name}: the stored result is for another model file or other settings")
            run.append(task)
        return run, skip

    def prepare(self, name: str) -> Path:
        """The model's folder, emptied of what an earlier computation wrote."""
        folder = self.folder(name)
        folder.mkdir(exist_ok=True)
        for file in (*JOB_FILES, LOG_FILE):
            with contextlib.suppress(FileNotFoundError):
                (folder / file).unlink()
        return folder

    def write_files(self, name: str, files: dict[str, bytes]) -> None:
        """Write a job's files (from a Ray task) into its folder, the result last."""
        folder = self.folder(name)
        for file, data in sorted(files.items(), key=lambda item: item[0] == RESULT_FILE):
            if file not in (*JOB_FILES, LOG_FILE):
                raise EfrapError(f"{name}: a task returned an unexpected file '{one_line(file)}'")
            write_bytes(folder / file, data)

    def write_failure(self, task: Task, step: str, error: str) -> dict[str, Any]:
        """Record a job that ended without writing its result (its process died)."""
        record = {
            "format": RESULT_FORMAT, "name": task.job.name, "model": task.job.path,
            "model_sha256": task.model_sha256, "key": task.key, "settings": task.settings,
            "status": "error", "error": one_line(error), "failed_step": step, "step": task.job.step,
            "method": task.job.options.method, "scheme": task.job.scheme_spec, "trigger": task.job.trigger,
            "scan": None, "fp": None, "output": None, "check": None, "gate": None, "passed": None,
            "bytes": {}, "seconds": {}, "threads": None, "device": None, "worker": None,
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        write_json(record, self.folder(task.job.name) / RESULT_FILE)
        return record


@contextlib.contextmanager
def open_store(out: str | Path) -> Iterator[Store]:
    """Create (or reopen) the output folder and hold its lock for the run.

    Raises:
        EfrapError: the path is not a folder, its parent is missing, or another batch
            holds the folder.
    """
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise EfrapError(f"{root}: --out must be a folder")
    if not root.parent.is_dir():
        raise EfrapError(f"{root}: folder {root.parent} does not exist")
    root.mkdir(exist_ok=True)
    with open(root / LOCK_NAME, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise EfrapError(f"{root}: another efrap batch is running on this folder (pid "
                             f"{one_line(lock.read().strip()) or 'unknown'})") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        with open(root / LOG_NAME, "a", encoding="utf-8") as fh:
            yield Store(root, BatchLog(fh))
