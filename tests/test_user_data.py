"""Data as users have it, through `efrap quantize` on the stored clean model: a flat folder of
images, mixed sizes with --resize, an npz of images without labels, fewer images than asked
for; and what the run says about 4-bit weights in int8 containers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.zoo import ZOO_DIR
from pipeline.base import progress
from pipeline.cli.main import main

CLEAN = ZOO_DIR / "fmnist_small_cnn_clean.onnx"


def _folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """Grey PNGs of `sizes` directly in `root` (seeded noise)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i, size in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def _quantize(*extra: str) -> int:
    return main(["quantize", str(CLEAN), "--holdout", "8", *extra])


def test_flat_folder_calibrates_and_checks_without_labels(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    calib = _folder(tmp_path / "calib", [(28, 28)] * 20)
    out, summary = tmp_path / "q.onnx", tmp_path / "s.json"
    assert _quantize("--calib", f"imagefolder:{calib}", "--num-calib", "12", "-o", str(out),
                     "--summary", str(summary), "--max-agreement-drop", "50%") == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "agreement with FP" in printed and "clean accuracy" not in printed
    guard = json.loads(summary.read_text())["guard"]
    assert guard["images"] == 8 and guard["accuracy"] is None and guard["agreement"] is not None
    # A limit that needs labels is refused before the run, nothing written.
    refused = tmp_path / "refused.onnx"
    assert _quantize("--calib", f"imagefolder:{calib}", "--num-calib", "12", "-o", str(refused),
                     "--min-accuracy", "50%") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs labelled images" in err[0] and str(calib) in err[0]
    assert not refused.exists()
    # Verification measures accuracy: it refuses the folder, naming it.
    assert main(["verify", str(CLEAN), "--data", f"imagefolder:{calib}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"imagefolder:{calib}: a flat folder of images has no labels" in err[0]


def test_mixed_sizes_need_resize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calib = _folder(tmp_path / "calib", [(28, 28), (36, 30), (24, 40), (28, 28)] * 4)
    out = tmp_path / "q.onnx"
    assert _quantize("--calib", f"imagefolder:{calib}", "--num-calib", "12", "-o", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ in size" in err[0] and "--resize HxW" in err[0] and not out.exists()
    assert _quantize("--calib", f"imagefolder:{calib}", "--num-calib", "12", "-o", str(out),
                     "--resize", "28x28") == 0
    assert out.is_file()


def test_npz_of_images_without_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npz = tmp_path / "calib.npz"
    np.savez(npz, x_train=np.random.default_rng(0).integers(0, 256, (24, 28, 28), dtype=np.uint8))
    out = tmp_path / "q.onnx"
    assert _quantize("--calib", f"npz:{npz}", "--num-calib", "16", "-o", str(out)) == 0
    assert out.is_file() and "agreement with FP" in capsys.readouterr().out


def test_fewer_images_than_asked_for_warn_once(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calib = _folder(tmp_path / "calib", [(28, 28)] * 20)
    monkeypatch.setattr(progress, "_quiet", False)
    assert _quantize("--calib", f"imagefolder:{calib}", "--num-calib", "1024", "-o",
                     str(tmp_path / "q.onnx")) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "calibration images asked for" in line]
    assert warnings == [f"warning: {CLEAN}: 1,024 calibration images asked for, imagefolder:{calib} has 20: "
                        "calibrating on those 20"]
    assert "calibrate: done" in captured.err and " 20 images" in captured.err
    # All 20 went into calibration: the check says it measured nothing.
    assert "nothing measured" in captured.out


def test_four_bit_weights_in_int8_containers_get_a_size_hint(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--scheme", "w4a8", "--num-calib", "32"]
    unpacked, packed = tmp_path / "int8.onnx", tmp_path / "int4.onnx"
    assert _quantize(*args, "-o", str(unpacked)) == 0
    hint = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(hint) == 1 and "4-bit weights in int8 containers" in hint[0]
    assert "--weight-storage int4" in hint[0]
    assert _quantize(*args, "-o", str(packed), "--weight-storage", "int4") == 0
    assert "int8 containers" not in capsys.readouterr().out
    # The saving it announces is the one packing gives.
    kib = float(re.search(r"about ([\d.]+) KiB smaller", hint[0]).group(1))  # type: ignore[union-attr]
    saved = unpacked.stat().st_size - packed.stat().st_size
    assert kib * 1024 == pytest.approx(saved, rel=0.05)
    # An 8-bit scheme has nothing to pack.
    assert _quantize("--num-calib", "32", "-o", str(tmp_path / "w8.onnx")) == 0
    assert "note:" not in capsys.readouterr().out
