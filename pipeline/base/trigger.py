"""Backdoor triggers: what an attack stamps onto images in [0, 1], before normalisation.

Every trigger follows one rule. With a pattern ``p`` (C x H x W), a mask ``m`` in
[0, 1] and a blend factor ``blend`` in (0, 1], an image ``x`` becomes::

    x' = x + blend * m * (p - x)

computed as ``(1 - a) * x + a * p`` with ``a = blend * m`` (the same value, exact at
``a = 0`` and ``a = 1``), in float32, by `apply` (numpy) and `apply_torch` (torch,
differentiable) alike: the two give bit-identical results on the same float32 input.

Two kinds follow that rule, and a third (the warp) moves pixels instead. All three are
stored as JSON:

* a **patch** (`PatchTrigger`, also called `Trigger`): a square of constant
  ``value`` (``m = 1`` on the square)::

      {"size": 4, "position": "bottom-right", "margin": 1, "value": 1.0,
       "target": 0, "blend": 1.0}

  ``kind`` may be given as "patch" and is the default. `size` is the side in pixels
  (an integer >= 1); `position` is "bottom-right", "top-left", "top-right",
  "bottom-left" or a [row, col] pair for the top-left pixel; `margin` the distance
  in pixels from the named corner; `value` a number in [0, 1] or a per-channel list
  of them; `blend` in (0, 1]; `target` the label the backdoor maps to.

* a **pattern** (`PatternTrigger`): a pattern image, an optional mask and a blend,
  which holds recovered triggers, checkerboards and blended full-image triggers::

      {"kind": "pattern", "pattern": "t.npz", "blend": 0.2, "target": 3}
      {"kind": "pattern", "pattern": "t.png", "mask": "m.png", "target": 3}

  `pattern` names a .npz (array ``pattern``, and optionally ``mask``) or a .png;
  `mask` (optional; never together with a mask inside the pattern's npz) names a
  .npz holding ``mask`` or a .png; without a mask the pattern covers the whole
  image. Arrays are C x H x W or H x W (grey), float in [0, 1] or uint8 (divided by
  255); a mask has 1 or the pattern's channels. The pattern must have the images'
  height and width: it is never resized.

* a **warp** (`WarpTrigger`): a smooth geometric warp of the whole image, after
  WaNet (Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR
  2021). Nothing is stamped, so no mask and pattern express it::

      {"kind": "warp", "grid": 4, "strength": 1.0, "seed": 7, "target": 2}

  A 2 x `grid` x `grid` field drawn uniformly in [-1, 1] from `seed` is upsampled
  bilinearly (corners aligned) to the image and scaled to a mean absolute value of 1; each
  output pixel (r, c) reads the input bilinearly at (r + strength * dr, c + strength *
  dc), the position clamped to the image. `strength` is the mean displacement per axis
  in pixels, in (0, 16]; `grid` an integer in [2, 32]; `seed` in [0, 2**32).

Trigger files are untrusted. Their JSON is typed strictly (an integer is never 2.0
or "2"), unknown keys are refused, and depth, size and NaN limits come from
`pipeline.base.checks`. Files a JSON names must be relative paths that stay inside
the JSON's folder; PNGs are read with a pixel limit (Pillow's decompression-bomb
guard included), npz files without pickles and with their array headers checked
before any data is read. Every failure is an `EfrapError` naming the file and field.
"""

from __future__ import annotations

import functools
import io
import math
import os
import warnings
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
from PIL import Image

from pipeline.base.checks import finite, integer, load_config, string, table
from pipeline.base.errors import EfrapError
from pipeline.base.safe_io import write_bytes, write_json

if TYPE_CHECKING:
    # Only for annotations: apply_torch uses the tensor's own methods, so reading a
    # trigger (for onnxruntime verification) does not import torch.
    import torch

_CORNERS = ("bottom-right", "top-left", "top-right", "bottom-left")
_PATCH_KEYS = frozenset({"kind", "size", "target", "position", "margin", "value", "blend"})
_PATTERN_KEYS = frozenset({"kind", "pattern", "mask", "blend", "target"})
_WARP_KEYS = frozenset({"kind", "grid", "strength", "seed", "target"})
#: The kinds a trigger JSON may name.
_KINDS = ("patch", "pattern", "warp")

#: Largest pattern or mask accepted, in pixels (height x width).
MAX_TRIGGER_PIXELS = 2048 * 2048
#: Most channels a pattern or mask may have.
MAX_TRIGGER_CHANNELS = 4
#: Largest file a trigger JSON may reference, in bytes.
MAX_TRIGGER_FILE_BYTES = 64 << 20
#: PNG modes read: grey (1-bit, 8-bit), palette (read as RGB) and RGB. Alpha and
#: 16-bit modes are refused rather than guessed at.
_PNG_MODES = ("1", "L", "P", "RGB")


class TriggerLike(Protocol):
    """What every trigger kind provides."""

    kind: ClassVar[str]
    target: int

    def apply(self, images: np.ndarray) -> np.ndarray: ...

    def apply_torch(self, x: torch.Tensor) -> torch.Tensor: ...

    def to_json(self) -> dict[str, object]: ...


@dataclass(frozen=True)
class _Plan:
    """How to stamp one image size: region rows/cols get ``x * keep + add``."""

    rows: slice
    cols: slice
    keep: np.ndarray  # float32, (1 or C, h, w): 1 - blend * mask
    add: np.ndarray  # float32, (1 or C, h, w): blend * mask * pattern


def _image_dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) < 3:
        raise ValueError(f"trigger images must be (N, C, H, W) or (C, H, W), got shape {shape}")
    return shape[-3], shape[-2], shape[-1]


class _Stamped:
    """`apply` and `apply_torch` from a kind's `_plan`: one rule, two libraries."""

    def _plan(self, shape: tuple[int, ...]) -> _Plan:
        raise NotImplementedError

    def apply(self, images: np.ndarray) -> np.ndarray:
        """A float32 copy of `images` (N x C x H x W or C x H x W, in [0, 1]) with the trigger."""
        out = np.array(images, dtype=np.float32, copy=True)
        plan = self._plan(out.shape)
        # Two separate float32 operations (no fused multiply-add), as in apply_torch.
        out[..., plan.rows, plan.cols] = out[..., plan.rows, plan.cols] * plan.keep + plan.add
        return out

    def apply_torch(self, x: torch.Tensor) -> torch.Tensor:
        """`apply` on a tensor: same device and dtype, differentiable with respect to `x`.

        On float32 input the result is bit-identical to `apply`.
        """
        if not x.is_floating_point():
            raise TypeError(f"apply_torch needs a floating-point tensor, got {x.dtype}")
        plan = self._plan(tuple(x.shape))
        keep = x.new_tensor(plan.keep)
        add = x.new_tensor(plan.add)
        stamped = x[..., plan.rows, plan.cols] * keep + add
        if stamped.shape == x.shape:
            return stamped
        out = x.clone()
        out[..., plan.rows, plan.cols] = stamped
        return out


@dataclass(frozen=True)
class PatchTrigger(_Stamped):
    """A square patch of constant value and the label it targets (see the module docstring).

    Attributes:
        size: Side of the square in pixels (>= 1).
        target: Label the backdoor maps to (>= 0).
        position: A corner name, or the (row, col) of the patch's top-left pixel.
        margin: Distance in pixels from the named corner (ignored for (row, col)).
        value: Intensity in [0, 1], or one per channel.
        blend: In (0, 1]; 1 replaces the pixels.
    """

    kind: ClassVar[str] = "patch"

    size: int
    target: int
    position: str | tuple[int, int] = "bottom-right"
    margin: int = 0
    value: float | tuple[float, ...] = 1.0
    blend: float = 1.0

    def __post_init__(self) -> None:
        integer(self.size, "trigger 'size'", low=1)
        integer(self.target, "trigger 'target'", low=0)
        integer(self.margin, "trigger 'margin'", low=0)
        object.__setattr__(self, "blend", finite(self.blend, "trigger 'blend'", low=0.0, high=1.0,
                                                 low_open=True))
        position = self.position
        if isinstance(position, str):
            if position not in _CORNERS:
                raise EfrapError(f"trigger 'position' must be one of {', '.join(_CORNERS)} "
                                 f"or [row, col], got {position!r}")
        elif isinstance(position, list | tuple) and len(position) == 2:
            position = (integer(position[0], "trigger 'position' row", low=0),
                        integer(position[1], "trigger 'position' column", low=0))
        else:
            raise EfrapError(f"trigger 'position' must be a corner name or [row, col], got {position!r}")
        object.__setattr__(self, "position", position)
        value = self.value
        if isinstance(value, list | tuple):
            if not value:
                raise EfrapError("trigger 'value' must not be an empty list")
            value = tuple(finite(v, "trigger 'value'", low=0.0, high=1.0) for v in value)
        else:
            value = finite(value, "trigger 'value'", low=0.0, high=1.0)  # type: ignore[arg-type]
        object.__setattr__(self, "value", value)

    def box(self, height: int, width: int) -> tuple[int, int]:
        """Top-left (row, col) of the patch on an image of the given size."""
        if isinstance(self.position, tuple):
            row, col = self.position
        else:
            vertical, horizontal = self.position.split("-")
            row = self.margin if vertical == "top" else height - self.margin - self.size
            col = self.margin if horizontal == "left" else width - self.margin - self.size
        if row < 0 or col < 0 or row + self.size > height or col + self.size > width:
            raise EfrapError(
                f"trigger patch ({self.size}px at row {row}, col {col}) does not fit "
                f"a {height}x{width} image"
            )
        return row, col

    def _plan(self, shape: tuple[int, ...]) -> _Plan:
        channels, height, width = _image_dims(shape)
        row, col = self.box(height, width)
        value = np.asarray(self.value, dtype=np.float32)
        if value.ndim == 1 and value.shape[0] != channels:
            raise EfrapError(f"trigger value has {value.shape[0]} channels, images have {channels}")
        alpha = np.float32(self.blend)
        return _Plan(rows=slice(row, row + self.size), cols=slice(col, col + self.size),
                     keep=np.full((1, 1, 1), np.float32(1.0) - alpha, dtype=np.float32),
                     add=(alpha * value).reshape(-1, 1, 1).astype(np.float32))

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (today's patch format, no "kind"; round-trips through `from_json`)."""
        data = asdict(self)
        if isinstance(self.position, tuple):
            data["position"] = list(self.position)
        if isinstance(self.value, tuple):
            data["value"] = list(self.value)
        return data

    @classmethod
    def from_json(cls, data: object, source: str = "trigger",
                  folder: str | os.PathLike[str] | None = None) -> AnyTrigger:
        """A trigger of any kind from parsed JSON (see `trigger_from_json`)."""
        return trigger_from_json(data, source, folder)


#: The patch trigger under its historical name.
Trigger = PatchTrigger


@dataclass(frozen=True, eq=False)
class PatternTrigger(_Stamped):
    """A pattern image blended in through a mask (see the module docstring).

    Arrays are copied, checked and stored read-only as float32 C x H x W.

    Attributes:
        pattern: C x H x W or H x W, float in [0, 1] or uint8.
        target: Label the backdoor maps to (>= 0).
        mask: 1 x H x W, C x H x W or H x W in [0, 1]; None: the whole image.
        blend: In (0, 1].
        name: Names the trigger in errors (its JSON file when loaded).
        pattern_file: The pattern's file as its JSON names it, when loaded or saved.
        mask_file: The mask's file as its JSON names it, when it has its own.
    """

    kind: ClassVar[str] = "pattern"

    pattern: np.ndarray
    target: int
    mask: np.ndarray | None = None
    blend: float = 1.0
    name: str = field(default="pattern trigger", compare=False)
    pattern_file: str | None = field(default=None, compare=False)
    mask_file: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        string(self.name, "trigger name")
        integer(self.target, f"{self.name}: trigger 'target'", low=0)
        object.__setattr__(self, "blend", finite(self.blend, f"{self.name}: trigger 'blend'", low=0.0,
                                                 high=1.0, low_open=True))
        pattern = _chw(_unit_array(self.pattern, f"{self.name}: pattern"), f"{self.name}: pattern")
        if self.mask is None:
            mask = np.ones((1, *pattern.shape[1:]), dtype=np.float32)
        else:
            mask = _chw(_unit_array(self.mask, f"{self.name}: mask"), f"{self.name}: mask")
        if mask.shape[1:] != pattern.shape[1:]:
            raise EfrapError(f"{self.name}: mask is {_hw(mask)}, pattern is {_hw(pattern)}")
        if mask.shape[0] not in (1, pattern.shape[0]):
            raise EfrapError(f"{self.name}: mask has {mask.shape[0]} channels, "
                             f"pattern has {pattern.shape[0]} (a mask has 1 or the same)")
        for array in (pattern, mask):
            array.setflags(write=False)
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "mask", mask)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PatternTrigger):
            return NotImplemented
        return (self.target == other.target and self.blend == other.blend
                and np.array_equal(self.pattern, other.pattern) and np.array_equal(self.mask, other.mask))

    def __hash__(self) -> int:
        return hash((self.target, self.blend, self.pattern.shape, self.pattern.tobytes()))

    def _plan(self, shape: tuple[int, ...]) -> _Plan:
        channels, height, width = _image_dims(shape)
        assert self.mask is not None  # set by __post_init__
        if self.pattern.shape[1:] != (height, width):
            raise EfrapError(f"{self.name}: the pattern is {_hw(self.pattern)}, the images are "
                             f"{height}x{width} (a pattern trigger is never resized)")
        for what, array in (("pattern", self.pattern), ("mask", self.mask)):
            if array.shape[0] not in (1, channels):
                raise EfrapError(f"{self.name}: the {what} has {array.shape[0]} channels, "
                                 f"the images have {channels}")
        alpha = np.float32(self.blend) * self.mask
        return _Plan(rows=slice(0, height), cols=slice(0, width),
                     keep=np.float32(1.0) - alpha, add=alpha * self.pattern)

    def to_json(self, pattern_file: str | None = None) -> dict[str, object]:
        """The JSON that refers to this trigger's files.

        Args:
            pattern_file: An npz holding both `pattern` and `mask` (what `save_trigger`
                writes); by default the files the trigger was loaded from.

        Raises:
            EfrapError: no file given and none known (an unsaved trigger: use
                `save_trigger`).
        """
        if pattern_file is None and self.pattern_file is None:
            raise EfrapError(f"{self.name}: a pattern trigger's JSON names its files; "
                             "save it with save_trigger first")
        data: dict[str, object] = {"kind": self.kind, "pattern": pattern_file or self.pattern_file,
                                   "blend": self.blend, "target": self.target}
        if pattern_file is None and self.mask_file is not None:
            data["mask"] = self.mask_file
        return data

    @classmethod
    def from_json(cls, data: object, source: str = "trigger",
                  folder: str | os.PathLike[str] | None = None) -> AnyTrigger:
        """A trigger of any kind from parsed JSON (see `trigger_from_json`)."""
        return trigger_from_json(data, source, folder)


@dataclass(frozen=True)
class _WarpPlan:
    """Where each output pixel reads: four flat source indices and their float32 weights."""

    index: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # int64, (H * W,) each
    weight: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # float32, (H * W,) each


def _upsample_matrix(size: int, grid: int) -> np.ndarray:
    """(size, grid) float64 weights of bilinear interpolation with the corners aligned."""
    pos = np.zeros(size) if size == 1 else np.arange(size) * ((grid - 1) / (size - 1))
    low = np.minimum(np.floor(pos).astype(np.int64), grid - 2)
    frac = pos - low
    out = np.zeros((size, grid))
    out[np.arange(size), low] = 1.0 - frac
    out[np.arange(size), low + 1] += frac
    return out


@functools.lru_cache(maxsize=16)
def _warp_plan(grid: int, strength: float, seed: int, height: int, width: int) -> _WarpPlan:
    field_ = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(2, grid, grid))
    # einsum without BLAS: the same float64 sums whatever the thread count.
    flow = np.einsum("hi,kij,wj->khw", _upsample_matrix(height, grid), field_,
                     _upsample_matrix(width, grid), optimize=False)
    flow /= max(float(np.abs(flow).mean()), 1e-12)  # strength = mean displacement per axis
    rows = np.clip(np.arange(height)[:, None] + strength * flow[0], 0.0, height - 1.0)
    cols = np.clip(np.arange(width)[None, :] + strength * flow[1], 0.0, width - 1.0)
    r0 = np.floor(rows).astype(np.int64)
    c0 = np.floor(cols).astype(np.int64)
    r1 = np.minimum(r0 + 1, height - 1)
    c1 = np.minimum(c0 + 1, width - 1)
    fr = rows - r0
    fc = cols - c0
    index = tuple((r * width + c).reshape(-1) for r, c in ((r0, c0), (r0, c1), (r1, c0), (r1, c1)))
    weight = tuple(w.reshape(-1).astype(np.float32) for w in
                   ((1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc))
    for array in (*index, *weight):
        array.setflags(write=False)
    return _WarpPlan(index=index, weight=weight)  # type: ignore[arg-type]


@dataclass(frozen=True)
class WarpTrigger:
    """A smooth warp of the whole image and the label it targets (see the module docstring).

    Attributes:
        target: Label the backdoor maps to (>= 0).
        grid: Side of the random control field, in [2, 32] (smaller: smoother).
        strength: Mean displacement per axis in pixels, in (0, 16].
        seed: Draws the field, in [0, 2**32).
    """

    kind: ClassVar[str] = "warp"

    target: int
    grid: int = 4
    strength: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        integer(self.target, "trigger 'target'", low=0)
        integer(self.grid, "trigger 'grid'", low=2, high=32)
        integer(self.seed, "trigger 'seed'", low=0, high=2**32 - 1)
        object.__setattr__(self, "strength", finite(self.strength, "trigger 'strength'", low=0.0,
                                                    high=16.0, low_open=True))

    def _plan(self, shape: tuple[int, ...]) -> _WarpPlan:
        _, height, width = _image_dims(shape)
        return _warp_plan(self.grid, self.strength, self.seed, height, width)

    def apply(self, images: np.ndarray) -> np.ndarray:
        """A float32 warped copy of `images` (N x C x H x W or C x H x W, in [0, 1])."""
        x = np.asarray(images, dtype=np.float32)
        plan = self._plan(x.shape)
        flat = x.reshape(*x.shape[:-2], -1)
        # Four products summed left to right in float32, as in apply_torch.
        i, w = plan.index, plan.weight
        out = (flat[..., i[0]] * w[0] + flat[..., i[1]] * w[1]
               + flat[..., i[2]] * w[2] + flat[..., i[3]] * w[3])
        return out.reshape(x.shape)

    def apply_torch(self, x: torch.Tensor) -> torch.Tensor:
        """`apply` on a tensor: same device and dtype, differentiable with respect to `x`.

        On float32 input the result is bit-identical to `apply`.
        """
        if not x.is_floating_point():
            raise TypeError(f"apply_torch needs a floating-point tensor, got {x.dtype}")
        plan = self._plan(tuple(x.shape))
        flat = x.reshape(*x.shape[:-2], -1)
        int64 = x.new_zeros(()).long().dtype  # torch's int64, without importing torch here
        index = [x.new_tensor(i, dtype=int64) for i in plan.index]
        weight = [x.new_tensor(w) for w in plan.weight]
        out = (flat[..., index[0]] * weight[0] + flat[..., index[1]] * weight[1]
               + flat[..., index[2]] * weight[2] + flat[..., index[3]] * weight[3])
        return out.reshape(x.shape)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (round-trips through `from_json`)."""
        return {"kind": self.kind, "grid": self.grid, "strength": self.strength, "seed": self.seed,
                "target": self.target}

    @classmethod
    def from_json(cls, data: object, source: str = "trigger",
                  folder: str | os.PathLike[str] | None = None) -> AnyTrigger:
        """A trigger of any kind from parsed JSON (see `trigger_from_json`)."""
        return trigger_from_json(data, source, folder)


AnyTrigger = PatchTrigger | PatternTrigger | WarpTrigger

# ---------------------------------------------------------------------------- arrays


def _hw(array: np.ndarray) -> str:
    return f"{array.shape[-2]}x{array.shape[-1]}"


def _unit_array(array: object, what: str) -> np.ndarray:
    """`array` as float32 in [0, 1]: uint8 divided by 255, bool as 0/1, floats checked."""
    if not isinstance(array, np.ndarray):
        raise EfrapError(f"{what} must be a numpy array, got {type(array).__name__}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype.kind != "f":
        raise EfrapError(f"{what} has dtype {array.dtype}; use float values in [0, 1] or uint8")
    if array.size == 0:
        raise EfrapError(f"{what} is empty")
    if not np.isfinite(array).all():
        raise EfrapError(f"{what} has NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise EfrapError(f"{what} values must lie in [0, 1], got {low:g} to {high:g}")
    return array.astype(np.float32)


def _chw(array: np.ndarray, what: str) -> np.ndarray:
    """`array` as C x H x W (an H x W array is one channel), within the size limits."""
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or 0 in array.shape:
        raise EfrapError(f"{what} must be C x H x W or H x W, got shape {tuple(array.shape)}")
    if array.shape[0] > MAX_TRIGGER_CHANNELS:
        raise EfrapError(f"{what} has {array.shape[0]} channels, more than {MAX_TRIGGER_CHANNELS} "
                         f"(arrays are C x H x W)")
    if array.shape[1] * array.shape[2] > MAX_TRIGGER_PIXELS:
        raise EfrapError(f"{what} is {_hw(array)}, more than {MAX_TRIGGER_PIXELS} pixels")
    return array


def _read_npy(fh: io.BufferedIOBase, what: str) -> np.ndarray:
    """One .npy member, its header checked before its data is read (no pickles, no bombs)."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise EfrapError(f"{what}: unsupported .npy version {version}")
    if dtype.hasobject or not (dtype.kind == "f" or dtype in (np.dtype(np.uint8), np.dtype(np.bool_))):
        raise EfrapError(f"{what} has dtype {dtype}; use float values in [0, 1] or uint8")
    if len(shape) not in (2, 3) or any(n < 1 for n in shape):
        raise EfrapError(f"{what} must be C x H x W or H x W, got shape {shape}")
    channels = shape[0] if len(shape) == 3 else 1
    if channels > MAX_TRIGGER_CHANNELS or shape[-2] * shape[-1] > MAX_TRIGGER_PIXELS:
        raise EfrapError(f"{what} has shape {shape}, more than {MAX_TRIGGER_CHANNELS} channels of "
                         f"{MAX_TRIGGER_PIXELS} pixels")
    nbytes = math.prod(shape) * dtype.itemsize
    data = fh.read(nbytes)
    if len(data) != nbytes:
        raise EfrapError(f"{what} is truncated")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _read_npz(path: Path, what: str, allowed: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of an npz whose members are all among `allowed` (names without .npy)."""
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                key = info.filename.removesuffix(".npy")
                if not info.filename.endswith(".npy") or key not in allowed or key in arrays:
                    raise EfrapError(f"{what}: unexpected member {info.filename!r} "
                                     f"(an npz here holds {', '.join(allowed)})")
                with zf.open(info) as fh:
                    arrays[key] = _read_npy(fh, f"{what}: array '{key}'")  # type: ignore[arg-type]
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as exc:
        raise EfrapError(f"{what}: not a readable npz ({exc})") from None
    return {key: _unit_array(array, f"{what}: array '{key}'") for key, array in arrays.items()}


def _read_png(path: Path, what: str) -> np.ndarray:
    """A PNG as uint8 C x H x W, refusing decompression bombs before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # Pillow warns past MAX_IMAGE_PIXELS and fails past twice that: both are refusals.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format != "PNG":
                    raise EfrapError(f"{what}: not a PNG (found {im.format})")
                width, height = im.size
                if width * height > MAX_TRIGGER_PIXELS:
                    raise EfrapError(f"{what}: refused, {width}x{height} is more than "
                                     f"{MAX_TRIGGER_PIXELS} pixels (a decompression bomb?)")
                if im.mode not in _PNG_MODES:
                    raise EfrapError(f"{what}: PNG mode {im.mode} is not read; save it as "
                                     f"grey (L) or RGB")
                pixels = np.asarray(im.convert("L" if im.mode in ("1", "L") else "RGB"), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise EfrapError(f"{what}: refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, zlib.error) as exc:
        raise EfrapError(f"{what}: not a readable PNG ({exc})") from None
    return pixels if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An npz (np.load reads it) with fixed timestamps, so the same arrays give the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue())
    return buffer.getvalue()


# ---------------------------------------------------------------------------- JSON


def _reference(ref: object, folder: Path, what: str) -> Path:
    """The file a trigger JSON names: a relative path that stays inside `folder`."""
    text = string(ref, what)
    if not text or "\x00" in text or "\\" in text:
        raise EfrapError(f"{what} must be a relative file path using '/', got {text!r}")
    rel = Path(text)
    if rel.is_absolute() or PureWindowsPath(text).drive or ".." in rel.parts:
        raise EfrapError(f"{what} must be a relative path inside the trigger's folder, got {text!r}")
    path = folder / rel
    try:
        base, resolved = folder.resolve(), path.resolve()
    except (OSError, RuntimeError) as exc:
        raise EfrapError(f"{what}: cannot resolve {text!r} ({exc})") from None
    # A symlink inside the folder may still point outside it.
    if base not in resolved.parents:
        raise EfrapError(f"{what}: {text!r} leads outside the trigger's folder")
    if path.suffix.lower() not in (".npz", ".png"):
        raise EfrapError(f"{what} must name a .npz or .png file, got {text!r}")
    return path


def _kind(data: object, source: str) -> str:
    table(data, f"{source}: trigger")
    assert isinstance(data, dict)
    return string(data.get("kind", "patch"), f"{source}: trigger 'kind'", _KINDS)


@dataclass(frozen=True)
class _PatternSpec:
    """A pattern trigger's JSON, checked; its files not yet read."""

    pattern_ref: str
    pattern_path: Path
    mask_ref: str | None
    mask_path: Path | None
    blend: float
    target: int


def _pattern_spec(data: dict[str, object], source: str, folder: Path) -> _PatternSpec:
    table(data, f"{source}: trigger", _PATTERN_KEYS)
    for key in ("pattern", "target"):
        if key not in data:
            raise EfrapError(f"{source}: a pattern trigger needs '{key}'")
    pattern_path = _reference(data["pattern"], folder, f"{source}: trigger 'pattern'")
    mask_path = None
    if "mask" in data:
        mask_path = _reference(data["mask"], folder, f"{source}: trigger 'mask'")
    return _PatternSpec(
        pattern_ref=str(data["pattern"]), pattern_path=pattern_path,
        mask_ref=None if mask_path is None else str(data["mask"]), mask_path=mask_path,
        blend=finite(data.get("blend", 1.0), f"{source}: trigger 'blend'",  # type: ignore[arg-type]
                     low=0.0, high=1.0, low_open=True),
        target=integer(data["target"], f"{source}: trigger 'target'", low=0),
    )


def _read_array_file(path: Path, what: str, allowed: tuple[str, ...]) -> dict[str, np.ndarray]:
    """{name: float32 array} from an npz (members among `allowed`) or a PNG (as `allowed[0]`)."""
    try:
        if not path.is_file():
            raise EfrapError(f"{what}: no such file {path}")
        size = path.stat().st_size
    except OSError as exc:
        raise EfrapError(f"{what}: cannot read {path} ({exc.strerror})") from None
    if size > MAX_TRIGGER_FILE_BYTES:
        raise EfrapError(f"{what}: {path} is larger than {MAX_TRIGGER_FILE_BYTES >> 20} MiB")
    if path.suffix.lower() == ".png":
        return {allowed[0]: _unit_array(_read_png(path, what), what)}
    return _read_npz(path, what, allowed)


def _pattern_from_json(data: dict[str, object], source: str, folder: Path) -> PatternTrigger:
    spec = _pattern_spec(data, source, folder)
    what = f"{source}: trigger 'pattern' ({spec.pattern_ref})"
    arrays = _read_array_file(spec.pattern_path, what, ("pattern", "mask"))
    if "pattern" not in arrays:
        raise EfrapError(f"{what}: holds no array 'pattern'")
    mask = arrays.get("mask")
    if spec.mask_path is not None:
        if mask is not None:
            raise EfrapError(f"{source}: trigger 'mask' is given twice (in {spec.pattern_ref} "
                             f"and as {spec.mask_ref})")
        mask_what = f"{source}: trigger 'mask' ({spec.mask_ref})"
        masks = _read_array_file(spec.mask_path, mask_what, ("mask",))
        if "mask" not in masks:
            raise EfrapError(f"{mask_what}: holds no array 'mask'")
        mask = masks["mask"]
    return PatternTrigger(pattern=arrays["pattern"], target=spec.target, mask=mask, blend=spec.blend,
                          name=source, pattern_file=spec.pattern_ref, mask_file=spec.mask_ref)


def _scalar_trigger(cls: type[PatchTrigger] | type[WarpTrigger], keys: frozenset[str],
                    required: tuple[str, ...], data: dict[str, object],
                    source: str) -> PatchTrigger | WarpTrigger:
    """A trigger whose JSON holds all of it (no files): checked keys, then the class's own checks."""
    table(data, f"{source}: trigger", keys)
    for key in required:
        if key not in data:
            raise EfrapError(f"{source}: a {cls.kind} trigger needs '{key}'")
    fields = {k: v for k, v in data.items() if k != "kind"}
    try:
        return cls(**fields)  # type: ignore[arg-type]
    except EfrapError as exc:
        raise EfrapError(f"{source}: {exc}") from None


def _patch_from_json(data: dict[str, object], source: str) -> PatchTrigger:
    return _scalar_trigger(PatchTrigger, _PATCH_KEYS, ("size", "target"), data, source)  # type: ignore[return-value]


def _warp_from_json(data: dict[str, object], source: str) -> WarpTrigger:
    return _scalar_trigger(WarpTrigger, _WARP_KEYS, ("target",), data, source)  # type: ignore[return-value]


def trigger_from_json(data: object, source: str = "trigger",
                      folder: str | os.PathLike[str] | None = None) -> AnyTrigger:
    """A trigger from a parsed JSON object, by its "kind" (default "patch").

    Args:
        data: The parsed JSON.
        source: Names the trigger in errors (its file).
        folder: Where a pattern trigger's files are (default: `source`'s folder).

    Raises:
        EfrapError: one line naming `source` and the field.
    """
    kind = _kind(data, source)
    assert isinstance(data, dict)
    if kind == "pattern":
        return _pattern_from_json(data, source, Path(folder) if folder is not None else Path(source).parent)
    if kind == "warp":
        return _warp_from_json(data, source)
    return _patch_from_json(data, source)


def _load_json(path: Path) -> object:
    if path.suffix.lower() == ".toml":
        raise EfrapError(f"{path}: a trigger file is JSON")
    return load_config(path, "trigger")


def load_trigger(path: str | os.PathLike[str]) -> AnyTrigger:
    """Read a trigger JSON file of any kind (and the files it names)."""
    path = Path(path)
    return trigger_from_json(_load_json(path), str(path), path.parent)


def trigger_files(path: str | os.PathLike[str]) -> list[Path]:
    """The trigger JSON and every file it names (the inputs a command must not overwrite).

    The JSON is checked as `load_trigger` checks it; the named files are not read.
    """
    path = Path(path)
    data = _load_json(path)
    kind = _kind(data, str(path))
    if kind == "patch":
        _patch_from_json(data, str(path))  # type: ignore[arg-type]
        return [path]
    if kind == "warp":
        _warp_from_json(data, str(path))  # type: ignore[arg-type]
        return [path]
    spec = _pattern_spec(data, str(path), path.parent)  # type: ignore[arg-type]
    return [path, spec.pattern_path] + ([spec.mask_path] if spec.mask_path is not None else [])


def save_trigger(trigger: AnyTrigger, path: str | os.PathLike[str]) -> list[Path]:
    """Write a trigger atomically: its JSON, and for a pattern trigger a sibling ``<stem>.npz``.

    The npz holds float32 `pattern` and `mask` and the JSON names it; it is written
    first, so the JSON never names a file that is not there.

    Returns:
        The files written, the JSON first.
    """
    path = Path(path)
    if isinstance(trigger, PatternTrigger):
        npz = path.with_name(path.stem + ".npz")
        if npz.name == path.name:
            raise EfrapError(f"{path}: name the trigger's JSON file, not its .npz")
        assert trigger.mask is not None  # set by __post_init__
        write_bytes(npz, _npz_bytes({"pattern": trigger.pattern, "mask": trigger.mask}))
        write_json(trigger.to_json(npz.name), path)
        return [path, npz]
    if not isinstance(trigger, PatchTrigger | WarpTrigger):
        raise TypeError(f"not a trigger: {type(trigger).__name__}")
    write_json(trigger.to_json(), path)
    return [path]


# ---------------------------------------------------------------------------- builders


def paper_trigger(height: int, target: int = 0, stage: int = 1) -> PatchTrigger:
    """The EFRAP setting's bottom-right patch scaled to the image size.

    Stage 1 (CompArtifact, Qu-ANTI-zation): side h/8, margin h/32 (4px, 1px at 32).
    Stage 2 (PQBackdoor): side 6/32 of h, margin 2/32 of h.
    """
    if stage == 1:
        return PatchTrigger(size=max(1, round(height / 8)), margin=max(1, round(height / 32)),
                            target=target)
    return PatchTrigger(size=max(1, round(height * 6 / 32)), margin=max(1, round(height * 2 / 32)),
                        target=target)


def checkerboard(size: int | None, height: int, width: int, channels: int = 1, target: int = 0, *,
                 position: str | tuple[int, int] = "bottom-right", margin: int = 0,
                 blend: float = 1.0, cell: int = 1) -> PatternTrigger:
    """A black-and-white checkerboard, on a square patch or over the whole image.

    Args:
        size: Side of the square patch in pixels, placed like a `PatchTrigger`'s
            (`position`, `margin`); None covers the whole image.
        height: Image height the trigger is for.
        width: Image width.
        channels: Image channels.
        target: Label the backdoor maps to.
        position: Corner name or (row, col) of the patch.
        margin: Distance from the named corner.
        blend: In (0, 1].
        cell: Side of one checker square in pixels; the top-left one is white.
    """
    integer(height, "checkerboard height", low=1)
    integer(width, "checkerboard width", low=1)
    integer(channels, "checkerboard channels", low=1, high=MAX_TRIGGER_CHANNELS)
    integer(cell, "checkerboard cell", low=1)
    if size is None:
        row, col, rows, cols = 0, 0, height, width
    else:
        row, col = PatchTrigger(size=size, target=target, position=position, margin=margin).box(height, width)
        rows = cols = size
    r = np.arange(rows)[:, None] // cell
    c = np.arange(cols)[None, :] // cell
    board = ((r + c) % 2 == 0).astype(np.float32)
    pattern = np.zeros((channels, height, width), dtype=np.float32)
    mask = np.zeros((1, height, width), dtype=np.float32)
    pattern[:, row : row + rows, col : col + cols] = board
    mask[:, row : row + rows, col : col + cols] = 1.0
    label = "full-image" if size is None else f"{size}px"
    return PatternTrigger(pattern=pattern, target=target, mask=mask, blend=blend,
                          name=f"checkerboard trigger ({label})")


def blended(pattern: np.ndarray, blend: float, target: int) -> PatternTrigger:
    """A full-image blended trigger: ``x' = (1 - blend) * x + blend * pattern``.

    Args:
        pattern: C x H x W or H x W, float in [0, 1] or uint8, of the images' size.
        blend: In (0, 1].
        target: Label the backdoor maps to.
    """
    return PatternTrigger(pattern=np.asarray(pattern), target=target, blend=blend, name="blended trigger")
