"""Input preprocessing: how images in [0, 1] become what a model's input expects.

Data sets give float32 N x C x H x W images with values in [0, 1]. A model's input
is, in this order:

1. resized to `resize` (height, width) when set (bilinear, antialiased);
2. multiplied by `input_scale` (255 for models that take 0-255 pixel values);
3. put in `channel_order` ("bgr" reverses RGB channels);
4. normalised per channel, (x - mean) / std, mean and std in the scaled units;
5. laid out as `layout` ("nchw", or "nhwc" for channels-last inputs).

Where the settings come from, first match wins, field by field for options:
command-line options or a config file's [preprocess] section; the model's
`efrap.preprocessing` metadata (every field, written into every QDQ model this
project writes); its `efrap.normalization` metadata (mean and std, written by
`efrap export`); else an assumption (mean 0, std 1, no scaling, RGB, the layout
the input's shape suggests), announced in a one-line warning and recorded in the
output's metadata and every report. Everything is validated as untrusted input.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from pipeline.base import checks
from pipeline.base.data import Dataset, normalize
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import META_PREFIX, ImageInput, get_metadata
from pipeline.base.progress import log

NORMALIZATION_KEY = META_PREFIX + "normalization"
PREPROCESSING_KEY = META_PREFIX + "preprocessing"
LAYOUTS = ("nchw", "nhwc")
CHANNEL_ORDERS = ("rgb", "bgr")
ORIGINS = ("options", "metadata", "assumed", "data")
#: Fields a config file's [preprocess] section (or --preprocess FILE) may set.
OPTION_FIELDS = ("mean", "std", "input_scale", "channel_order", "layout", "resize")


@dataclass(frozen=True)
class Preprocess:
    """The preprocessing of one model's input (see the module docstring).

    Attributes:
        mean: One value per input channel, in scaled units.
        std: One positive value per input channel, in scaled units.
        input_scale: Factor applied to [0, 1] pixels first.
        channel_order: "rgb" or "bgr".
        layout: "nchw" or "nhwc".
        resize: (height, width) to resize to, or None.
        origin: Where the settings came from: "options", "metadata", "assumed", or
            "data" (calibration arrays given ready for the model, not preprocessed here).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_scale: float = 1.0
    channel_order: str = "rgb"
    layout: str = "nchw"
    resize: tuple[int, int] | None = None
    origin: str = "metadata"

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Model-ready inputs (float32, in `layout`) from N x C x H x W images in [0, 1]."""
        x = images
        if self.resize is not None and tuple(x.shape[2:]) != self.resize:
            with torch.no_grad():
                x = F.interpolate(torch.from_numpy(np.ascontiguousarray(x, np.float32)), size=self.resize,
                                  mode="bilinear", align_corners=False, antialias=True).numpy()
        if self.input_scale != 1.0:
            x = x * np.float32(self.input_scale)
        if self.channel_order == "bgr":
            x = x[:, ::-1]
        x = normalize(x, list(self.mean), list(self.std))
        if self.layout == "nhwc":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return x

    def nchw_shape(self, image: ImageInput) -> tuple[int | None, int | None, int | None]:
        """The (C, H, W) an image must have before preprocessing (None: any)."""
        c, h, w = image.chw(self.layout)
        return c, *(self.resize if self.resize is not None else (h, w))  # type: ignore[return-value]

    def to_json(self) -> dict[str, object]:
        """JSON-ready form (the `efrap.preprocessing` metadata and reports)."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        out["resize"] = list(self.resize) if self.resize is not None else None
        return out

    def describe(self) -> str:
        """One line for logs and warnings."""
        size = f", resize {self.resize[0]}x{self.resize[1]}" if self.resize else ""
        return (f"mean {list(self.mean)}, std {list(self.std)}, input scale {self.input_scale:g}, "
                f"{self.channel_order.upper()}, {self.layout.upper()}{size}")


def _numbers(raw: object, what: str) -> tuple[float, ...]:
    if not isinstance(raw, list | tuple) or not raw:
        raise EfrapError(f"{what} must be a non-empty list of numbers")
    return tuple(checks.finite(v, what) for v in raw)


def from_table(table: object, source: str, origin: str = "options") -> dict[str, Any]:
    """Checked preprocessing fields from a config table (a subset of OPTION_FIELDS).

    Raises:
        EfrapError: unknown keys, wrong types or values out of range.
    """
    raw = checks.table(table, f"{source}: preprocess", set(OPTION_FIELDS))
    out: dict[str, Any] = {}
    for key, value in raw.items():
        what = f"{source}: preprocess {key}"
        if key in ("mean", "std"):
            out[key] = _numbers(value, what)
        elif key == "input_scale":
            out[key] = checks.finite(value, what, low=0.0, low_open=True)
        elif key == "channel_order":
            out[key] = checks.string(value, what, CHANNEL_ORDERS)
        elif key == "layout":
            out[key] = checks.string(value, what, LAYOUTS)
        else:
            if not isinstance(value, list | tuple) or len(value) != 2:
                raise EfrapError(f"{what} must be [height, width]")
            out[key] = (checks.integer(value[0], what, low=1, high=16384),
                        checks.integer(value[1], what, low=1, high=16384))
    return out


def checked(pre: Preprocess, channels: int, source: str) -> Preprocess:
    """`pre` if it fits a `channels`-channel input: one finite mean and positive std per channel."""
    for name, values in (("mean", pre.mean), ("std", pre.std)):
        if len(values) != channels:
            raise EfrapError(f"{source}: normalization {name} has {len(values)} values for a "
                             f"{channels}-channel input")
        if not all(math.isfinite(v) for v in values):
            raise EfrapError(f"{source}: normalization {name} holds a non-finite value")
    if any(v <= 0.0 for v in pre.std):
        raise EfrapError(f"{source}: normalization std must be positive, got {list(pre.std)}")
    if pre.channel_order == "bgr" and channels != 3:
        raise EfrapError(f"{source}: channel order bgr needs a 3-channel input, not {channels}")
    return pre


def _metadata_fields(model: onnx.ModelProto, source: str) -> tuple[dict[str, Any], str | None]:
    meta = get_metadata(model)
    for key in (PREPROCESSING_KEY, NORMALIZATION_KEY):
        raw = meta.get(key)
        if raw is None:
            continue
        try:
            spec = checks.parse_config_text(raw, f"{source}: metadata '{key}'", toml=False)
        except EfrapError:
            raise EfrapError(f"{source}: metadata '{key}' is not valid JSON") from None
        if not isinstance(spec, dict) or "mean" not in spec or "std" not in spec:
            raise EfrapError(f"{source}: metadata '{key}' must hold 'mean' and 'std' lists")
        origin = spec.pop("origin", "metadata") if key == PREPROCESSING_KEY else "metadata"
        if spec.get("resize") is None:
            spec.pop("resize", None)
        return from_table(spec, f"{source}: metadata '{key}'"), str(origin)
    return {}, None


def resolve(model: onnx.ModelProto, image: ImageInput, options: dict[str, Any] | None = None,
            source: str = "model", announce: bool = True) -> Preprocess:
    """The preprocessing of `model`'s input: options over metadata over an announced assumption.

    Args:
        model: The model.
        image: Its image input (pipeline.base.onnx_io.image_input).
        options: Checked fields from `from_table` (command line or config file).
        source: Name used in messages.
        announce: Print the one-line warning when the settings are assumed.

    Raises:
        EfrapError: invalid metadata or options, or settings that do not fit the input.
    """
    options = dict(options or {})
    meta, meta_origin = _metadata_fields(model, source)
    layout = options.get("layout") or meta.get("layout") or image.layout_guess()
    channels = image.chw(layout)[0]
    if channels is None:
        raise EfrapError(f"{source}: input '{image.name}' has no static channel count")
    fields_set = {**meta, **options, "layout": layout}
    normalised = "mean" in fields_set and "std" in fields_set
    if not normalised:
        fields_set.setdefault("mean", (0.0,) * channels)
        fields_set.setdefault("std", (1.0,) * channels)
    # Options decide when they normalise; otherwise the metadata's own origin stands.
    origin = ("options" if normalised else "assumed") if options else (meta_origin or "assumed")
    known = {f.name for f in fields(Preprocess)}
    pre = checked(Preprocess(**{k: v for k, v in fields_set.items() if k in known}, origin=origin),
                  channels, source)
    if origin == "assumed" and announce:
        log(f"warning: {source}: no preprocessing recorded in the model or given (--mean, --std, "
            f"--preprocess); assuming {pre.describe()}")
    return pre


def ready(pre: Preprocess) -> Preprocess:
    """The same preprocessing marked as given by the data (arrays already model-ready)."""
    return replace(pre, origin="data")

class PreparedImages:
    """Model-ready inputs computed batch by batch from a data set's stored pixels.

    Behaves like the N x ... float32 array `pre.apply(dataset.take(index))` for slicing
    and `len`, without ever holding all of it: calibration of a large model at a large
    resolution costs the stored pixels plus one batch.

    Args:
        dataset: The data set.
        index: Which of its images, in order.
        pre: Their preprocessing.
    """

    def __init__(self, dataset: Dataset, index: np.ndarray, pre: Preprocess) -> None:
        self.dataset = dataset
        self.index = np.asarray(index)
        self.pre = pre
        self.shape = (len(self.index), *pre.apply(dataset.take(self.index[:1])).shape[1:])
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        return self.pre.apply(self.dataset.take(self.index[key]))

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        return self[:]
