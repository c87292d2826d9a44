"""The defense's own check: does the defended model still do what the FP model does?

A release pipeline must not ship a defended model that lost accuracy without being
told. On held-out images (never used for calibration), both models run in
onnxruntime; the report gives how often their top-1 predictions agree, and clean
accuracy of both where the images have labels. Limits turn it into a pass/fail
check that fails closed: a figure that cannot be measured (no labels for an accuracy
limit) fails its limit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

from pipeline.base.checks import finite
from pipeline.base.errors import EfrapError
from pipeline.base.runtime import Session, make_session


@dataclass(frozen=True)
class GuardLimits:
    """Budget of the defense; None disables a limit.

    Attributes:
        max_agreement_drop: Largest share of held-out images whose top-1 prediction may
            differ from the FP model's (1 - agreement).
        min_accuracy: Lowest clean accuracy of the defended model on the held-out images.
    """

    max_agreement_drop: float | None = None
    min_accuracy: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_agreement_drop", "min_accuracy"):
            value = getattr(self, name)
            if value is not None:
                finite(value, name, low=0.0, high=1.0)
        if self.max_agreement_drop == 1.0 or self.min_accuracy == 0.0:
            raise EfrapError("a defense budget that every model meets is no check; give a limit that "
                             "can fail")


@dataclass(frozen=True)
class GuardReport:
    """What the check measured, and whether the defense kept within its budget.

    Attributes:
        images: Held-out images measured.
        agreement: Share of them whose top-1 prediction equals the FP model's.
        accuracy: Clean accuracy of the defended model (None without labels).
        fp_accuracy: Clean accuracy of the FP model (None without labels).
        opt_level: onnxruntime optimization level of both runs.
        provider: onnxruntime provider.
        passed: Whether every limit held (True when none was set).
        why: One line per broken limit.
    """

    images: int
    agreement: float
    accuracy: float | None
    fp_accuracy: float | None
    opt_level: str
    provider: str
    passed: bool
    why: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """JSON-ready dict (report and the output's `efrap.guard` metadata)."""
        return asdict(self)


def _logits(session: Session, inputs: object, batch: int | None) -> np.ndarray:
    step = batch or 256
    parts = []
    for start in range(0, len(inputs), step):  # type: ignore[arg-type]
        feed = np.asarray(inputs[start : start + step])  # type: ignore[index]
        n = len(feed)
        if batch is not None and n < batch:  # a fixed batch: pad the last one
            feed = np.concatenate([feed, np.repeat(feed[:1], batch - n, axis=0)])
        parts.append(session.session.run(None, {session.input_name: feed})[0][:n])
    return np.concatenate(parts)


def check_defense(fp: onnx.ModelProto, defended: onnx.ModelProto, inputs: object,
                  labels: np.ndarray | None, limits: GuardLimits, opt_level: str = "faithful",
                  provider: str = "auto", batch: int | None = None) -> GuardReport:
    """Run both models on held-out model-ready `inputs` and check the budget.

    Args:
        fp: The full-precision model.
        defended: The defended QDQ model.
        inputs: Model-ready held-out inputs (an array or anything sliceable with a length).
        labels: Their labels, or None for unlabelled images.
        limits: The budget.
        opt_level: onnxruntime optimization level.
        provider: onnxruntime provider.
        batch: The models' fixed batch size, or None.
    """
    fp_session = make_session(fp, opt_level, provider)
    q_session = make_session(defended, opt_level, provider)
    a = _logits(fp_session, inputs, batch)
    b = _logits(q_session, inputs, batch)
    top_a, top_b = a.reshape(len(a), -1).argmax(1), b.reshape(len(b), -1).argmax(1)
    agreement = float((top_a == top_b).mean())
    accuracy = fp_accuracy = None
    if labels is not None:
        accuracy, fp_accuracy = float((top_b == labels).mean()), float((top_a == labels).mean())
    why = []
    if limits.max_agreement_drop is not None and 1.0 - agreement > limits.max_agreement_drop:
        why.append(f"agreement with FP {100 * agreement:.2f}%: the drop {100 * (1 - agreement):.2f}% is "
                   f"above the limit {100 * limits.max_agreement_drop:.2f}%")
    if limits.min_accuracy is not None:
        if accuracy is None:
            why.append("clean accuracy is not measurable: the held-out images have no labels")
        elif accuracy < limits.min_accuracy:
            why.append(f"clean accuracy {100 * accuracy:.2f}% is below the limit "
                       f"{100 * limits.min_accuracy:.2f}%")
    return GuardReport(images=len(a), agreement=agreement, accuracy=accuracy, fp_accuracy=fp_accuracy,
                       opt_level=opt_level, provider=q_session.provider, passed=not why, why=tuple(why))
