"""The defense's own check: does the defended model still do what the FP model does?

A release pipeline must not ship a quantized model that lost accuracy without being
told. On held-out images (never used for calibration), both models run in
onnxruntime; the report gives every output's fidelity (`validators.fidelity`: top-1
agreement for a classifier's logits, relative error for every output) and clean
accuracy of both where the images have labels. Every quantize runs it. Limits turn it into a pass/fail
check that fails closed: a figure that cannot be measured (no labels for an accuracy
limit) fails its limit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

from pipeline.base.checks import finite
from pipeline.base.errors import EfrapError
from validators.fidelity import FidelityReport, measure_fidelity


@dataclass(frozen=True)
class GuardLimits:
    """Budget of the defense; None disables a limit.

    Attributes:
        max_agreement_drop: Largest share of held-out images whose top-1 prediction may
            differ from the FP model's (1 - agreement; the first output, a classifier's).
        min_accuracy: Lowest clean accuracy of the defended model on the held-out images.
        max_output_error: Largest relative error ||q - fp|| / ||fp|| of any output (the
            figure of outputs that have no top-1: boxes, maps, embeddings).
    """

    max_agreement_drop: float | None = None
    min_accuracy: float | None = None
    max_output_error: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_agreement_drop", "min_accuracy"):
            value = getattr(self, name)
            if value is not None:
                finite(value, name, low=0.0, high=1.0)
        if self.max_output_error is not None:
            finite(self.max_output_error, "max_output_error", low=0.0)
        if self.max_agreement_drop == 1.0 or self.min_accuracy == 0.0:
            raise EfrapError("a defense budget that every model meets is no check; give a limit that "
                             "can fail")

    @property
    def any(self) -> bool:
        """Whether a limit is set."""
        return any(v is not None for v in (self.max_agreement_drop, self.min_accuracy, self.max_output_error))


@dataclass(frozen=True)
class GuardReport:
    """What the check measured, and whether the output kept within its budget.

    Attributes:
        images: Held-out images measured (0: none was left; every figure is then None).
        agreement: Share of them whose top-1 prediction equals the FP model's (None: the
            first output is not a classifier's, or nothing was measured).
        accuracy: Clean accuracy of the quantized model (None without labels).
        fp_accuracy: Clean accuracy of the FP model (None without labels).
        opt_level: onnxruntime optimization level of both runs.
        provider: onnxruntime provider.
        passed: Whether every limit held (True when none was set).
        why: One line per broken or unmeasurable limit.
        output_error: The largest relative error over the outputs (None: not measurable).
        fidelity: Every output's figures (None when nothing was measured).
        note: Why nothing was measured, when nothing was.
    """

    images: int
    agreement: float | None
    accuracy: float | None
    fp_accuracy: float | None
    opt_level: str
    provider: str
    passed: bool
    why: tuple[str, ...] = ()
    output_error: float | None = None
    fidelity: FidelityReport | None = None
    note: str = ""

    def to_json(self) -> dict:
        """JSON-ready dict (report and the output's `efrap.guard` metadata)."""
        return {**asdict(self), "why": list(self.why),
                "fidelity": None if self.fidelity is None else self.fidelity.to_json()}


NOT_CLASSIFIER = ("the first output is not a classifier's (batch x classes); limit the relative "
                  "output error instead")


def _judge(limits: GuardLimits, agreement: float | None, accuracy: float | None,
           output_error: float | None, missing: str) -> list[str]:
    """One line per limit that is broken or cannot be judged (`missing`: why nothing was measured)."""
    why = []
    if limits.max_agreement_drop is not None:
        if agreement is None:
            reason = missing or NOT_CLASSIFIER
            why.append(f"agreement with FP is not measurable: {reason}")
        elif 1.0 - agreement > limits.max_agreement_drop:
            why.append(f"agreement with FP {100 * agreement:.2f}%: the drop {100 * (1 - agreement):.2f}% is "
                       f"above the limit {100 * limits.max_agreement_drop:.2f}%")
    if limits.min_accuracy is not None:
        if accuracy is None:
            why.append(f"clean accuracy is not measurable: {missing or 'the held-out images have no labels'}")
        elif accuracy < limits.min_accuracy:
            why.append(f"clean accuracy {100 * accuracy:.2f}% is below the limit "
                       f"{100 * limits.min_accuracy:.2f}%")
    if limits.max_output_error is not None:
        if output_error is None:
            why.append(f"the output error is not measurable: {missing or 'an output has no relative error'}")
        elif output_error > limits.max_output_error:
            why.append(f"relative output error {output_error:.4g} is above the limit "
                       f"{limits.max_output_error:.4g}")
    return why


def unmeasured(limits: GuardLimits, why: str, opt_level: str = "faithful", provider: str = "") -> GuardReport:
    """The report of a check that had nothing to measure on: every limit set fails."""
    fails = _judge(limits, None, None, None, why)
    return GuardReport(images=0, agreement=None, accuracy=None, fp_accuracy=None, opt_level=opt_level,
                       provider=provider, passed=not fails, why=tuple(fails), note=why)


def check_defense(fp: onnx.ModelProto, defended: onnx.ModelProto, inputs: object,
                  labels: np.ndarray | None, limits: GuardLimits, opt_level: str = "faithful",
                  provider: str = "auto", batch: int | None = None) -> GuardReport:
    """Run both models on held-out model-ready `inputs`, measure every output, check the budget.

    Args:
        fp: The full-precision model.
        defended: The quantized (defended or not) QDQ model.
        inputs: Model-ready held-out inputs (an array or anything sliceable with a length).
        labels: Their labels, or None for unlabelled images.
        limits: The budget.
        opt_level: onnxruntime optimization level.
        provider: onnxruntime provider.
        batch: The models' fixed batch size, or None.
    """
    fidelity = measure_fidelity(fp, defended, inputs, opt_level, provider, batch, labels)
    main = fidelity.outputs[0]
    why = _judge(limits, main.top1_agreement, main.accuracy, fidelity.worst_error, "")
    return GuardReport(images=fidelity.images, agreement=main.top1_agreement, accuracy=main.accuracy,
                       fp_accuracy=main.fp_accuracy, opt_level=opt_level, provider=fidelity.provider,
                       passed=not why, why=tuple(why), output_error=fidelity.worst_error, fidelity=fidelity)
