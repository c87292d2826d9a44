"""The one image resize of the project: bilinear, antialiased, on float images in [0, 1].

Preprocessing (`pipeline.base.preprocess`) resizes a batch with it; an image folder of
mixed sizes read with a size (`pipeline.base.image_folder`) resizes each image with it
when it is read. One function, so that an image gets the same pixels either way.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """N x C x H x W float images resized to `size` (height, width), as float32.

    Example: a 2 x 3 x 40 x 30 batch with size (28, 28) becomes 2 x 3 x 28 x 28.
    """
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images, np.float32))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).numpy()
