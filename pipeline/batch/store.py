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

Before anything is created or deleted, `check_out` refuses an output folder that
would destroy an input: a model, trigger, scheme or data file of the manifest (or the
manifest itself) inside a model's folder (which the batch empties) or in the place of
one of the batch's own files (``results.json`` over the manifest), a data folder
that holds the output folder, a symbolic link as the folder, and a batch file that is
not a regular file (``batch.lock`` as a folder).
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

from pipeline.base.data import spec_files
from pipeline.base.errors import EfrapError, one_line
from pipeline.base.onnx_io import model_files
from pipeline.base.progress import log
from pipeline.base.safe_io import (
    check_output_folder,
    check_outputs,
    file_sha256,
    inside,
    same_file,
    write_bytes,
    write_json,
)
from pipeline.base.trigger import trigger_files
from pipeline.batch.job import JOB_FILES, LOG_FILE, RESULT_FILE, RESULT_FORMAT
from pipeline.batch.manifest import Manifest, ModelJob, result_key, scheme_path

LOG_NAME = "batch.log"
LOCK_NAME = "batch.lock"
#: The tables of the last run (pipeline.batch.report).
SUMMARY_FILES = ("results.csv", "results.json", "index.html")
#: Every file the batch writes at the top of --out.
TOP_FILES = (LOG_NAME, LOCK_NAME, *SUMMARY_FILES)


def _job_inputs(job: ModelJob) -> list[Path]:
    """Every file or folder the job reads (what exists of it; a missing file fails the job later)."""
    found: list[Path] = []
    for files in (lambda: model_files(job.path), lambda: trigger_files(job.trigger) if job.trigger else [],
                  lambda: spec_files(job.data), lambda: spec_files(job.options.calib)):
        try:
            found += [Path(p) for p in files()]
        except (EfrapError, OSError):
            continue
    found += [Path(job.path)] + ([Path(job.trigger)] if job.trigger else [])
    return found


def manifest_inputs(manifest: Manifest) -> list[Path]:
    """The manifest file and everything its models read."""
    inputs = [Path(manifest.source)]
    for job in manifest.jobs:
        inputs += _job_inputs(job)
        path = scheme_path(job.scheme_spec, manifest.source)
        if path is not None:
            inputs.append(path)
    return inputs


def check_out(manifest: Manifest, out: str | Path) -> Path:
    """Refuse an output folder that would overwrite or delete an input (module docstring).

    Raises:
        EfrapError: one line naming the input and the output that would destroy it.
    """
    root = check_output_folder(out, "--out")
    inputs = manifest_inputs(manifest)
    for src in inputs:
        if src.is_dir() and (same_file(root, src) or inside(root, src)):
            raise EfrapError(f"{root}: --out would write inside the input folder {src}")
    if root.is_dir():
        check_outputs({f"--out's {name}": root / name for name in TOP_FILES}, inputs)
    for job in manifest.jobs:
        folder = root / job.name
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise EfrapError(f"{folder}: the output folder of model '{job.name}' is not a folder; "
                             "move it away or choose another --out")
        for src in inputs:
            if same_file(src, folder) or inside(src, folder):
                raise EfrapError(f"{src}: an input of the batch lies in {folder}, the output folder of "
                                 f"model '{job.name}', which the batch empties; move it or choose another "
                                 "--out")
    return root


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
        settings = job.settings()
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
def open_store(out: str | Path, manifest: Manifest | None = None) -> Iterator[Store]:
    """Create (or reopen) the output folder and hold its lock for the run.

    Args:
        out: The output folder.
        manifest: The batch's manifest: its inputs are checked against the folder first
            (`check_out`), before anything is created.

    Raises:
        EfrapError: the path is not a folder, its parent is missing, it would destroy an
            input, or another batch holds the folder.
    """
    root = check_out(manifest, out) if manifest is not None else check_output_folder(out, "--out")
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
