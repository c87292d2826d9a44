"""Input preprocessing: the normalisation a model's input expects.

Images are float32 N x C x H x W in [0, 1]; a model's input is (x - mean) / std per
channel. The values come from the model's metadata (`efrap.normalization`, written
by `efrap export`), are validated as untrusted input (finite, std > 0, one value per
input channel), and are recorded in every output and report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import onnx

from pipeline.base.data import normalize
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import META_PREFIX, get_metadata

NORMALIZATION_KEY = META_PREFIX + "normalization"


@dataclass(frozen=True)
class Normalization:
    """Per-channel (x - mean) / std.

    Attributes:
        mean: One value per input channel.
        std: One positive value per input channel.
        origin: Where the values came from ("metadata" or "assumed").
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: str = "metadata"

    def apply(self, images: np.ndarray) -> np.ndarray:
        """(x - mean) / std per channel, float32."""
        return normalize(images, list(self.mean), list(self.std))

    def to_json(self) -> dict[str, object]:
        """JSON-ready form (as stored in metadata, plus where it came from)."""
        return {"mean": list(self.mean), "std": list(self.std), "origin": self.origin}


def checked(mean: object, std: object, channels: int, source: str,
            origin: str = "metadata") -> Normalization:
    """Validate mean/std lists for a `channels`-channel input.

    Raises:
        EfrapError: not lists of finite numbers, a std that is not positive, or a
            count that differs from the input's channels.
    """
    values = {}
    for name, raw in (("mean", mean), ("std", std)):
        if not isinstance(raw, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in raw):
            raise EfrapError(f"{source}: normalization {name} must be a list of numbers")
        if not all(math.isfinite(v) for v in raw):
            raise EfrapError(f"{source}: normalization {name} holds a non-finite value")
        if len(raw) != channels:
            raise EfrapError(f"{source}: normalization {name} has {len(raw)} values for a "
                             f"{channels}-channel input")
        values[name] = tuple(float(v) for v in raw)
    if any(v <= 0.0 for v in values["std"]):
        raise EfrapError(f"{source}: normalization std must be positive, got {list(values['std'])}")
    return Normalization(values["mean"], values["std"], origin)


def model_normalization(model: onnx.ModelProto, channels: int, source: str = "model") -> Normalization:
    """The normalisation recorded in the model's metadata; mean 0, std 1 when there is none.

    Raises:
        EfrapError: the metadata entry is present but invalid.
    """
    raw = get_metadata(model).get(NORMALIZATION_KEY)
    if raw is None:
        return Normalization((0.0,) * channels, (1.0,) * channels, "assumed")
    try:
        spec = json.loads(raw)
    except (ValueError, RecursionError):
        raise EfrapError(f"{source}: metadata '{NORMALIZATION_KEY}' is not valid JSON") from None
    if not isinstance(spec, dict) or "mean" not in spec or "std" not in spec:
        raise EfrapError(f"{source}: metadata '{NORMALIZATION_KEY}' must hold 'mean' and 'std' lists")
    return checked(spec["mean"], spec["std"], channels, f"{source}: metadata '{NORMALIZATION_KEY}'")
