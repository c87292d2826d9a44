"""Progress of passes over images (verification, the check, the scan, the sampler): silent when
quick, a line with the ETA at least every LOG_EVERY seconds when long and not on a terminal."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.base import progress
from pipeline.base.runtime import make_session


def test_a_long_pass_shows_its_eta_and_a_quick_one_stays_silent(
        tiny_model: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(progress, "_quiet", False)
    session = make_session(tiny_model, provider="cpu")  # type: ignore[arg-type]
    x = np.zeros((40, 1, 28, 28), np.float32)
    session.run(x, batch_size=10, desc="verify: m.onnx on clean test images")
    assert capsys.readouterr().err == ""
    # Every chunk takes 40 s on this clock: past LOG_EVERY, each prints its line with the ETA.
    now = [0.0]

    def clock() -> float:
        now[0] += 20.0
        return now[0]

    monkeypatch.setattr(progress.time, "perf_counter", clock)
    session.run(x, batch_size=10, desc="verify: m.onnx on clean test images")
    lines = capsys.readouterr().err.splitlines()
    assert any("verify: m.onnx on clean test images [" in line and "ETA " in line for line in lines)
    assert lines[-1].startswith("verify: m.onnx on clean test images: done in ")
