"""`efrap demo`: its table, and its EFRAP model is the one `efrap defend` writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.zoo import default_entry, zoo_path
from pipeline.cli.main import main


def test_demo_defense_is_what_defend_writes(fashion_mnist: None, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    entry = default_entry()
    assert entry.kind == "qcb" and entry.scheme == "w4a4"
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    assert main(["demo", "--iters", "30", "--num-calib", "256", "--out-dir", str(demo_dir)]) == 0
    out = capsys.readouterr().out
    for row in ("full precision", "nearest w8a8", "nearest w4a4", "efrap default w4a4"):
        assert row in out
    assert "agrees with full precision on" in out
    defended = tmp_path / "defended.onnx"
    assert main(["defend", str(zoo_path(entry)), "--iters", "30", "--num-calib", "256", "--seed", "0",
                 "-o", str(defended)]) == 0
    demo_model = demo_dir / f"{entry.name}.efrap.w4a4.onnx"
    assert demo_model.read_bytes() == defended.read_bytes()
