"""How closely a quantized model follows its full-precision model, output by output.

Both models run in onnxruntime on the same held-out model-ready inputs (never the
calibration inputs). Every graph output gets its relative error ||q - fp|| / ||fp||
over all inputs; an output shaped like a classifier's logits (batch x classes, more
than one class, or batch x classes x 1 x 1) also gets top-1 agreement with the FP model. A detector's boxes, a
segmentation map or an embedding has no top-1 to agree on, so the relative error is
its figure. A figure that cannot be measured is None with the reason beside it, never 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

from pipeline.base.errors import EfrapError
from pipeline.base.progress import QUICK_PASS, Progress
from pipeline.base.runtime import make_session

#: What an output is measured as.
CLASSIFIER, OTHER = "classifier", "other"


@dataclass(frozen=True)
class OutputFidelity:
    """One graph output of the quantized model against the same output of the FP model.

    Attributes:
        name: The output's name (the FP model's).
        shape: Its shape over all inputs measured (first dimension: the inputs).
        kind: "classifier" (batch x classes with more than one class) or "other".
        relative_error: ||q - fp|| / ||fp|| over every element (None: not measurable).
        top1_agreement: Share of inputs whose top-1 class equals the FP model's
            (classifier outputs only; None otherwise or when not measurable).
        max_abs_error: Largest |q - fp| (None: not measurable).
        why: Why a figure is None, when one is.
        accuracy: Share of inputs whose top-1 class is their label (classifier outputs
            with labels given; None otherwise).
        fp_accuracy: The same for the FP model.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    relative_error: float | None
    top1_agreement: float | None
    max_abs_error: float | None
    why: str = ""
    accuracy: float | None = None
    fp_accuracy: float | None = None


@dataclass(frozen=True)
class FidelityReport:
    """Every output's fidelity, and what it was measured on.

    Attributes:
        images: Held-out inputs measured.
        opt_level: onnxruntime optimization level of both runs.
        provider: onnxruntime provider of the quantized model's run.
        outputs: One entry per graph output, in the FP model's order.
    """

    images: int
    opt_level: str
    provider: str
    outputs: tuple[OutputFidelity, ...]

    @property
    def worst_error(self) -> float | None:
        """The largest relative error over the outputs (None: one is not measurable)."""
        errors = [o.relative_error for o in self.outputs]
        return None if not errors or any(e is None for e in errors) else max(errors)  # type: ignore[type-var]

    def lines(self) -> list[str]:
        """One line per output for people: its kind and figures, or why one is missing."""
        out = []
        for o in self.outputs:
            parts = []
            if o.top1_agreement is not None:
                parts.append(f"top-1 agreement with FP {100 * o.top1_agreement:.2f}%")
            parts.append("relative error n/a" if o.relative_error is None
                         else f"relative error {o.relative_error:.4g}")
            why = f" ({o.why})" if o.why else ""
            out.append(f"output '{o.name}' {'x'.join(map(str, o.shape[1:])) or 'scalar'}: "
                       f"{', '.join(parts)}{why}")
        return out

    def to_json(self) -> dict:
        """JSON-ready dict (shapes as lists)."""
        out = asdict(self)
        out["outputs"] = [{**o, "shape": list(o["shape"])} for o in out["outputs"]]
        return out


class _Sums:
    """Running sums of one output over batches, so no output is held whole."""

    def __init__(self) -> None:
        self.diff2 = 0.0
        self.ref2 = 0.0
        self.max_abs = 0.0
        self.agree = 0
        self.rows = 0
        self.tail: tuple[int, ...] | None = None
        self.finite = True
        self.correct = 0
        self.fp_correct = 0

    def add(self, fp: np.ndarray, q: np.ndarray, labels: np.ndarray | None = None) -> None:
        a, b = fp.astype(np.float64), q.astype(np.float64)
        self.tail = self.tail or tuple(a.shape[1:])
        self.rows += len(a)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            self.finite = False
            return
        d = b - a
        self.diff2 += float((d * d).sum())
        self.ref2 += float((a * a).sum())
        self.max_abs = max(self.max_abs, float(np.abs(d).max()) if d.size else 0.0)
        if _classes(a.shape[1:]) > 1:
            top_a, top_b = a.reshape(len(a), -1).argmax(1), b.reshape(len(b), -1).argmax(1)
            self.agree += int((top_a == top_b).sum())
            if labels is not None:
                self.correct += int((top_b == labels).sum())
                self.fp_correct += int((top_a == labels).sum())


def _classes(tail: tuple[int, ...]) -> int:
    """Classes of an output shaped like logits: (classes,) or (classes, 1, 1) (0: not such an output)."""
    return tail[0] if tail and all(d == 1 for d in tail[1:]) else 0


def _figures(name: str, sums: _Sums, labelled: bool) -> OutputFidelity:
    tail = sums.tail or ()
    kind = CLASSIFIER if _classes(tail) > 1 else OTHER
    shape = (sums.rows, *tail)
    why = ""
    if not sums.finite:
        why = "an output holds NaN or Inf"
    elif sums.rows == 0:
        why = "no inputs"
    if why:
        return OutputFidelity(name, shape, kind, None, None, None, why)
    agreement = sums.agree / sums.rows if kind == CLASSIFIER else None
    accuracy = fp_accuracy = None
    if kind == CLASSIFIER and labelled:
        accuracy, fp_accuracy = sums.correct / sums.rows, sums.fp_correct / sums.rows
    if sums.ref2 == 0.0:
        # A zero FP output has no scale to be relative to: the absolute error still says it all.
        return OutputFidelity(name, shape, kind, None, agreement, sums.max_abs,
                              "the FP output is all zeros", accuracy, fp_accuracy)
    return OutputFidelity(name, shape, kind, float(np.sqrt(sums.diff2 / sums.ref2)), agreement, sums.max_abs,
                          "", accuracy, fp_accuracy)


def measure_fidelity(fp: onnx.ModelProto, quantized: onnx.ModelProto, inputs: object,
                     opt_level: str = "faithful", provider: str = "auto",
                     batch: int | None = None, labels: np.ndarray | None = None) -> FidelityReport:
    """Run both models on held-out model-ready `inputs` and compare every output.

    Args:
        fp: The full-precision model.
        quantized: The QDQ model written from it.
        inputs: Model-ready held-out inputs (an array or anything sliceable with a length).
        opt_level: onnxruntime optimization level of both runs.
        provider: onnxruntime provider.
        batch: The models' fixed batch size, or None (the last batch is then padded).
        labels: The inputs' labels, for clean accuracy of classifier outputs (None: none).

    Raises:
        EfrapError: the models' outputs do not correspond, or an output has no batch
            dimension matching the inputs.
    """
    fp_session = make_session(fp, opt_level, provider)
    q_session = make_session(quantized, opt_level, provider)
    names = [o.name for o in fp_session.session.get_outputs()]
    q_names = [o.name for o in q_session.session.get_outputs()]
    if sorted(names) != sorted(q_names):
        raise EfrapError(f"the quantized model's outputs {q_names} are not the FP model's {names}")
    sums = {name: _Sums() for name in names}
    step = batch or 256
    total = len(inputs)  # type: ignore[arg-type]
    bar = Progress("check: FP and quantized models on held-out images", total=total, min_seconds=QUICK_PASS)
    for start in range(0, total, step):
        feed = np.asarray(inputs[start : start + step])  # type: ignore[index]
        n = len(feed)
        if batch is not None and n < batch:  # a fixed batch: pad the last one
            feed = np.concatenate([feed, np.repeat(feed[:1], batch - n, axis=0)])
        a = dict(zip(names, fp_session.session.run(names, {fp_session.input_name: feed}), strict=True))
        b = dict(zip(names, q_session.session.run(names, {q_session.input_name: feed}), strict=True))
        for name in names:
            if a[name].ndim == 0 or len(a[name]) != len(feed) or a[name].shape != b[name].shape:
                raise EfrapError(f"output '{name}' has shape {a[name].shape} (quantized: {b[name].shape}) "
                                 f"for {len(feed)} inputs: no batch dimension to compare by")
            sums[name].add(a[name][:n], b[name][:n],
                           None if labels is None else np.asarray(labels)[start : start + n])
        bar.update(n)
    bar.close(f"{total:,} images")
    return FidelityReport(images=total, opt_level=opt_level, provider=q_session.provider,
                          outputs=tuple(_figures(name, sums[name], labels is not None) for name in names))
