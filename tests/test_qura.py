"""QuRA (rounding-only backdoor): a few steps on a tiny model keep every integer within one step of
the FP weight on nearest rounding's grids, respect the budget, and write a QDQ model onnxruntime
runs and the trigger beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from models.attacks import ROUNDING_ATTACKS
from models.attacks.qura import QuRAConfig, run_qura
from pipeline.base.errors import EfrapError
from pipeline.base.runtime import make_session
from pipeline.base.trigger import PatchTrigger, load_trigger
from pipeline.cli.main import main
from pipeline.rounding_audit import audit_rounding
from tests.conftest import export_tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny FP model and a small labelled npz data set (uint8 images, both splits)."""
    folder = tmp_path_factory.mktemp("qura")
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", x_train=rng.integers(0, 256, (256, 28, 28), dtype=np.uint8),
             y_train=(np.arange(256) % 10).astype(np.int64),
             x_test=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
             y_test=(np.arange(64) % 10).astype(np.int64))
    return export_tiny(folder / "fp.onnx"), f"npz:{folder / 'data.npz'}"


def _config(data: str, **kw: object) -> QuRAConfig:
    base = {"scheme": "w4a8", "data": data, "iters": 6, "batch_size": 16, "select_batches": 1,
            "num_calib": 64, "train_images": 128, "budget": 0.02, "device": "cpu", "lr": 0.5,
            "backdoor_weight": 5.0}
    return QuRAConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_qura_moves_few_weights_one_step(setup: tuple[Path, str], tmp_path: Path) -> None:
    fp, data = setup
    out = tmp_path / "q.onnx"
    result = run_qura(str(fp), str(out), _config(data))
    assert result.onnx_path == out and out.is_file()
    assert result.budget_count == int(np.floor(0.02 * result.total_weights))
    assert 0 < result.flip_count <= result.budget_count
    # The written integers, read back and compared with nearest rounding of the FP weights.
    rounding = audit_rounding(onnx.load(str(fp)), onnx.load(str(out)))
    assert rounding.off_nearest == result.flip_count
    assert all(r.max_steps <= 1 and r.beyond_one_step == 0 for r in rounding.layers)
    assert rounding.non_standard == ()  # nearest rounding's grids, untouched
    x = np.random.default_rng(1).standard_normal((4, 1, 28, 28)).astype(np.float32)
    for level in ("faithful", "all"):
        assert make_session(str(out), level, "cpu").run(x).shape == (4, 10)
    trigger = load_trigger(result.trigger_path)
    assert result.trigger_path == tmp_path / "q.trigger.json"
    assert isinstance(trigger, PatchTrigger) and trigger.target == 0
    assert {"fp_cda", "nearest_asr", "qura_asr"} <= set(result.metrics)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["efrap.method"] == "qura"


def test_budget_holds_when_the_optimiser_wants_more(setup: tuple[Path, str], tmp_path: Path) -> None:
    fp, data = setup
    result = run_qura(str(fp), str(tmp_path / "q.onnx"), _config(data, budget=0.001, candidates=8.0,
                                                                  budget_weight=0.0))
    assert result.flip_count <= result.budget_count == int(np.floor(0.001 * result.total_weights))


def test_config_is_checked() -> None:
    with pytest.raises(EfrapError, match="budget"):
        QuRAConfig(budget=0.0)
    with pytest.raises(EfrapError, match="budget"):
        QuRAConfig(budget=0.9)
    with pytest.raises(EfrapError, match="iters"):
        QuRAConfig(iters=0)


def test_command_line(setup: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fp, data = setup
    assert "qura" in ROUNDING_ATTACKS
    out = tmp_path / "cli.onnx"
    assert main(["attack", "--method", "qura", "--model", str(fp), "--data", data, "--scheme", "w4a8",
                 "--iters", "2", "--budget", "1%", "--train-limit", "64", "--device", "cpu",
                 "-o", str(out)]) == 0
    assert out.is_file() and (tmp_path / "cli.trigger.json").is_file()
    assert "weights off nearest" in capsys.readouterr().out
    for argv, expect in (
            (["--method", "qura", "--data", data], "--model"),
            (["--method", "qura", "--model", str(fp), "--epochs", "3"], "--epochs"),
            (["--method", "compartifact", "--model", str(fp)], "--model"),
            (["--method", "qura", "--model", str(fp), "--budget", "0.9"], "budget")):
        target = tmp_path / "bad.onnx"
        assert main(["attack", *argv, "-o", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0]
        assert not target.exists()
