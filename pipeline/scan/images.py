"""The scan's images in [0, 1], converted batch by batch from the data set's stored pixels.

A scan reads its calibration and held-out images many times (searches, checks, figures).
Held as float32 they cost 4 bytes a value: 1,024 images at 3 x 224 x 224 are 616 MB, and
every copy (a split, a preprocessed pass) as much again. `ImageSet` keeps only the data
set and which of its images, and converts the images a batch asks for, with the data
set's own `take` (so every value is the one a whole-array conversion gives).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.base.data import Images

#: Images converted at once where a whole set is read in order (onnxruntime passes).
CHUNK = 64
#: Most images in one forward pass without gradients ...
MAX_BATCH = 256
#: ... and most input values in one (2**22: 256 images at 3 x 32 x 32 and below, 27 at
#: 3 x 224 x 224) ...
BATCH_VALUES = 1 << 22
#: ... and most activation values alive at once in one (2**26, 256 MB of float32), where the
#: model's activations are known: a network that keeps 224 x 224 through its first blocks
#: holds 50 times its input at once (MobileNetV3-Small with a stride-1 stem: 9 images).
#: Every 32 x 32 network the scan's figures were measured on stays at 256 images.
LIVE_VALUES = 1 << 26
#: Most input values in one pass whose activations are kept for a backward pass (2**20:
#: 32 images at 3 x 32 x 32 and below, so a 32-image search step there is one pass; 6 at
#: 3 x 224 x 224, where a 32-image step is split into micro-batches) ...
GRAD_VALUES = 1 << 20
#: ... and most activation values kept for it (2**27 over the sides of a step, 512 MB of
#: float32), where the models' activations are known: a ResNet-18 or a MobileNetV2 at
#: 32 x 32 keeps its 32-image step in one pass; at 224 x 224 a step runs image by image.
GRAD_TOTAL = 1 << 27


def batch_for(image_shape: tuple[int, ...], live: int | None = None) -> int:
    """Images per forward pass without gradients for images of `image_shape` (C x H x W)
    through a model holding at most `live` activation values per image at once (None:
    unknown, the input alone decides)."""
    values = max(1, int(np.prod(image_shape)))
    batch = min(MAX_BATCH, BATCH_VALUES // values)
    if live is not None:
        batch = min(batch, LIVE_VALUES // max(1, live))
    return max(1, batch)


def grad_batch_for(image_shape: tuple[int, ...], total: int | None = None) -> int:
    """Images per forward-and-backward pass for images of `image_shape` (C x H x W) through
    models computing `total` activation values per image together (None: unknown)."""
    values = max(1, int(np.prod(image_shape)))
    batch = GRAD_VALUES // values
    if total is not None:
        batch = min(batch, GRAD_TOTAL // max(1, total))
    return max(1, batch)


class ImageSet:
    """Some images of a data set, in [0, 1], read batch by batch.

    Indexing (a slice, an index array or a torch index tensor) returns a float32 tensor of
    those images; `subset` returns another `ImageSet`; `chunks` yields float32 arrays in
    order.

    Args:
        dataset: The data set.
        index: Which of its images, in order.
    """

    def __init__(self, dataset: Images, index: np.ndarray) -> None:
        self.dataset = dataset
        self.index = np.asarray(index)
        self.shape = (len(self.index), *dataset.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: slice | np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.numpy()
        return torch.from_numpy(self.dataset.take(self.index[key]))

    def subset(self, key: slice | np.ndarray) -> ImageSet:
        """The images at `key` (positions in this set) as a set of their own."""
        return ImageSet(self.dataset, self.index[key])

    def chunks(self, size: int = CHUNK) -> Iterator[np.ndarray]:
        """Every image in order, `size` at a time, as float32 arrays."""
        for start in range(0, len(self.index), size):
            yield self.dataset.take(self.index[start : start + size])
