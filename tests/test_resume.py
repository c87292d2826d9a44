"""A killed run with learned rounding resumes from its last finished layer, to the same bytes.

Also: a checkpoint made with other settings is not used, a checkpoint path that is in
the way is refused before anything is written, `--no-resume` keeps none, and thread
counts reach torch and onnxruntime from `--threads` and `OMP_NUM_THREADS`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import quantize as quantize_mod
from pipeline.base import progress as progress_mod
from pipeline.base.deployment import Deployment
from pipeline.base.errors import EfrapError
from pipeline.base.scheme import load_scheme
from pipeline.base.threads import env_threads, resolve_threads, session_threads
from pipeline.batch.local import threads_per_job
from pipeline.checkpoint import KEY_FILE, checkpoint_folder
from pipeline.cli.main import main
from pipeline.quantize import QuantizeOptions, quantize_file
from pipeline.rounding import EfrapConfig
from pipeline.torch_backend import apply_threads
from tests.conftest import export_tiny

pytestmark = pytest.mark.usefixtures("fashion_mnist")

ROOT = Path(__file__).resolve().parent.parent


def _options(seed: int = 0) -> QuantizeOptions:
    return QuantizeOptions(Deployment(scheme=load_scheme("w4a4"), data="fashion-mnist", num_calib=64,
                                      seed=seed),
                           method="efrap", rounding=EfrapConfig(iters=30, batch_size=16))


class _Killed(Exception):
    """Stands for a kill between two layers."""


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, layer: int) -> None:
    """Make `_Rounder.round` die when it reaches `layer` (1-based), as a kill would."""
    original = quantize_mod._Rounder.round

    def round_until(self: quantize_mod._Rounder, index: int, plan_layer: object) -> object:
        if index == layer:
            raise _Killed
        return original(self, index, plan_layer)

    monkeypatch.setattr(quantize_mod._Rounder, "round", round_until)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return export_tiny(tmp_path / "tiny.onnx")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Same thread count in every run of a test: float sums depend on it.
    before = torch.get_num_threads()
    apply_threads(1)
    yield
    torch.set_num_threads(before)
    apply_threads(None)


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path: Path, tiny: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    whole = tmp_path / "whole.onnx"
    summary, _ = quantize_file(str(tiny), str(whole), _options())
    assert summary.resumed == 0
    assert not checkpoint_folder(whole).exists(), "the checkpoint is removed once the output is written"

    out = tmp_path / "resumed.onnx"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 4)
        with pytest.raises(_Killed):
            quantize_file(str(tiny), str(out), _options())
    folder = checkpoint_folder(out)
    assert not out.exists()
    assert sorted(p.name for p in folder.iterdir()) == [
        KEY_FILE, "layer-00001.npz", "layer-00002.npz", "layer-00003.npz"]

    summary, _ = quantize_file(str(tiny), str(out), _options())
    assert summary.resumed == 3
    assert out.read_bytes() == whole.read_bytes()
    assert not folder.exists()


def test_checkpoint_of_other_settings_is_not_used(tmp_path: Path, tiny: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.onnx"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3)
        with pytest.raises(_Killed):
            quantize_file(str(tiny), str(out), _options(seed=0))
    summary, _ = quantize_file(str(tiny), str(out), _options(seed=1))
    assert summary.resumed == 0
    fresh = tmp_path / "fresh.onnx"
    quantize_file(str(tiny), str(fresh), _options(seed=1))
    assert out.read_bytes() == fresh.read_bytes()


def test_damaged_layer_file_is_computed_again(tmp_path: Path, tiny: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    whole = tmp_path / "whole.onnx"
    quantize_file(str(tiny), str(whole), _options())
    out = tmp_path / "out.onnx"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3)
        with pytest.raises(_Killed):
            quantize_file(str(tiny), str(out), _options())
    (checkpoint_folder(out) / "layer-00002.npz").write_bytes(b"not an npz")
    summary, _ = quantize_file(str(tiny), str(out), _options())
    assert summary.resumed == 1
    assert out.read_bytes() == whole.read_bytes()


def test_no_resume_keeps_no_checkpoint(tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.onnx"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3)
        with pytest.raises(_Killed):
            quantize_file(str(tiny), str(out), _options(), resume=False)
    assert not checkpoint_folder(out).exists()


@pytest.mark.parametrize("kind", ["file", "foreign folder", "symlink"])
def test_checkpoint_path_in_the_way_is_refused(tmp_path: Path, tiny: Path, kind: str) -> None:
    out = tmp_path / "out.onnx"
    folder = checkpoint_folder(out)
    if kind == "file":
        folder.write_text("mine")
    elif kind == "foreign folder":
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    else:
        (tmp_path / "elsewhere").mkdir()
        folder.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(EfrapError, match=r"out\.onnx\.ckpt"):
        quantize_file(str(tiny), str(out), _options())
    assert not out.exists()
    if kind == "foreign folder":
        assert (folder / "notes.txt").read_text() == "mine"


def _defend(model: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli.main", "defend", str(model), "-o", str(out), "--scheme", "w4a4",
         "--iters", "300",
         "--batch-size", "16", "--num-calib", "64", "--holdout", "100", "--threads", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_defend_resumes_to_the_same_bytes(tmp_path: Path, tiny: Path) -> None:
    """A real SIGKILL of `efrap defend` between layers, then the same command again."""
    whole = tmp_path / "whole.onnx"
    run = _defend(tiny, whole)
    log, _ = run.communicate(timeout=600)
    assert run.returncode == 0, log

    out = tmp_path / "killed.onnx"
    folder = checkpoint_folder(out)
    run = _defend(tiny, out)
    deadline = time.monotonic() + 600
    while not (folder / "layer-00002.npz").exists():
        assert run.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    assert not out.exists()

    run = _defend(tiny, out)
    log, _ = run.communicate(timeout=600)
    assert run.returncode == 0, log
    assert "resumed: " in log and "layers restored from the checkpoint" in log
    assert out.read_bytes() == whole.read_bytes()
    assert not folder.exists()


def test_threads_from_option_and_environment(tmp_path: Path, tiny: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert env_threads() == 3 and resolve_threads(None) == 3 and resolve_threads(2) == 2
    assert threads_per_job(2) == 3 and threads_per_job(2, 1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(EfrapError, match="OMP_NUM_THREADS"):
        env_threads()
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert main(["quantize", str(tiny), "-o", str(tmp_path / "q.onnx"), "--num-calib", "16",
                 "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2 and session_threads() == 2
    assert main(["quantize", str(tiny), "-o", str(tmp_path / "q.onnx"), "--threads", "0"]) == 2


def test_progress_lines_outside_a_terminal_show_the_eta(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(progress_mod, "_quiet", False)
    monkeypatch.setattr(progress_mod, "LOG_GAP", 0.0)
    clock = progress_mod.RunClock([1.0, 1.0, 1.0])
    clock.finish(0, 10.0)
    bar = progress_mod.Progress("layer 2/3", total=100,
                                run_remaining=lambda f, e: clock.remaining(1, f, e))
    time.sleep(0.01)
    bar.update(50)
    err = capsys.readouterr().err
    assert "layer 2/3" in err and "50/100" in err and "ETA " in err and "run " in err
    # Half of layer 2 after 10 s on layer 1: the run's pace is (10 + e) / 1.5 per layer.
    assert clock.remaining(1, 0.5, 5.0) == pytest.approx(10.0 * 1.5)
    assert progress_mod.format_seconds(61.2) == "1m02s" and progress_mod.format_seconds(None) == "?"
    assert np.isclose(progress_mod.stage_remaining(25, 100, 5.0), 15.0)
