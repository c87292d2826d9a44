"""Preprocessing cannot drift silently between quantization and verification.

What a model was quantized with travels in its `efrap.preprocessing` metadata and is
applied at verify; where it cannot be (calibrated on model-ready arrays of unknown
making, then verified on raw images, or the reverse) the run is refused in one line.
Settings that map pixels to an implausible range, a mean without a std, and settings
that differ from the recorded ones are each announced in one accurate line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.base import progress
from pipeline.base.deployment import Deployment
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import image_input, set_metadata
from pipeline.base.preprocess import PREPROCESSING_KEY, Preprocess, range_warning, ready, resolve
from pipeline.cli.main import main
from tests.conftest import export_tiny
from validators.verify import VerifyOptions, verify_model

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@pytest.fixture
def loud() -> object:
    """Warnings printed (the suite runs quiet)."""
    progress.set_quiet(False)
    yield
    progress.set_quiet(True)


def _warnings(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]


def _model(tmp_path: Path, metadata: dict | None = None) -> onnx.ModelProto:
    """The tiny 3-channel CNN, with `metadata` set."""
    model = onnx.load(str(export_tiny(tmp_path / "fp3.onnx", in_channels=3)))
    if metadata:
        set_metadata(model, metadata)
    return model


def _record(pre: Preprocess) -> dict:
    return {PREPROCESSING_KEY: pre.to_json()}


def _files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A 3-channel FP model, model-ready arrays keyed by its input, labelled raw images."""
    rng = np.random.default_rng(0)
    fp = export_tiny(tmp_path / "fp.onnx", in_channels=3)
    ready_npz, raw_npz = tmp_path / "ready.npz", tmp_path / "raw.npz"
    np.savez(ready_npz, input=rng.standard_normal((32, 3, 28, 28)).astype(np.float32))
    np.savez(raw_npz, x=rng.integers(0, 256, (40, 3, 28, 28), dtype=np.uint8), y=np.arange(40) % 10)
    return fp, ready_npz, raw_npz


def _metadata(path: Path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_ready_arrays_then_raw_images_is_refused_in_one_line(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    fp, ready_npz, raw_npz = _files(tmp_path)
    q = tmp_path / "q.onnx"
    assert main(["quantize", str(fp), "--calib", f"npz:{ready_npz}", "--num-calib", "32", "-o", str(q)]) == 0
    pre = json.loads(_metadata(q)[PREPROCESSING_KEY])
    assert pre["origin"] == "data" and pre["fields_origin"] == "assumed"
    capsys.readouterr()
    assert main(["verify", str(q), "--data", f"npz:{raw_npz}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantized from model-ready arrays" in err[0] and "--mean" in err[0]
    # Given the settings that made the arrays, it runs with them.
    report = verify_model(str(q),
                          VerifyOptions(Deployment(data=f"npz:{raw_npz}",
                                                   preprocess={"mean": (0.5,) * 3, "std": (0.25,) * 3})))
    assert report.preprocessing["origin"] == "options" and report.preprocessing["mean"] == [0.5] * 3


def test_settings_given_with_ready_arrays_travel_to_verify(tmp_path: Path) -> None:
    fp, ready_npz, raw_npz = _files(tmp_path)
    q = tmp_path / "q.onnx"
    assert main(["quantize", str(fp), "--calib", f"npz:{ready_npz}", "--num-calib", "32", "--mean",
                 "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "-o", str(q)]) == 0
    assert json.loads(_metadata(q)[PREPROCESSING_KEY])["fields_origin"] == "options"
    report = verify_model(str(q), VerifyOptions(Deployment(data=f"npz:{raw_npz}")))
    assert report.preprocessing["mean"] == [0.5] * 3 and report.preprocessing["std"] == [0.25] * 3
    assert report.preprocessing["origin"] == "metadata"


def test_raw_preprocessing_travels_to_verify_and_ready_arrays_are_refused(tmp_path: Path) -> None:
    fp, ready_npz, raw_npz = _files(tmp_path)
    q = tmp_path / "q.onnx"
    assert main(["quantize", str(fp), "--calib", f"npz:{raw_npz}", "--num-calib", "32", "--mean",
                 "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "-o", str(q)]) == 0
    report = verify_model(str(q), VerifyOptions(Deployment(data=f"npz:{raw_npz}")))
    assert report.preprocessing["mean"] == [0.5] * 3 and report.preprocessing["origin"] == "options"
    with pytest.raises(EfrapError, match="holds model-ready arrays"):
        verify_model(str(q), VerifyOptions(Deployment(data=f"npz:{ready_npz}")))


def test_a_ready_record_without_fields_origin_is_not_taken_for_raw_preprocessing(tmp_path: Path) -> None:
    # As written before the record said where its fields came from.
    old = Preprocess(mean=(0.0,) * 3, std=(1.0,) * 3, origin="data").to_json()
    model = _model(tmp_path, {PREPROCESSING_KEY: old})
    with pytest.raises(EfrapError, match="model-ready arrays"):
        resolve(model, image_input(model), None, "q.onnx", announce=False)
    # The exporter's record of the FP model's normalization stands in for it.
    set_metadata(model, {"efrap.normalization": {"mean": [0.3] * 3, "std": [0.2] * 3}})
    pre = resolve(model, image_input(model), None, "q.onnx", announce=False)
    assert pre.mean == (0.3,) * 3 and pre.origin == "metadata"


def test_ready_keeps_where_the_fields_came_from() -> None:
    stated = ready(Preprocess(mean=(0.5,), std=(0.25,), origin="options"))
    assert stated.to_json()["fields_origin"] == "options" and stated.origin == "data"
    # Records of raw-image preprocessing are written as before (the zoo's bytes do not move).
    assert "fields_origin" not in Preprocess(mean=(0.5,), std=(0.25,)).to_json()


def test_a_mean_in_0_255_units_without_input_scale_warns_with_the_range(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], loud: object) -> None:
    model = _model(tmp_path)
    pre = resolve(model, image_input(model), {"mean": (104.0, 117.0, 123.0), "std": (1.0,) * 3}, "m.onnx")
    (line,) = _warnings(capsys)
    assert "span -123 to -103" in line and "--input-scale 255" in line
    # With the scale, the same mean is plausible.
    resolve(model, image_input(model), {"mean": (104.0, 117.0, 123.0), "std": (1.0,) * 3,
                                        "input_scale": 255.0}, "m.onnx")
    assert not _warnings(capsys)
    assert pre.input_range() == pytest.approx((-123.0, -103.0))


def test_unit_mean_and_std_with_input_scale_255_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     loud: object) -> None:
    model = _model(tmp_path)
    resolve(model, image_input(model), {**IMAGENET, "input_scale": 255.0}, "m.onnx")
    (line,) = _warnings(capsys)
    assert "beyond any pixel scale" in line and "0-255 units" in line
    resolve(model, image_input(model), IMAGENET, "m.onnx")
    assert not _warnings(capsys)


def test_plausible_settings_have_no_range_warning() -> None:
    for pre in (Preprocess(mean=(0.0,), std=(1.0,)), Preprocess(mean=(0.286,), std=(0.353,)),
                Preprocess(mean=(0.0,), std=(1.0,), input_scale=255.0),
                Preprocess(mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4), input_scale=255.0)):
        assert range_warning(pre) == "", pre


def test_a_mean_without_a_std_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               loud: object) -> None:
    model = _model(tmp_path)
    pre = resolve(model, image_input(model), {"mean": (0.5,) * 3}, "m.onnx")
    (line,) = _warnings(capsys)
    assert "a mean is given without a std" in line and "no mean and std" not in line
    assert pre.std == (1.0,) * 3 and pre.origin == "options"
    resolve(model, image_input(model), {"std": (0.5,) * 3}, "m.onnx")
    (line,) = _warnings(capsys)
    assert "a std is given without a mean" in line


def test_nothing_given_still_says_it_assumes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             loud: object) -> None:
    model = _model(tmp_path)
    assert resolve(model, image_input(model), {"layout": "nchw"}, "m.onnx").origin == "assumed"
    (line,) = _warnings(capsys)
    assert "no mean and std recorded in the model or given" in line


def test_settings_that_differ_from_the_recorded_ones_warn(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          loud: object) -> None:
    model = _model(tmp_path, _record(Preprocess(mean=(0.5,) * 3, std=(0.25,) * 3, origin="options")))
    pre = resolve(model, image_input(model), None, "q.onnx")
    assert pre.mean == (0.5,) * 3 and not _warnings(capsys)
    resolve(model, image_input(model), {"mean": (0.5,) * 3, "std": (0.25,) * 3}, "q.onnx")
    assert not _warnings(capsys)
    resolve(model, image_input(model), {"mean": (0.4,) * 3}, "q.onnx")
    (line,) = _warnings(capsys)
    assert "differs from the one it was quantized with" in line and "0.4" in line


def test_verify_warns_about_an_implausible_range(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 loud: object) -> None:
    fp, _, raw_npz = _files(tmp_path)
    assert main(["verify", str(fp), "--data", f"npz:{raw_npz}", "--mean", "104,117,123", "--std",
                 "1,1,1", "--limit", "8"]) == 0
    lines = _warnings(capsys)
    assert len(lines) == 1 and "--input-scale 255" in lines[0]
