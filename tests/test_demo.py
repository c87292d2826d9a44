"""`efrap demo`: its table, and its EFRAP model is the one `efrap defend` writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from models.zoo import default_entry, zoo_path
from pipeline.base.errors import EfrapError
from pipeline.cli.commands import demo
from pipeline.cli.main import main
from pipeline.quantize import quantize_file


def test_demo_defense_is_what_defend_writes(fashion_mnist: None, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    entry = default_entry()
    assert entry.kind == "qcb" and entry.scheme == "w4a4"
    demo_dir = tmp_path / "demo"  # new: --out-dir makes it
    assert main(["demo", "--iters", "30", "--num-calib", "256", "--out-dir", str(demo_dir)]) == 0
    out = capsys.readouterr().out
    for row in ("full precision", "nearest w8a8", "nearest w4a4", "efrap default w4a4"):
        assert row in out
    assert "agrees with full precision on" in out
    defended = tmp_path / "defended.onnx"
    assert main(["defend", str(zoo_path(entry)), "--scheme", entry.scheme,
                 "--iters", "30", "--num-calib", "256", "--seed", "0",
                 "-o", str(defended)]) == 0
    demo_model = demo_dir / f"{entry.name}.efrap.w4a4.onnx"
    assert demo_model.read_bytes() == defended.read_bytes()


def test_demo_prints_each_row_as_soon_as_it_exists(fashion_mnist: None, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def quantize_then_stop(*args: object, **kwargs: object) -> object:
        # The second quantization never ends: what the demo measured before it must be out.
        calls.append(args)
        if len(calls) == 2:
            raise EfrapError("stopped by the test")
        return quantize_file(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(demo, "quantize_file", quantize_then_stop)
    assert main(["demo", "--num-calib", "64"]) == 2
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"demo: [^:]+: clean accuracy \d", line)]
    assert [row.split(":")[1].strip() for row in rows] == ["full precision", "nearest w8a8"]
    assert re.search(r"full precision: clean accuracy \d+\.\d+%, attack success \d+\.\d+%", rows[0])
    assert not re.search(r"^model +clean accuracy +attack success", out, re.M)  # the table comes last
