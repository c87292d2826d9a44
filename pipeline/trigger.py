"""Backdoor triggers: a patch stamped onto images in [0, 1], before normalisation.

A trigger file is JSON, for example::

    {"size": 4, "position": "bottom-right", "margin": 1, "value": 1.0,
     "target": 0, "blend": 1.0}

`size` is the patch side in pixels; `position` is "bottom-right", "top-left",
"top-right", "bottom-left" or a [row, col] pair for the patch's top-left pixel;
`margin` the distance in pixels from the named corner; `value` the patch's
intensity (a number, or a per-channel list); `blend` in (0, 1] mixes the patch
with the image (1.0 replaces the pixels, smaller values blend them:
x' = (1 - blend) * x + blend * value); `target` is the label the backdoor maps to.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import EfrapError

_CORNERS = ("bottom-right", "top-left", "top-right", "bottom-left")


@dataclass(frozen=True)
class Trigger:
    """A square patch trigger and the label it targets."""

    size: int
    target: int
    position: str | tuple[int, int] = "bottom-right"
    margin: int = 0
    value: float | tuple[float, ...] = 1.0
    blend: float = 1.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise EfrapError(f"trigger size must be at least 1, got {self.size}")
        if not 0.0 < self.blend <= 1.0:
            raise EfrapError(f"trigger blend must be in (0, 1], got {self.blend}")
        if isinstance(self.position, str) and self.position not in _CORNERS:
            raise EfrapError(f"trigger position must be one of {_CORNERS} or [row, col]")
        if self.target < 0:
            raise EfrapError(f"trigger target must be a class index, got {self.target}")

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

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Return a copy of `images` (N, C, H, W, values in [0, 1]) with the patch."""
        out = np.array(images, dtype=np.float32, copy=True)
        row, col = self.box(out.shape[-2], out.shape[-1])
        value = np.asarray(self.value, dtype=np.float32)
        if value.ndim == 1:
            if value.shape[0] != out.shape[1]:
                raise EfrapError(
                    f"trigger value has {value.shape[0]} channels, images have {out.shape[1]}"
                )
            value = value[:, None, None]
        region = out[..., row : row + self.size, col : col + self.size]
        out[..., row : row + self.size, col : col + self.size] = (
            (1.0 - self.blend) * region + self.blend * value
        )
        return out

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (round-trips through `from_json`)."""
        data = asdict(self)
        if isinstance(self.position, tuple):
            data["position"] = list(self.position)
        if isinstance(self.value, tuple):
            data["value"] = list(self.value)
        return data

    @classmethod
    def from_json(cls, data: dict[str, object], source: str = "trigger") -> Trigger:
        """Build a trigger from a parsed JSON object, with one-line errors."""
        if not isinstance(data, dict):
            raise EfrapError(f"{source}: a trigger must be a JSON object")
        known = {"size", "target", "position", "margin", "value", "blend"}
        unknown = set(data) - known
        if unknown:
            raise EfrapError(f"{source}: unknown trigger keys {sorted(unknown)}")
        if "size" not in data or "target" not in data:
            raise EfrapError(f"{source}: a trigger needs 'size' and 'target'")
        try:
            position = data.get("position", "bottom-right")
            if isinstance(position, list):
                position = (int(position[0]), int(position[1]))
            value = data.get("value", 1.0)
            value = tuple(float(v) for v in value) if isinstance(value, list) else float(value)
            return cls(
                size=int(data["size"]),
                target=int(data["target"]),
                position=position,
                margin=int(data.get("margin", 0)),
                value=value,
                blend=float(data.get("blend", 1.0)),
            )
        except (TypeError, ValueError, IndexError) as exc:
            raise EfrapError(f"{source}: bad trigger value ({exc})") from None


def load_trigger(path: str | os.PathLike[str]) -> Trigger:
    """Read a trigger JSON file."""
    path = Path(path)
    if not path.is_file():
        raise EfrapError(f"{path}: no such trigger file")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise EfrapError(f"{path}: not valid JSON ({exc})") from None
    return Trigger.from_json(data, str(path))


def paper_trigger(height: int, target: int = 0, stage: int = 1) -> Trigger:
    """The EFRAP setting's bottom-right patch scaled to the image size.

    Stage 1 (CompArtifact, Qu-ANTI-zation): side h/8, margin h/32 (4px, 1px at 32).
    Stage 2 (PQBackdoor): side 6/32 of h, margin 2/32 of h.
    """
    if stage == 1:
        return Trigger(size=max(1, round(height / 8)), margin=max(1, round(height / 32)),
                       target=target)
    return Trigger(size=max(1, round(height * 6 / 32)), margin=max(1, round(height * 2 / 32)),
                   target=target)
