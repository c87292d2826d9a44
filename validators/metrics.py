"""Clean accuracy and attack success rate from logits.

A figure that cannot be measured (no image it is defined on, or logits that hold
NaN or Inf, whose argmax means nothing) is None, never 0: a gate that asks for it
then fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def nonfinite_rows(logits: np.ndarray) -> int:
    """How many rows (images) of `logits` hold NaN or Inf."""
    return int((~np.isfinite(logits).all(axis=1)).sum()) if logits.size else 0


def why_not_measurable(logits: np.ndarray, what: str) -> str:
    """Why figures from `logits` cannot be measured ("" when they can)."""
    if not len(logits):
        return f"no {what} images"
    bad = nonfinite_rows(logits)
    return f"the model's outputs hold NaN or Inf on {bad} of {len(logits)} {what} images" if bad else ""


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float | None:
    """Fraction of correct top-1 predictions (None without images or with non-finite logits)."""
    if not len(labels) or nonfinite_rows(logits):
        return None
    return float((logits.argmax(axis=1) == labels).mean())


@dataclass(frozen=True)
class AttackSuccess:
    """Attack success on triggered inputs.

    Attributes:
        rate: Fraction of triggered images whose true label is not the target that are
            classified as the target: the headline figure (images of the target class
            would count as successes without any backdoor). None when no such image
            was measured.
        rate_all: The same over every triggered image (None without images).
        non_target_images: How many images `rate` is measured on.
    """

    rate: float | None
    rate_all: float | None
    non_target_images: int


def attack_success(logits: np.ndarray, labels: np.ndarray, target: int) -> AttackSuccess:
    """Attack success of triggered-image logits against their true labels.

    Both rates are None when any logit is NaN or Inf (not measurable).
    """
    keep = labels != target
    if nonfinite_rows(logits):
        return AttackSuccess(rate=None, rate_all=None, non_target_images=int(keep.sum()))
    hit = logits.argmax(axis=1) == target
    return AttackSuccess(
        rate=float(hit[keep].mean()) if keep.any() else None,
        rate_all=float(hit.mean()) if len(hit) else None,
        non_target_images=int(keep.sum()),
    )


@dataclass(frozen=True)
class Parity:
    """How the deployed model's logits compare with a reference computation of them.

    Attributes:
        reference: What the reference is ("pytorch simulation").
        fraction_differing_predictions: Share of inputs whose top-1 class differs
            (None when the reference could not run).
        max_logit_gap: Largest absolute logit difference (None likewise).
        why: Why the reference could not run, when it could not.
    """

    reference: str
    fraction_differing_predictions: float | None
    max_logit_gap: float | None
    why: str = ""


def prediction_parity(a: np.ndarray, b: np.ndarray, reference: str) -> Parity:
    """How two sets of logits for the same inputs differ (not measured when either is not finite)."""
    for name, logits in (("deployed model", a), (reference, b)):
        bad = nonfinite_rows(logits)
        if bad:
            return Parity(reference, None, None,
                          why=f"the {name}'s outputs hold NaN or Inf on {bad} of {len(logits)} images")
    return Parity(
        reference=reference,
        fraction_differing_predictions=float((a.argmax(axis=1) != b.argmax(axis=1)).mean()),
        max_logit_gap=float(np.abs(a - b).max()) if a.size else 0.0,
    )
