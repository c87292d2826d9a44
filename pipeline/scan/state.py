"""What a scan has built and measured so far, and its time budget.

The stages (pipeline.scan.stages) fill a `ScanState` one after the other; the budget may
stop them at any point, and the decision and the report read whatever was done.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from pipeline.base.preprocess import Preprocess
from pipeline.base.runtime import Session
from pipeline.scan.images import ImageSet
from pipeline.scan.options import ScanOptions
from pipeline.scan.search import Found
from pipeline.scan.sides import Side

#: The searches leave time for the recovered trigger's onnxruntime figures: FIGURE_MARGIN times
#: what the same models took on the clean held-out images (measured before the searches), per
#: triggered pass, plus FIGURE_FLOOR seconds (a machine shared with other jobs runs slower).
FIGURE_MARGIN = 2.0
FIGURE_FLOOR = 0.5


@dataclass
class ScanData:
    """The scan's images in [0, 1] and their FP clean predictions."""

    opt_x: ImageSet
    opt_y: torch.Tensor
    eval_x: ImageSet
    eval_y: torch.Tensor


@dataclass
class Clock:
    """The time budget: the scan's end, the searches' end before it, and their shares."""

    end: float
    search_end: float
    left: int = 0

    def next_deadline(self) -> float:
        """Deadline of the next search: an equal share of the searches' time left."""
        now = time.perf_counter()
        share = (self.search_end - now) / max(1, self.left)
        self.left -= 1
        return now + share if math.isfinite(share) else math.inf

    def out(self) -> bool:
        """Whether the searches' time is up."""
        return time.perf_counter() >= self.search_end

    def fits(self, seconds: float) -> bool:
        """Whether `seconds` more still end within the budget."""
        return time.perf_counter() + seconds <= self.end


@dataclass
class ScanState:
    """What a scan has built and measured so far; the time budget may stop it at any stage.

    Attributes:
        stopped: The stage the budget stopped the scan before or in (None: not stopped).
        pass_seconds: What one pass of the onnxruntime sessions over the held-out images
            took (preprocessing included), measured on the clean images.
    """

    options: ScanOptions
    model_path: str
    model: onnx.ModelProto
    images: object
    pre: Preprocess
    raw: ImageSet
    raw_hold: ImageSet
    clock: Clock
    classes: int
    defended_path: str | None = None
    defended_model: onnx.ModelProto | None = None
    qdq: onnx.ModelProto | None = None
    fp: Side | None = None
    q: Side | None = None
    defended_side: Side | None = None
    data: ScanData | None = None
    drifts: np.ndarray | None = None
    sessions: dict[str, Session] = field(default_factory=dict)
    clean: dict[str, np.ndarray] = field(default_factory=dict)
    parity: dict[str, float] = field(default_factory=dict)
    pass_seconds: float = 0.0
    targets: list[int] | None = None
    planned: tuple[tuple[int, str, str], ...] = ()
    defended_planned: tuple[tuple[int, str, str], ...] = ()
    searches: dict[int, list[Found]] = field(default_factory=dict)
    defended_searches: dict[int, list[Found]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    stopped: str | None = None

    def figure_seconds(self) -> float:
        """What one triggered pass over the held-out images may take."""
        return FIGURE_MARGIN * self.pass_seconds
