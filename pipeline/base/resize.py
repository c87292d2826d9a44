"""The one image resize of the project: bilinear, antialiased, on float images in [0, 1].

Preprocessing (`pipeline.base.preprocess`) resizes a batch with it; an image folder of
mixed sizes read with a size (`pipeline.base.image_folder`) resizes each image with it
when it is read. One function, so that an image gets the same pixels either way.

The pixels come from torch's antialiased bilinear interpolate, and the base layer imports
no torch (verification needs only onnxruntime): `pipeline.torch_backend` installs torch's
resize here when it is imported, as every entry point (the `efrap` command,
`pipeline.api`, `pipeline.quantize`) does. Without it a resize is refused, never done
another way: another implementation would give other floats.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.base.errors import EfrapError

#: (N x C x H x W float images, (height, width)) -> the resized float32 images.
Resizer = Callable[[np.ndarray, tuple[int, int]], np.ndarray]

_resizer: Resizer | None = None


def install_resizer(resizer: Resizer) -> None:
    """Make `resizer` the resize of `resize_images` (`pipeline.torch_backend` installs torch's)."""
    global _resizer
    _resizer = resizer


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """N x C x H x W float images resized to `size` (height, width), as float32.

    Example: a 2 x 3 x 40 x 30 batch with size (28, 28) becomes 2 x 3 x 28 x 28.

    Raises:
        EfrapError: no resize installed (nothing above the validators was imported).
    """
    if _resizer is None:
        raise EfrapError(f"resizing images to {size[0]}x{size[1]} needs torch's resize: import "
                         "pipeline.torch_backend (or pipeline.api) before verifying such a model")
    return _resizer(images, size)
