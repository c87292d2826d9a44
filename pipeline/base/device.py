"""Where torch work runs: CUDA when torch sees a GPU and the user allows it, else the CPU."""

from __future__ import annotations

import torch

from pipeline.base.errors import EfrapError

DEVICES = ("auto", "cpu", "cuda")


def pick_device(device: str = "auto") -> torch.device:
    """The torch device for `device` ("auto", "cpu" or "cuda").

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
