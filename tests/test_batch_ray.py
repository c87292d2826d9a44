"""`efrap batch --ray`: three tiny models as Ray tasks on a local Ray instance, one worker killed midway.

Ray is in the dev extra, so CI has it: there a missing Ray fails this test instead of
skipping it. The whole test runs under an alarm, so a Ray that hangs fails it too.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType, ModuleType

import numpy as np
import pytest
import torch

from pipeline.base.runtime import make_session
from pipeline.base.trigger import paper_trigger, save_trigger
from pipeline.batch import load_manifest, run_job, run_ray
from pipeline.batch.store import task_for
from tests.conftest import export_tiny

#: Seconds the whole test may take before the alarm fails it.
TIMEOUT_S = 170
MANIFEST = """
[defaults]
data = "npz:data.npz"
num_calib = 64
holdout = 64
scan = false
method = "efrap"
scheme = "w4a4"
[defaults.rounding]
iters = 150
batch_size = 8

[[model]]
path = "m0.onnx"
trigger = "trigger.json"

[[model]]
path = "m1.onnx"
trigger = "trigger.json"

[[model]]
path = "m2.onnx"
verify_fp = false
"""
FILES = {"result.json", "model.qdq.onnx", "summary.json", "verify.json", "verify_fp.json", "log.txt"}


def _ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        message = "ray is not installed (it is in the dev extra: pip install -e '.[dev]')"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return ray


def _task_processes() -> list[int]:
    """Pids of Ray workers running a batch task (Ray titles them ray::<function>)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::efrap_batch_model"):
            pids.append(int(entry))
    return sorted(pids)


def _kill_one_midway(killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the worker of the first task seen, once it has been computing for a second."""
    while not stop.is_set():
        pids = _task_processes()
        if pids:
            time.sleep(1.0)
            if pids[0] in _task_processes():
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
        time.sleep(0.1)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _timeout(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError(f"the Ray batch test took more than {TIMEOUT_S}s")


def test_ray_batch_survives_a_killed_worker(tmp_path: Path) -> None:
    ray = _ray()
    for i in range(3):
        export_tiny(tmp_path / f"m{i}.onnx", seed=i)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz",
             x_train=rng.integers(0, 256, (160, 1, 28, 28), dtype=np.uint8), y_train=rng.integers(0, 10, 160),
             x_test=rng.integers(0, 256, (96, 1, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 96))
    save_trigger(paper_trigger(28, target=0), tmp_path / "trigger.json")
    (tmp_path / "batch.toml").write_text(MANIFEST)
    manifest = load_manifest(tmp_path / "batch.toml")
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(TIMEOUT_S)
    before_torch, before_defaults = torch.get_num_threads(), make_session.__defaults__
    try:
        # What each model gives when run alone, with the tasks' one thread.
        expected = {}
        for job in manifest.jobs:
            folder = tmp_path / "alone" / job.name
            folder.mkdir(parents=True)
            task = task_for(job)
            expected[job.name] = run_job(job, folder, task.key, task.model_sha256, task.settings, threads=1)
            expected[job.name]["sha"] = _sha(folder / "model.qdq.onnx")
        torch.set_num_threads(before_torch)
        make_session.__defaults__ = before_defaults

        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
                 object_store_memory=200 * 1024**2)
        killed: list[int] = []
        stop = threading.Event()
        killer = threading.Thread(target=_kill_one_midway, args=(killed, stop), daemon=True)
        killer.start()
        out = tmp_path / "out"
        try:
            run = run_ray(manifest, out, address=None, threads=1)
        finally:
            stop.set()
            killer.join()
        assert killed, "no Ray task was seen running, so none was killed"
        assert sorted(run.computed) == ["m0", "m1", "m2"] and not run.skipped
        for job in manifest.jobs:
            record, alone = next(r for r in run.records if r["name"] == job.name), expected[job.name]
            assert record["status"] == "done", record["error"]
            assert record["worker"]["pid"] not in killed  # the killed task ran again elsewhere
            assert {p.name for p in (out / job.name).iterdir()} == \
                (FILES - {"verify_fp.json"} if job.name == "m2" else FILES)
            assert record["key"] == alone["key"]
            for figures in ("output", "fp", "check"):
                assert record[figures] == alone[figures], (job.name, figures)
            assert _sha(out / job.name / "model.qdq.onnx") == alone["sha"]
        log = (out / "batch.log").read_text()
        assert all(f"submit {name} (1 CPUs, 0 GPUs)" in log for name in ("m0", "m1", "m2"))

        # Run again: every result is there, so nothing is submitted.
        again = run_ray(manifest, out, address=None, threads=1)
        assert not again.computed and sorted(again.skipped) == ["m0", "m1", "m2"]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        torch.set_num_threads(before_torch)
        make_session.__defaults__ = before_defaults
        if ray.is_initialized():
            ray.shutdown()
