"""The corpus data (models/corpus_data.py): shapes, ranges, labels and determinism.

Fashion-MNIST is read from disk (the `fashion_mnist` fixture skips, or fails under CI,
when it is missing); the text images are rendered with Pillow's bundled font. No
network and no training: a few seconds in all.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.corpus_data import (
    FMNIST32_MEAN,
    FMNIST32_STD,
    fmnist32,
    paddle_input,
    text_lines,
    text_pages,
)


def test_fmnist32_shapes_range_and_padding(fashion_mnist: None) -> None:
    x, y = fmnist32("test", 64, seed=3)
    assert x.shape == (64, 3, 32, 32) and x.dtype == np.float32
    assert y.shape == (64,) and y.dtype == np.int64 and set(y) <= set(range(10))
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.5
    assert np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 0], x[:, 2])
    # Two pixels of zero padding on every side.
    assert not x[:, :, :2].any() and not x[:, :, -2:].any()
    assert not x[:, :, :, :2].any() and not x[:, :, :, -2:].any()


def test_fmnist32_is_deterministic_and_seeded(fashion_mnist: None) -> None:
    a, la = fmnist32("train", 32, seed=7)
    b, lb = fmnist32("train", 32, seed=7)
    c, _ = fmnist32("train", 32, seed=8)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)


def test_fmnist32_normalization_matches_the_padded_images(fashion_mnist: None) -> None:
    # The constants are the full training split's; 10,000 seeded images agree to ~0.005.
    x, _ = fmnist32("train", 10000, seed=0)
    assert abs(float(x.mean()) - FMNIST32_MEAN[0]) < 0.005
    assert abs(float(x.std()) - FMNIST32_STD[0]) < 0.005
    assert len(FMNIST32_MEAN) == len(FMNIST32_STD) == 3


def test_text_lines_shapes_labels_and_determinism() -> None:
    x, y = text_lines(40, seed=1)
    assert x.shape == (40, 48, 192, 3) and x.dtype == np.uint8
    assert y.shape == (40,) and y.dtype == np.int64
    assert int(y.sum()) == 20  # half rotated
    x2, y2 = text_lines(40, seed=1)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, _ = text_lines(40, seed=2)
    assert not np.array_equal(x, x3)
    # Light background, dark text: the median pixel is light, the darkest ones dark.
    assert np.median(x) > 150 and np.percentile(x, 1) < 110
    assert len({im.tobytes() for im in x}) == 40


def test_text_lines_rotated_is_the_upright_rendering_turned() -> None:
    upright, none = text_lines(24, seed=5, rotate_fraction=0.0)
    mixed, labels = text_lines(24, seed=5)
    assert not none.any()
    for img, up, label in zip(mixed, upright, labels, strict=True):
        expected = np.rot90(up, 2) if label else up
        assert np.array_equal(img, expected)
    # Text is drawn from the left margin: turned, the ink sits on the right.
    ink = (255 - mixed.mean(axis=3)).mean(axis=1)  # N x W darkness per column
    left, right = ink[:, :48].mean(axis=1), ink[:, -48:].mean(axis=1)
    assert (right[labels == 1] > left[labels == 1]).mean() > (right[labels == 0] > left[labels == 0]).mean()


def test_text_lines_other_sizes_and_fractions() -> None:
    x, y = text_lines(10, seed=0, height=32, width=100, rotate_fraction=0.3)
    assert x.shape == (10, 32, 100, 3) and int(y.sum()) == 3
    with pytest.raises(ValueError):
        text_lines(4, rotate_fraction=1.5)


def test_text_pages_shapes_and_determinism() -> None:
    pages = text_pages(3, seed=0)
    assert pages.shape == (3, 320, 480, 3) and pages.dtype == np.uint8
    assert pages.shape[1] % 32 == 0 and pages.shape[2] % 32 == 0  # what the detector needs
    assert np.array_equal(pages, text_pages(3, seed=0))
    assert not np.array_equal(pages, text_pages(3, seed=1))
    dark = (pages.mean(axis=3) < 100).mean(axis=(1, 2))
    assert ((dark > 0.005) & (dark < 0.3)).all()  # some text, mostly page
    assert text_pages(1, seed=0, size=(256, 192)).shape == (1, 256, 192, 3)


def test_paddle_input_is_bgr_scaled_to_minus_one_one() -> None:
    img = np.zeros((1, 2, 2, 3), np.uint8)
    img[..., 0] = 255  # pure red in RGB
    out = paddle_input(img)
    assert out.shape == (1, 3, 2, 2) and out.dtype == np.float32
    assert np.allclose(out[0, 2], 1.0) and np.allclose(out[0, :2], -1.0)  # red is the last of BGR
