"""Triggers: strict JSON, pattern files, one stamping rule for numpy and torch, saving and listing."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.base.errors import EfrapError
from pipeline.base.trigger import (
    PatchTrigger,
    PatternTrigger,
    Trigger,
    WarpTrigger,
    blended,
    checkerboard,
    load_trigger,
    paper_trigger,
    save_trigger,
    trigger_files,
    trigger_from_json,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _images(channels: int, size: int = 16, n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, channels, size, size), dtype=np.float32)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny 1-bit grey PNG that declares `width` x `height` (its pixel data is absent)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------- valid files


def test_patch_json_round_trip(tmp_path: Path) -> None:
    trig = Trigger(size=3, target=2, position=(1, 4), value=(0.5, 1.0, 0.0), blend=0.7)
    assert save_trigger(trig, tmp_path / "t.json") == [tmp_path / "t.json"]
    loaded = load_trigger(tmp_path / "t.json")
    assert loaded == trig and isinstance(loaded, PatchTrigger)
    assert loaded.to_json() == trig.to_json()
    assert "kind" not in json.loads((tmp_path / "t.json").read_text())  # today's format
    assert trigger_from_json(trig.to_json(), "t") == trig
    assert trigger_files(tmp_path / "t.json") == [tmp_path / "t.json"]


def test_patch_json_with_kind_and_paper_defaults(tmp_path: Path) -> None:
    text = '{"kind": "patch", "size": 4, "margin": 1, "target": 0, "value": 1, "blend": 1}'
    loaded = load_trigger(_write(tmp_path / "t.json", text))
    assert loaded == paper_trigger(32, target=0, stage=1)


def test_pattern_npz_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    trig = PatternTrigger(pattern=rng.random((3, 8, 8)), mask=rng.random((8, 8)), blend=0.2, target=3)
    written = save_trigger(trig, tmp_path / "t.trigger.json")
    assert written == [tmp_path / "t.trigger.json", tmp_path / "t.trigger.npz"]
    data = json.loads((tmp_path / "t.trigger.json").read_text())
    assert data == {"kind": "pattern", "pattern": "t.trigger.npz", "blend": 0.2, "target": 3}
    loaded = load_trigger(tmp_path / "t.trigger.json")
    assert isinstance(loaded, PatternTrigger) and loaded == trig
    assert loaded.pattern.dtype == np.float32 and loaded.mask is not None and loaded.mask.shape == (1, 8, 8)
    assert loaded.to_json() == data
    assert trigger_files(tmp_path / "t.trigger.json") == written
    with np.load(tmp_path / "t.trigger.npz", allow_pickle=False) as npz:  # plain numpy reads it
        np.testing.assert_array_equal(npz["pattern"], trig.pattern)


def test_pattern_png_with_png_mask(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "p.png")
    (tmp_path / "masks").mkdir()
    Image.fromarray(grey, "L").save(tmp_path / "masks" / "m.png")
    text = '{"kind": "pattern", "pattern": "p.png", "mask": "masks/m.png", "blend": 0.5, "target": 1}'
    loaded = load_trigger(_write(tmp_path / "t.json", text))
    assert isinstance(loaded, PatternTrigger)
    expected = np.moveaxis(rgb, -1, 0).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(loaded.pattern, expected)
    np.testing.assert_array_equal(loaded.mask, grey[None].astype(np.float32) / np.float32(255))
    assert loaded.to_json() == json.loads(text)
    assert trigger_files(tmp_path / "t.json") == [tmp_path / "t.json", tmp_path / "p.png",
                                                  tmp_path / "masks" / "m.png"]
    # Saving turns the PNGs into one npz beside the new JSON.
    save_trigger(loaded, tmp_path / "copy.json")
    assert load_trigger(tmp_path / "copy.json") == loaded


def test_pattern_npz_written_by_numpy_uint8_grey(tmp_path: Path) -> None:
    pattern = np.full((8, 8), 255, dtype=np.uint8)
    np.savez(tmp_path / "p.npz", pattern=pattern, mask=np.eye(8, dtype=np.float64))
    text = '{"kind": "pattern", "pattern": "p.npz", "target": 0}'
    loaded = load_trigger(_write(tmp_path / "t.json", text))
    assert isinstance(loaded, PatternTrigger) and loaded.blend == 1.0
    out = loaded.apply(np.zeros((1, 3, 8, 8), dtype=np.float32))  # grey pattern on RGB images
    np.testing.assert_array_equal(out[0], np.broadcast_to(np.eye(8, dtype=np.float32), (3, 8, 8)))


# ---------------------------------------------------------------------------- one stamping rule


def _kinds(channels: int) -> dict[str, object]:
    rng = np.random.default_rng(3)
    return {
        "patch": Trigger(size=4, target=0, margin=1),
        "patch-blend": Trigger(size=5, target=1, position="top-left", margin=2, blend=0.3,
                               value=tuple(float(v) for v in rng.random(channels))),
        "pattern": PatternTrigger(pattern=rng.random((channels, 16, 16)), mask=rng.random((1, 16, 16)),
                                  blend=0.37, target=2),
        "checkerboard": checkerboard(6, 16, 16, channels, target=1, position="top-right", margin=1,
                                     blend=0.8, cell=2),
        "blended": blended(rng.random((16, 16)), blend=0.1, target=4),
        "warp": WarpTrigger(target=3, grid=4, strength=1.5, seed=channels),
    }


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", ["patch", "patch-blend", "pattern", "checkerboard", "blended", "warp"])
def test_apply_and_apply_torch_are_bit_identical(kind: str, channels: int) -> None:
    trig = _kinds(channels)[kind]
    images = _images(channels, seed=channels)
    expected = trig.apply(images)  # type: ignore[attr-defined]
    got = trig.apply_torch(torch.from_numpy(images))  # type: ignore[attr-defined]
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert np.array_equal(got.numpy(), expected)
    assert not np.array_equal(expected, images)  # the trigger did something
    np.testing.assert_array_equal(images, _images(channels, seed=channels))  # input untouched


def test_apply_torch_is_differentiable_and_keeps_dtype() -> None:
    rng = np.random.default_rng(4)
    mask = rng.random((1, 16, 16)).astype(np.float32)
    trig = PatternTrigger(pattern=rng.random((1, 16, 16)), mask=mask, blend=0.5, target=0)
    x = torch.from_numpy(_images(1)).double().requires_grad_(True)
    out = trig.apply_torch(x)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert x.grad is not None
    np.testing.assert_allclose(x.grad.numpy()[0, 0], 1.0 - 0.5 * mask[0], rtol=1e-6)
    patch = Trigger(size=4, target=0)
    y = torch.from_numpy(_images(1)).requires_grad_(True)
    patch.apply_torch(y).sum().backward()
    assert y.grad is not None and float(y.grad[0, 0, -1, -1]) == 0.0 and float(y.grad[0, 0, 0, 0]) == 1.0


def test_warp_json_round_trip_and_listing(tmp_path: Path) -> None:
    trig = WarpTrigger(target=2, grid=5, strength=0.75, seed=11)
    path = tmp_path / "warp.json"
    assert save_trigger(trig, path) == [path]
    assert json.loads(path.read_text()) == {"kind": "warp", "grid": 5, "strength": 0.75, "seed": 11,
                                            "target": 2}
    assert load_trigger(path) == trig
    assert trigger_files(path) == [path]


def test_warp_moves_pixels_by_its_strength_and_keeps_constants() -> None:
    # On a ramp along the columns bilinear sampling is exact, so the output minus the
    # input is each pixel's column displacement (clamped at the borders).
    size = 64
    ramp = np.broadcast_to(np.arange(size, dtype=np.float32), (1, 1, size, size)).copy()
    for strength in (0.5, 2.0):
        moved = WarpTrigger(target=0, grid=4, strength=strength, seed=3).apply(ramp) - ramp
        interior = np.abs(moved[0, 0, :, 8:-8])
        assert 0.6 * strength < interior.mean() < 1.4 * strength
        assert interior.max() > strength  # a field, not a shift: displacements vary
    flat = np.full((2, 1, 20, 24), 0.625, dtype=np.float32)
    np.testing.assert_allclose(WarpTrigger(target=0, seed=1).apply(flat), flat, atol=1e-6)
    # Another seed is another field.
    images = _images(1)
    assert not np.array_equal(WarpTrigger(target=0, seed=1).apply(images),
                              WarpTrigger(target=0, seed=2).apply(images))


@pytest.mark.parametrize("field,value,message", [
    ("grid", 1, "'grid' must be at least 2"),
    ("grid", 2.0, "'grid' must be an integer"),
    ("strength", 0, "'strength' must be above 0"),
    ("strength", 17, "'strength' must be at most 16"),
    ("seed", -1, "'seed' must be at least 0"),
])
def test_hostile_warp_json_is_refused(tmp_path: Path, field: str, value: object, message: str) -> None:
    data = {"kind": "warp", "target": 1, field: value}
    path = _write(tmp_path / "w.json", json.dumps(data))
    with pytest.raises(EfrapError, match=message) as info:
        load_trigger(path)
    assert str(path) in str(info.value)
    with pytest.raises(EfrapError, match="unknown key 'blend'"):
        trigger_from_json({"kind": "warp", "target": 1, "blend": 0.5}, "w.json")
    with pytest.raises(EfrapError, match="needs 'target'"):
        trigger_from_json({"kind": "warp"}, "w.json")


def test_patch_with_full_blend_sets_its_box_exactly() -> None:
    images = _images(3)
    out = Trigger(size=4, target=0, margin=1, value=(0.1, 0.2, 0.3)).apply(images)
    box = out[:, :, 11:15, 11:15]
    np.testing.assert_array_equal(box, np.broadcast_to(np.float32([0.1, 0.2, 0.3])[:, None, None], box.shape))
    out[:, :, 11:15, 11:15] = images[:, :, 11:15, 11:15]
    np.testing.assert_array_equal(out, images)


def test_checkerboard_full_image_and_blended_formula() -> None:
    board = checkerboard(None, 4, 4, 1, target=0)
    np.testing.assert_array_equal(board.apply(np.full((1, 1, 4, 4), 0.5, np.float32))[0, 0],
                                  np.float32([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]))
    pattern = np.random.default_rng(5).random((3, 16, 16)).astype(np.float32)
    images = _images(3)
    np.testing.assert_allclose(blended(pattern, 0.25, 1).apply(images), 0.75 * images + 0.25 * pattern,
                               atol=1e-6)


def test_unsaved_pattern_trigger_to_json_is_refused() -> None:
    with pytest.raises(EfrapError, match="save_trigger"):
        checkerboard(3, 8, 8).to_json()


# ---------------------------------------------------------------------------- hostile patch JSON

PATCH_CASES = {
    "size-2.7": ('{"size": 2.7, "target": 0}', "'size'"),
    "size-2.0": ('{"size": 2.0, "target": 0}', "'size'"),
    "size-string": ('{"size": "2", "target": 0}', "'size'"),
    "size-0": ('{"size": 0, "target": 0}', "'size'"),
    "target-negative": ('{"size": 2, "target": -1}', "'target'"),
    "target-1.5": ('{"size": 2, "target": 1.5}', "'target'"),
    "blend-0": ('{"size": 2, "target": 0, "blend": 0}', "'blend'"),
    "blend-1.5": ('{"size": 2, "target": 0, "blend": 1.5}', "'blend'"),
    "blend-nan": ('{"size": 2, "target": 0, "blend": NaN}', "NaN"),
    "value-2.0": ('{"size": 2, "target": 0, "value": 2.0}', "'value'"),
    "value-list-2.0": ('{"size": 2, "target": 0, "value": [0.5, 2.0]}', "'value'"),
    "position-float": ('{"size": 2, "target": 0, "position": [1.5, 2]}', "'position'"),
    "position-middle": ('{"size": 2, "target": 0, "position": "middle"}', "'position'"),
    "margin-bool": ('{"size": 2, "target": 0, "margin": true}', "'margin'"),
    "unknown-key": ('{"size": 2, "target": 0, "colour": 1}', "colour"),
    "unknown-kind": ('{"kind": "wobble", "size": 2, "target": 0}', "'kind'"),
    "nested-100": ('{"size": 2, "target": 0, "value": ' + "[" * 100 + "]" * 100 + "}", "nested"),
    "not-an-object": ("[1, 2]", "trigger"),
    "not-json": ("size: 2\ntarget: 0\n", "cannot parse"),
}


@pytest.mark.parametrize("case", list(PATCH_CASES))
def test_hostile_patch_json_is_refused(tmp_path: Path, case: str) -> None:
    text, field = PATCH_CASES[case]
    path = _write(tmp_path / "hostile.json", text)
    with pytest.raises(EfrapError) as err:
        load_trigger(path)
    message = str(err.value)
    assert "hostile.json" in message and field in message and "\n" not in message


def test_binary_trigger_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hostile.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(EfrapError, match=r"hostile\.json"):
        load_trigger(path)


# ---------------------------------------------------------------------------- hostile pattern files


def _pattern_json(folder: Path, pattern: str, extra: str = "") -> Path:
    return _write(folder / "t.json", json.dumps({"kind": "pattern", "pattern": pattern, "target": 0})[:-1]
                  + extra + "}")


def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(EfrapError) as err:
        load_trigger(path)
    message = str(err.value)
    assert "t.json" in message and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_pattern_path_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", pattern=np.zeros((4, 4)))
    (tmp_path / "sub").mkdir()
    path = _pattern_json(tmp_path / "sub", "../x.npz")
    _refused(path, "'pattern'", "../x.npz")
    with pytest.raises(EfrapError, match=r"t\.json"):
        trigger_files(path)


def test_absolute_pattern_path_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", pattern=np.zeros((4, 4)))
    _refused(_pattern_json(tmp_path, str(tmp_path / "x.npz")), "'pattern'", "relative")


def test_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", pattern=np.zeros((4, 4)))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "link.npz").symlink_to(tmp_path / "x.npz")
    _refused(_pattern_json(tmp_path / "sub", "link.npz"), "outside")


def test_missing_pattern_file_is_refused(tmp_path: Path) -> None:
    _refused(_pattern_json(tmp_path, "nothere.npz"), "'pattern'", "nothere.npz")


def test_npz_with_pickled_object_array_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "p.npz", pattern=np.array([{"a": 1}, None], dtype=object))
    _refused(_pattern_json(tmp_path, "p.npz"), "p.npz", "dtype object")


def test_npz_pattern_with_nan_is_refused(tmp_path: Path) -> None:
    pattern = np.zeros((4, 4))
    pattern[1, 2] = np.nan
    np.savez(tmp_path / "p.npz", pattern=pattern)
    _refused(_pattern_json(tmp_path, "p.npz"), "p.npz", "NaN")


def test_npz_with_an_unexpected_array_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "p.npz", pattern=np.zeros((4, 4)), extra=np.zeros(2))
    _refused(_pattern_json(tmp_path, "p.npz"), "extra")


def test_mask_given_twice_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "p.npz", pattern=np.zeros((4, 4)), mask=np.ones((4, 4)))
    np.savez(tmp_path / "m.npz", mask=np.ones((4, 4)))
    _refused(_pattern_json(tmp_path, "p.npz", ', "mask": "m.npz"'), "'mask'", "twice")


def test_pattern_of_the_wrong_size_is_refused_at_apply_time(tmp_path: Path) -> None:
    np.savez(tmp_path / "p.npz", pattern=np.zeros((8, 8)))
    trig = load_trigger(_pattern_json(tmp_path, "p.npz"))
    with pytest.raises(EfrapError, match=r"t\.json.*8x8.*10x10"):
        trig.apply(_images(1, size=10))
    with pytest.raises(EfrapError, match=r"t\.json"):
        trig.apply_torch(torch.zeros(1, 1, 10, 10))


def test_decompression_bomb_png_is_refused(tmp_path: Path) -> None:
    # Declares 100000 x 100000 pixels in a few dozen bytes: Pillow's own limit trips.
    _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    _refused(_pattern_json(tmp_path, "bomb.png"), "bomb.png", "decompression bomb")


def test_png_past_the_trigger_pixel_limit_is_refused(tmp_path: Path) -> None:
    # Under Pillow's limit, over the trigger's: refused before any pixel is decoded.
    _png_header_only(tmp_path / "big.png", 5000, 5000)
    _refused(_pattern_json(tmp_path, "big.png"), "big.png", "5000x5000")


def test_png_past_pillows_lowered_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow only warns between its limit and twice it: the warning is a refusal too.
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8), "L").save(tmp_path / "p.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    _refused(_pattern_json(tmp_path, "p.png"), "p.png", "decompression bomb")


def test_png_with_alpha_is_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4, 4), dtype=np.uint8), "RGBA").save(tmp_path / "p.png")
    _refused(_pattern_json(tmp_path, "p.png"), "p.png", "RGBA")
