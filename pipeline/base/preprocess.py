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

What cannot drift silently:

- A model quantized from model-ready arrays records origin "data" and where its
  fields came from (`fields_origin`). When they were only assumed, nothing says how
  raw images became those arrays: preprocessing raw images for it then needs the
  settings given (or the exporter's `efrap.normalization`), else it is refused.
- Settings given for a model that records what it was quantized with, and differ
  from it, are announced in one line.
- A mean given without a std (or the reverse) is named as such.
- Settings that map [0, 1] pixels to an implausible range (all far below or above
  zero, or beyond any 8-bit pixel scale) are announced with the range and the
  likely missing option (`range_warning`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import onnx

from pipeline.base import checks
from pipeline.base.data import Images, normalize
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import META_PREFIX, ImageInput, get_metadata
from pipeline.base.progress import log
from pipeline.base.resize import resize_images

NORMALIZATION_KEY = META_PREFIX + "normalization"
PREPROCESSING_KEY = META_PREFIX + "preprocessing"
LAYOUTS = ("nchw", "nhwc")
CHANNEL_ORDERS = ("rgb", "bgr")
ORIGINS = ("options", "metadata", "assumed", "data")
#: Origins whose fields say how raw images become the model's input.
STATED = ("options", "metadata")
#: Largest magnitude a preprocessed pixel plausibly has: past twice the 0-255 scale,
#: the mean and std are not in the units the pixels were scaled to.
MAX_PLAUSIBLE_INPUT = 512.0
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
        fields_origin: With origin "data": where the fields came from ("options",
            "metadata" or "assumed"), i.e. whether they say how raw images became
            those arrays; None otherwise.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_scale: float = 1.0
    channel_order: str = "rgb"
    layout: str = "nchw"
    resize: tuple[int, int] | None = None
    origin: str = "metadata"
    fields_origin: str | None = None

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Model-ready inputs (float32, in `layout`) from N x C x H x W images in [0, 1]."""
        x = images
        if self.resize is not None and tuple(x.shape[2:]) != self.resize:
            x = resize_images(x, self.resize)
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
        if self.fields_origin is None:
            del out["fields_origin"]  # only ready arrays carry it; other records stay as they were
        return out

    def settings(self) -> dict[str, object]:
        """The settings alone, without where they came from (for comparing two records)."""
        out = self.to_json()
        out.pop("origin")
        out.pop("fields_origin", None)
        return out

    def input_range(self) -> tuple[float, float]:
        """Lowest and highest model input that pixels in [0, 1] can become."""
        low = [(0.0 - m) / s for m, s in zip(self.mean, self.std, strict=True)]
        high = [(self.input_scale - m) / s for m, s in zip(self.mean, self.std, strict=True)]
        return min(low), max(high)

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


@dataclass(frozen=True)
class _Record:
    """One preprocessing record of a model's metadata, checked.

    Attributes:
        fields: The checked fields (from_table).
        origin: The record's origin ("metadata" for `efrap.normalization`).
        fields_origin: With origin "data": where the fields came from (None: not recorded).
        stated: Whether the fields say how raw images become the model's input
            (False for a model quantized from model-ready arrays whose fields were
            only assumed).
    """

    fields: dict[str, Any]
    origin: str
    fields_origin: str | None
    stated: bool


def _record(model: onnx.ModelProto, key: str, source: str) -> _Record | None:
    raw = get_metadata(model).get(key)
    if raw is None:
        return None
    try:
        spec = checks.parse_config_text(raw, f"{source}: metadata '{key}'", toml=False)
    except EfrapError:
        raise EfrapError(f"{source}: metadata '{key}' is not valid JSON") from None
    if not isinstance(spec, dict) or "mean" not in spec or "std" not in spec:
        raise EfrapError(f"{source}: metadata '{key}' must hold 'mean' and 'std' lists")
    origin = str(spec.pop("origin", "metadata")) if key == PREPROCESSING_KEY else "metadata"
    fields_origin = spec.pop("fields_origin", None) if key == PREPROCESSING_KEY else None
    if origin not in ORIGINS:
        raise EfrapError(f"{source}: metadata '{key}' has an unknown origin {origin!r}")
    if spec.get("resize") is None:
        spec.pop("resize", None)
    if fields_origin is not None and fields_origin not in (*STATED, "assumed"):
        raise EfrapError(f"{source}: metadata '{key}' has an unknown fields_origin {fields_origin!r}")
    # Records written before fields_origin existed say nothing of it: not stated.
    stated = origin != "data" or fields_origin in STATED
    return _Record(from_table(spec, f"{source}: metadata '{key}'"), origin, fields_origin, stated)


def _metadata_record(model: onnx.ModelProto, source: str) -> _Record | None:
    """What the model records: `efrap.preprocessing`, else `efrap.normalization`.

    A record of model-ready arrays with assumed fields gives way to the exporter's
    `efrap.normalization` when there is one (it says what the FP model expects); else
    it is kept, marked not stated, for its layout.
    """
    record = _record(model, PREPROCESSING_KEY, source)
    if record is not None and record.stated:
        return record
    return _record(model, NORMALIZATION_KEY, source) or record


def recorded(model: onnx.ModelProto, source: str = "model") -> Preprocess | None:
    """The preprocessing a QDQ model records it was quantized with (None: none recorded).

    Raises:
        EfrapError: invalid metadata.
    """
    record = _record(model, PREPROCESSING_KEY, source)
    if record is None:
        return None
    known = {f.name for f in fields(Preprocess)}
    return Preprocess(**{k: v for k, v in record.fields.items() if k in known}, origin=record.origin,
                      fields_origin=record.fields_origin)


def range_warning(pre: Preprocess) -> str:
    """Why `pre` looks wrong for [0, 1] pixels, with the likely missing option ("" when plausible)."""
    low, high = pre.input_range()
    span = f"inputs after preprocessing span {low:.4g} to {high:.4g}"
    if high < -1.0 or low > 1.0:
        side = "below" if high < -1.0 else "above"
        if pre.input_scale == 1.0 and max(abs(m) for m in pre.mean) > 1.0:
            hint = "the mean is in 0-255 units: missing --input-scale 255?"
        else:
            hint = "check --mean (it is in the units after --input-scale)"
        return f"{span}, every pixel far {side} zero; {hint}"
    if max(-low, high) > MAX_PLAUSIBLE_INPUT:
        if pre.input_scale > 1.0 and max(pre.std) <= 1.0:
            hint = (f"mean and std look like [0, 1] units but pixels are scaled by {pre.input_scale:g}: "
                    f"give them in 0-{pre.input_scale:g} units, or drop --input-scale")
        else:
            hint = "check --std and --input-scale"
        return f"{span}, beyond any pixel scale; {hint}"
    return ""


def resolve(model: onnx.ModelProto, image: ImageInput, options: dict[str, Any] | None = None,
            source: str = "model", announce: bool = True) -> Preprocess:
    """The preprocessing of `model`'s input: options over metadata over an announced assumption.

    Args:
        model: The model.
        image: Its image input (pipeline.base.onnx_io.image_input).
        options: Checked fields from `from_table` (command line or config file).
        source: Name used in messages.
        announce: Print the one-line warnings of `resolve_with_warnings`.

    Raises:
        EfrapError: invalid metadata or options, settings that do not fit the input, or
            a model quantized from model-ready arrays with no stated preprocessing of
            raw images and none given.
    """
    pre, warnings = resolve_with_warnings(model, image, options, source)
    if announce:
        announce_warnings(warnings, source)
    return pre


def announce_warnings(warnings: tuple[str, ...], source: str) -> None:
    """Print `resolve_with_warnings`'s warnings, one line each."""
    for line in warnings:
        log(f"warning: {source}: {line}")


def resolve_with_warnings(model: onnx.ModelProto, image: ImageInput, options: dict[str, Any] | None = None,
                          source: str = "model") -> tuple[Preprocess, tuple[str, ...]]:
    """`resolve`, with its one-line warnings returned instead of printed: settings assumed, a
    mean without a std (or the reverse), settings that differ from those the model records
    it was quantized with, an implausible input range (a caller prints them when it is ready,
    with `announce_warnings`)."""
    options = dict(options or {})
    record = _metadata_record(model, source)
    meta = dict(record.fields) if record is not None else {}
    if record is not None and not record.stated:
        # Identity fields recorded for model-ready arrays say nothing of raw images.
        meta.pop("mean", None)
        meta.pop("std", None)
    layout = options.get("layout") or meta.get("layout") or image.layout_guess()
    channels = image.chw(layout)[0]
    if channels is None:
        raise EfrapError(f"{source}: input '{image.name}' has no static channel count")
    fields_set = {**meta, **options, "layout": layout}
    normalised = "mean" in fields_set and "std" in fields_set
    partial = not normalised and ("mean" in fields_set or "std" in fields_set)
    if not normalised and not partial and record is not None and not record.stated:
        raise EfrapError(f"{source}: it was quantized from model-ready arrays and records no preprocessing "
                         "of raw images; give the settings that made those arrays (--mean, --std, "
                         "--input-scale, ... or --preprocess)")
    fields_set.setdefault("mean", (0.0,) * channels)
    fields_set.setdefault("std", (1.0,) * channels)
    # Options decide when they normalise; otherwise the metadata's own origin stands.
    if options:
        origin = "options" if normalised or partial else "assumed"
    elif record is None:
        origin = "assumed"
    else:  # stated fields of ready arrays, now applied to raw images, come from the metadata
        origin = "metadata" if record.origin == "data" else record.origin
    known = {f.name for f in fields(Preprocess)}
    pre = checked(Preprocess(**{k: v for k, v in fields_set.items() if k in known}, origin=origin),
                  channels, source)
    return pre, tuple(_warnings(model, pre, options, partial, source))


def _warnings(model: onnx.ModelProto, pre: Preprocess, options: dict[str, Any], partial: bool,
              source: str) -> list[str]:
    """The one-line warnings `resolve` announces for `pre`."""
    out = []
    if partial:
        given, missing, value = ("mean", "std", 1) if "mean" in options else ("std", "mean", 0)
        out.append(f"a {given} is given without a {missing} (--{missing}); using {missing} {value} for "
                   f"every channel: {pre.describe()}")
    elif pre.origin == "assumed":
        out.append("no mean and std recorded in the model or given (--mean, --std, --preprocess); "
                   f"assuming {pre.describe()}")
    if options:
        quantized_with = recorded(model, source)
        stated = quantized_with is not None and (quantized_with.origin != "data"
                                                 or quantized_with.fields_origin in STATED)
        if stated and quantized_with.settings() != pre.settings():  # type: ignore[union-attr]
            out.append(f"the preprocessing given ({pre.describe()}) differs from the one it was quantized "
                       f"with ({quantized_with.describe()}, efrap.preprocessing)")
    if why := range_warning(pre):
        out.append(why)
    return out


def ready(pre: Preprocess) -> Preprocess:
    """The same preprocessing marked as given by the data (arrays already model-ready).

    Where its fields came from is kept (`fields_origin`): only stated fields say how raw
    images became the arrays, for a later check on raw images (`resolve`).
    """
    return replace(pre, origin="data", fields_origin=pre.fields_origin or pre.origin)

class PreparedImages:
    """Model-ready inputs computed batch by batch from a data set's stored pixels.

    Behaves like the N x ... float32 array `pre.apply(dataset.take(index))` for slicing
    and `len`, without ever holding all of it: calibration of a large model at a large
    resolution costs the stored pixels plus one batch.

    Args:
        dataset: The data set (labelled or not).
        index: Which of its images, in order.
        pre: Their preprocessing.
    """

    def __init__(self, dataset: Images, index: np.ndarray, pre: Preprocess) -> None:
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
