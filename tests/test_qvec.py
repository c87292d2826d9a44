"""QVec: the per-weight flip rule, the scale search's rule, and `efrap quantize --method qvec`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from models.zoo import load_manifest, zoo_path
from pipeline import api
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import get_metadata
from pipeline.base.runtime import make_session
from pipeline.calibration import holdout_indices, image_indices, search_indices
from pipeline.cli.main import main
from pipeline.qmath import QParams, qparams_from_range
from pipeline.rounding import METHODS, LayerProblem, NearestConfig, QVecConfig
from pipeline.rounding.nearest import NearestRounding
from pipeline.rounding.qvec import QVEC_SEARCH, QVec, qvec_integers
from pipeline.rounding.search import ScaleSearch

#: A 4-bit signed per-tensor grid with a power-of-two step, so W, W/s and W - lambda * tau
#: are exact in float32 for the hand-made weights below.
STEP = 0.125
GRID = QParams(scale=np.asarray(STEP, np.float32), zero_point=np.asarray(0, np.int64), qmin=-8, qmax=7)


def _round(weight: torch.Tensor, qp: QParams, lam: float) -> torch.Tensor:
    return QVec(lam)(LayerProblem("w", weight, qp), QVecConfig()).q


def test_flip_rule_on_a_hand_made_tensor() -> None:
    # W/s = n + k/32: odd k never sits on a threshold 0.5 / (1 + lambda) of the grid's lambdas.
    cases = [(n, k) for n in range(-3, 4) for k in range(-15, 16, 2)]
    weight = torch.tensor([(n + k / 32) * STEP for n, k in cases], dtype=torch.float32)
    for lam in QVEC_SEARCH.grid:
        want = [n + (int(np.sign(k)) if abs(k) / 32 > 0.5 / (1 + lam) else 0) for n, k in cases]
        assert _round(weight, GRID, lam).tolist() == want, lam
    # lambda 1 flips exactly the weights more than a quarter step from their grid point.
    flipped = (_round(weight, GRID, 1.0) != _round(weight, GRID, 0.0)).tolist()
    assert flipped == [abs(k) > 8 for _, k in cases]


def test_saturated_weights_stay_at_the_grid_end() -> None:
    # 9.3 and -10.4 steps lie past the grid; 7.4 would flip up to 8 and -8.4 down to -9, past it.
    weight = torch.tensor([9.3, -10.4, 7.4, -8.4, 6.7], dtype=torch.float32) * STEP
    for lam in QVEC_SEARCH.grid[1:]:
        assert _round(weight, GRID, lam).tolist()[:4] == [7, -8, 7, -8]
    assert _round(weight, GRID, 1.0).tolist()[4] == 6  # inside the grid, 0.3 step off: flips down


def test_lambda_zero_is_nearest_bit_for_bit() -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3) * 0.2
    amax = weight.abs().amax(dim=(1, 2, 3)).numpy()
    qp = qparams_from_range(-amax, amax, -8, 7, symmetric=True, axis=0)
    problem = LayerProblem("w", weight, qp)
    nearest = NearestRounding()(problem, NearestConfig()).q
    zero = QVec(0.0)(problem, QVecConfig())
    assert torch.equal(zero.q, nearest) and zero.stats["flip_fraction"] == 0.0
    assert METHODS["qvec"].scale == 0.0 and METHODS["qvec"].needs(QVecConfig()) == {"search"}
    # Per channel at lambda 1, off the thresholds: exactly the weights more than 1/4 step off flip.
    s, z = qp.torch(4)
    frac = (weight / s - torch.round(weight / s)).abs()
    clear = (frac - 0.25).abs() > 1e-4
    moved = qvec_integers(weight, s, z, -8, 7, 1.0) != nearest.float()
    assert torch.equal(moved[clear], (frac > 0.25)[clear])


def test_lambda_must_be_finite_and_not_negative() -> None:
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(EfrapError):
            QVec(bad)


def test_search_keeps_the_largest_value_within_tolerance() -> None:
    search = ScaleSearch("lambda", (0.0, 0.25, 0.5, 1.0, 2.0), tolerance=0.01, images=100)
    # A stand-in evaluation: clean accuracy of each candidate.
    assert search.pick([0.90, 0.895, 0.89, 0.85, 0.80]) == 2  # 0.89 ties the bound: kept
    assert search.pick([0.90, 0.895, 0.85, 0.85, 0.899]) == 4  # past a failing one, the largest
    assert search.pick([0.90, 0.88, 0.87, 0.86, 0.70]) == 0  # nothing qualifies but nearest
    assert search.pick([0.90, 0.91, 0.93, 0.95, 0.96]) == 4  # better than nearest qualifies
    with pytest.raises(EfrapError):
        search.pick([0.9, 0.9])


@pytest.mark.parametrize("grid, tolerance", [((), 0.01), ((0.0, 0.5, 0.5), 0.01), ((1.0, 0.5), 0.01),
                                             ((-1.0, 0.0), 0.01), ((0.0, 1.0), 1.5), ((0.0, 1.0), -0.1)])
def test_search_settings_are_checked(grid: tuple[float, ...], tolerance: float) -> None:
    with pytest.raises(EfrapError):
        ScaleSearch("lambda", grid, tolerance)


def test_search_images_are_neither_calibration_nor_check() -> None:
    total, calib, check, seed = 5_000, 1_024, 1_000, 3
    picked = search_indices(total, calib, check, 1_000, seed)
    assert len(picked) == len(set(picked.tolist())) == 1_000
    assert not set(picked) & set(image_indices(total, calib, seed))
    assert not set(picked) & set(holdout_indices(total, calib, check, seed))
    assert np.array_equal(picked, search_indices(total, calib, check, 1_000, seed))


class _Reader:
    def get_next(self) -> None:
        return None


def test_qvec_is_refused_with_pruning_and_in_quantize_static(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    model = zoo_path(next(e for e in load_manifest() if e.kind == "clean"))
    code = main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--method", "qvec",
                 "--prune-rare", "3%"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "rare-unit pruning" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(ValueError, match="held-out"):
        api.quantize_static(str(model), str(tmp_path / "q.onnx"), _Reader(), rounding="qvec")


@pytest.fixture
def clean_model(fashion_mnist: None) -> Path:
    return zoo_path(next(e for e in load_manifest() if e.kind == "clean"))


def test_quantize_qvec_end_to_end(clean_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real grid on fewer held-out images, so the test stays quick.
    small = ScaleSearch("lambda", QVEC_SEARCH.grid, QVEC_SEARCH.tolerance, images=200)
    monkeypatch.setattr(QVec, "search", small)
    digests = []
    for name in ("a", "b"):
        out, summary = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
        assert main(["quantize", str(clean_model), "--method", "qvec", "--scheme", "w4a4",
                     "--num-calib", "32", "--holdout", "100", "-o", str(out), "--summary", str(summary)]) == 0
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]  # same inputs, same threads: same bytes

    model = onnx.load(str(out))
    meta = get_metadata(model)
    assert meta["efrap.method"] == "qvec" and json.loads(meta["efrap.rounding"]) == {}
    record = json.loads(meta["efrap.search"])
    assert record["method"] == "qvec" and record["setting"] == "lambda" and record["figure"] == "accuracy"
    assert record["grid"] == list(QVEC_SEARCH.grid) and record["tolerance"] == 0.01
    assert record["images"] == 200 and "largest lambda" in record["rule"]
    lams = [c["lambda"] for c in record["candidates"]]
    accuracies = [c["accuracy"] for c in record["candidates"]]
    assert lams == list(QVEC_SEARCH.grid) and record["chosen"] == lams[small.pick(accuracies)]
    assert record["candidates"][0]["flip_fraction"] == 0.0
    flips = [c["flip_fraction"] for c in record["candidates"]]
    assert flips == sorted(flips) and flips[-1] > 0.3  # lambda 2 flips |f| > 1/6: most weights
    assert all("seconds" not in c for c in record["candidates"])  # no times in the bytes
    written = json.loads(summary.read_text())["search"]
    assert written["chosen"] == record["chosen"] and all("seconds" in c for c in written["candidates"])

    session = make_session(model, "faithful", "cpu")
    logits = session.session.run(None, {session.input_name: np.zeros((2, 1, 28, 28), np.float32)})[0]
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
