"""What the base layer gets from torch: the image resize, whether torch sees a GPU, the
torch device, torch's thread count.

The base layer and the validators import no torch, so that verification in onnxruntime
loads without it. What of theirs needs torch is here, one layer up: importing this module
installs torch's resize (`pipeline.base.resize`) and torch's GPU check (the provider
"auto" of `pipeline.base.runtime`). Every entry point imports it (through
`pipeline.quantize`, `pipeline.api` or the `efrap` command).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.base import resize, runtime
from pipeline.base.device import DEVICES
from pipeline.base.errors import EfrapError
from pipeline.base.threads import set_session_threads


def interpolate_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """N x C x H x W float images resized to `size` (height, width), as float32: torch's
    bilinear, antialiased interpolate (the pixels every resize of the project gets).

    Example: a 2 x 3 x 40 x 30 batch with size (28, 28) becomes 2 x 3 x 28 x 28.
    """
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images, np.float32))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).numpy()


def pick_device(device: str = "auto") -> torch.device:
    """The torch device for `device` ("auto", "cpu" or "cuda"): CUDA when torch sees a GPU
    and the user allows it, else the CPU.

    Raises:
        EfrapError: an unknown name, or "cuda" without a GPU.
    """
    if device not in DEVICES:
        raise EfrapError(f"unknown device '{device}': use one of {', '.join(DEVICES)}")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EfrapError("device cuda requested but torch sees no GPU")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def apply_threads(threads: int | None) -> int:
    """Give torch and every later onnxruntime session `threads` threads (None: leave defaults).

    torch accepts an inter-op count only before its inter-op pool has started, and
    only once; after that the pool keeps its size (it runs no work in this package's
    eager, one-op-at-a-time use, so no sums depend on it).

    Returns:
        torch's intra-op thread count now in force (what the summary records).
    """
    if threads is not None:
        torch.set_num_threads(threads)
        # Refused once the pool has started (a second run in one process): it keeps its size.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)
        set_session_threads(threads)
    return torch.get_num_threads()


resize.install_resizer(interpolate_images)
runtime.install_gpu_probe(torch.cuda.is_available)
