"""The gate report's pictures as PNG bytes (matplotlib's Agg canvas, no global state).

`matplotlib.figure.Figure` with an Agg canvas draws without pyplot, so no backend is
chosen process-wide and no window can open on a CI machine.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: Pixels per inch of every picture.
DPI = 100


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _hwc(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """C x H x W in [0, 1] -> an array imshow takes, and its colour map."""
    image = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    if image.shape[0] == 1:
        return image[0], "gray"
    return np.moveaxis(image[:3], 0, -1), None


def trigger_images(pattern: np.ndarray, mask: np.ndarray, clean: np.ndarray, triggered: np.ndarray,
                   captions: Sequence[str]) -> bytes:
    """Pattern, mask, a clean test image and its triggered copy side by side.

    Args:
        pattern: C x H x W in [0, 1] (drawn where the mask stamps it, mid-grey elsewhere).
        mask: 1 x H x W (or C x H x W) in [0, 1], the blend included.
        clean: C x H x W test image in [0, 1].
        triggered: The same image with the trigger stamped.
        captions: Four titles.
    """
    fig = Figure(figsize=(10, 2.9))
    alpha = np.clip(np.asarray(mask, np.float32), 0.0, 1.0)
    # The pattern matters only where the mask stamps it: elsewhere mid-grey.
    shown = alpha * np.asarray(pattern, np.float32) + (1.0 - alpha) * 0.5
    for ax, (image, title) in zip(fig.subplots(1, 4), zip((shown, alpha, clean, triggered), captions,
                                                          strict=True), strict=True):
        array, cmap = _hwc(image)
        ax.imshow(array, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(fig)


#: Tick-label marks of classes whose searches did not all run to their end.
STATUS_MARKS = {"cut short": "cut", "not searched": "none", "not shortlisted": "skip"}


def per_class_scan(classes: Sequence[int], differential: Sequence[float | None], fp: Sequence[float | None],
                   anomaly: Sequence[float | None], threshold: float, target: int | None,
                   status: Sequence[str] | None = None) -> bytes:
    """The scan per class: smallest trigger size (differential and FP) and the anomaly index.

    Sizes are the mask mean (share of the image) on a log scale; a class whose search
    found no trigger has size 1 and is drawn hatched. A class whose searches were cut
    short or never ran (`status`) is marked under its number, so an index is never read
    without knowing what it rests on.
    """
    fig = Figure(figsize=(10, 3.6))
    left, right = fig.subplots(1, 2)
    x = np.arange(len(classes))
    series = ((-0.2, differential, "#c0392b", "differential (nearest wakes, FP keeps)"),
              (0.2, fp, "#7f8c8d", "FP alone (Neural Cleanse)"))
    for offset, sizes, color, label in series:
        values = np.array([np.nan if v is None else 100 * v for v in sizes])
        none = values >= 100.0
        if (~none).any():
            left.bar(x[~none] + offset, values[~none], 0.4, label=label, color=color)
        if none.any():
            left.bar(x[none] + offset, values[none], 0.4, color="white", edgecolor=color, hatch="///",
                     label=f"{label.split(' (')[0]}: none found (drawn at 100%)")
    left.set_yscale("log")
    left.set_ylim(0.05, 150)
    left.set_xticks(x, [str(c) for c in classes])
    left.set_xlabel("class")
    left.set_ylabel("smallest trigger (% of the image, log)")
    left.set_title("recovered trigger size per class", fontsize=10)
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    labels = [f"{c}\n({STATUS_MARKS[st]})" if st in STATUS_MARKS else str(c)
              for c, st in zip(classes, status or ["searched"] * len(classes), strict=True)]
    left.set_xticks(x, labels)
    colors = ["#c0392b" if c == target else "#2c3e50" for c in classes]
    right.bar(x, [np.nan if v is None else v for v in anomaly], color=colors)
    right.axhline(threshold, color="#e67e22", linestyle="--", label=f"flag threshold {threshold:g}")
    right.set_xticks(x, labels)
    right.set_xlabel("class")
    right.set_ylabel("anomaly index (differential)")
    right.set_title("how much each class stands out", fontsize=10)
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    return _png(fig)


def per_class_accuracy(classes: Sequence[int], fp: Sequence[float | None],
                       defended: Sequence[float | None], label: str) -> bytes:
    """Clean accuracy per class of the FP and the defended model (test split)."""
    fig = Figure(figsize=(10, 3.2))
    ax = fig.subplots()
    x = np.arange(len(classes))
    ax.bar(x - 0.2, [np.nan if v is None else 100 * v for v in fp], 0.4, label="FP", color="#7f8c8d")
    ax.bar(x + 0.2, [np.nan if v is None else 100 * v for v in defended], 0.4, label=label, color="#27ae60")
    ax.set_xticks(x, [str(c) for c in classes])
    ax.set_xlabel("class")
    ax.set_ylabel("clean accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("clean accuracy per class, test split (onnxruntime)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    return _png(fig)
