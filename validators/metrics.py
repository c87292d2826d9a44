"""Clean accuracy and attack success rate from logits."""

from __future__ import annotations

import numpy as np


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of correct top-1 predictions."""
    return float((logits.argmax(axis=1) == labels).mean()) if len(labels) else 0.0


def attack_success(logits: np.ndarray, labels: np.ndarray, target: int) -> tuple[float, float]:
    """Attack success on triggered inputs.

    Returns:
        (rate over images whose true label is not the target, rate over all images).
        The first is the headline figure: images of the target class would count as
        successes without any backdoor.
    """
    hit = logits.argmax(axis=1) == target
    keep = labels != target
    rate = float(hit[keep].mean()) if keep.any() else 0.0
    return rate, float(hit.mean()) if len(hit) else 0.0


def prediction_parity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """How two sets of logits for the same inputs differ."""
    return {
        "fraction_differing_predictions": float((a.argmax(axis=1) != b.argmax(axis=1)).mean()),
        "max_logit_gap": float(np.abs(a - b).max()) if a.size else 0.0,
    }
