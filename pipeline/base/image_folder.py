"""Image files on disk: one image, and the two folder layouts of ``imagefolder:PATH``.

- Labelled: ``PATH/train/<class>/*.png`` and ``PATH/test/<class>/*.png`` (classes
  numbered in sorted order of their folder names).
- Flat: image files directly in ``PATH`` (no ``train/`` or ``test/`` folder), for calibration: no
  labels, the same images for either split. A step that needs labels (clean accuracy,
  attack success, training) refuses it (`pipeline.base.data.load_dataset`).

Images of one folder must share one size, unless a size is given (``--resize HxW``):
then every image of another size is resized to it when read, with the preprocessing's
own resize (`pipeline.base.resize`), and stored as 8-bit pixels like the others.
"""

from __future__ import annotations

import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.base.errors import EfrapError
from pipeline.base.resize import resize_images

#: Largest image (width x height) read from an image folder or a trigger file.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
#: File name endings read as images (any case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
#: Sizes named in the message about a folder of mixed sizes.
SIZES_SHOWN = 3


def regular_file(path: Path, what: str) -> Path:
    """`path` if it is a regular file (through links); EfrapError otherwise.

    Reading a FIFO or a device named like an image would block or never end.
    """
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise EfrapError(f"{path}: cannot read {what} ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe or a device)"
        raise EfrapError(f"{path}: {what} is {kind}")
    return path


def read_image(file: Path) -> np.ndarray:
    """An image file as H x W (grey) or H x W x 3 uint8, refusing decompression bombs.

    Raises:
        EfrapError: not a regular file, unreadable, or declaring more than MAX_IMAGE_PIXELS pixels.
    """
    regular_file(Path(file), "image")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{im.width} x {im.height} pixels")
                arr = np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise EfrapError(f"{file}: image too large ({exc}); refusing a possible decompression "
                         "bomb") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise EfrapError(f"{file}: not a readable image ({exc})") from None
    return arr


def _image_files(folder: Path) -> list[Path]:
    """The entries of `folder` named like images, in sorted order (`read_image` refuses one
    that is not a regular file: a folder or a pipe named x.png)."""
    return [f for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]


def is_flat(root: Path) -> bool:
    """Whether `root` is read as a flat folder: neither ``train/`` nor ``test/`` in it."""
    return not (root / "train").is_dir() and not (root / "test").is_dir()


def _stack(images: list[np.ndarray], where: Path, size: tuple[int, int] | None) -> np.ndarray:
    """N x C x H x W uint8 pixels; images of another size than `size` resized to it.

    Raises:
        EfrapError: grey and colour images mixed, or sizes that differ with no `size` given.
    """
    chw = [a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in images]
    if len({a.shape[0] for a in chw}) != 1:
        raise EfrapError(f"imagefolder: {where} mixes grey and colour images; store them all as one kind")
    sizes = sorted({a.shape[1:] for a in chw})
    if len(sizes) == 1:
        return np.stack(chw)  # one size: resized, when asked, in preprocessing as before
    if size is None:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes[:SIZES_SHOWN])
        more = f" and {len(sizes) - SIZES_SHOWN} more" if len(sizes) > SIZES_SHOWN else ""
        raise EfrapError(f"imagefolder: images under {where} differ in size ({shown}{more}); give "
                         "--resize HxW to resize them all to one size")
    out = []
    for a in chw:
        if a.shape[1:] != size:
            # Resized once here, then stored as 8-bit pixels like every image read.
            scaled = resize_images(a[None].astype(np.float32) / np.float32(255.0), size)[0]
            a = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
        out.append(a)
    return np.stack(out)


def read_folder(root: Path, split: str, size: tuple[int, int] | None = None
                ) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """The images of one split of an image folder (module docstring: both layouts).

    Args:
        root: The folder (``PATH`` of ``imagefolder:PATH``).
        split: "train" or "test".
        size: (height, width) that images of mixed sizes are resized to (None: refuse them).

    Returns:
        N x C x H x W uint8 pixels, int64 labels (None for a flat folder) and the number
        of classes (None for a flat folder).

    Raises:
        EfrapError: a missing folder, no images, an unreadable image, grey and colour
            images mixed, or mixed sizes without `size`.
    """
    if not root.is_dir():
        raise EfrapError(f"imagefolder: {root} is not a folder")
    if is_flat(root):
        files = _image_files(root)
        if not files:
            raise EfrapError(f"imagefolder: no images in {root} (expected image files there, or "
                             f"PATH/{split}/<class>/*.png for labelled images)")
        return _stack([read_image(f) for f in files], root, size), None, None
    folder = root / split
    if not folder.is_dir():
        raise EfrapError(f"imagefolder: {folder} is not a folder (expected PATH/{split}/<class>/*.png)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise EfrapError(f"imagefolder: {folder} has no class folders")
    images, labels = [], []
    for idx, name in enumerate(classes):
        for file in _image_files(folder / name):
            images.append(read_image(file))
            labels.append(idx)
    if not images:
        raise EfrapError(f"imagefolder: no images under {folder}")
    return _stack(images, folder, size), np.asarray(labels, dtype=np.int64), len(classes)


def folder_inputs(root: Path) -> list[Path]:
    """What an image folder's load reads, for refusing outputs that would change it: the
    train/ and test/ folders of a labelled one, the folder itself when it is flat."""
    return [root] if is_flat(root) else [root / "train", root / "test"]
