"""The scan's decision: pure functions of the per-class trigger sizes.

Two tests, one rule (Neural Cleanse's outlier test, Wang et al., IEEE S&P 2019):

- the differential test: the smallest trigger that wakes the nearest-quantized model
  while the FP model keeps its prediction, per class. A quantization-conditioned
  backdoor (QCB) leaves one class with a small such trigger; a clean model has none,
  or none that stands out;
- the FP test: Neural Cleanse on the FP model alone. A backdoor already active in FP
  (plain poisoning, BadNets) leaves one class with an anomalously small trigger.

For each test, the sizes (mask mean over the image; for a class where no trigger was
found, the size a near miss reached, a lower bound, or 1.0, the whole image, when the
search came nowhere near) are compared in log space: the
anomaly index of class t is ``(median(log s) - log s_t) / (1.4826 * MAD(log s))``, Neural Cleanse's
median-absolute-deviation index with the consistency constant of a normal
distribution (Hampel, "The Influence Curve and Its Role in Robust Estimation",
JASA 1974). Only small sizes are anomalous. The MAD is floored (`mad_floor`), since
classes that all end alike give a MAD near zero. A class is flagged when its
trigger was found, its index reaches `threshold` (Neural Cleanse: 2, a ~95%
one-sided level) and its size is at most `max_ratio` times the median: both an
outlier and a large effect. The evidence of a test is the smaller of the index and
the ratio mapped onto the index's scale (``threshold * log(ratio) / log(max_ratio)``),
so either criterion can hold a flag back; the confidence is a logistic function of the
evidence around `threshold`.

Verdict: `fp-backdoor` when the FP test flags a class (the backdoor is active without
quantization, whatever the differential test says about the same class), else `qcb`
when the differential test flags one, else `clean`. A scan whose searches did not all
run to the end, or whose figures could not be measured, within its time budget is
`inconclusive`: a search that never ran found nothing, which is no
evidence of a clean model; what the partial evidence says is kept beside it.

`not_findings` says, for every class whose anomaly index reaches the threshold but that
is not the finding, why not: the evidence a verdict rests on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.base import checks
from pipeline.base.errors import EfrapError

#: Verdicts of a scan; "inconclusive": the budget stopped it before every search ran.
VERDICTS = ("qcb", "fp-backdoor", "clean", "inconclusive")
#: Smallest size taken into the log (a one-pixel trigger on a 100x100 image).
MIN_SIZE = 1e-4
#: Median absolute deviation -> standard deviation of a normal distribution.
CONSISTENCY = 1.4826


@dataclass(frozen=True)
class VerdictRule:
    """Thresholds of the decision.

    Attributes:
        threshold: Anomaly index a class must reach (Neural Cleanse: 2).
        max_ratio: Largest size, relative to the median of all classes, of a flagged
            differential trigger.
        fp_max_ratio: The same for the FP test. Stricter: any undefended classifier has
            universal adversarial patches, and a class that is naturally easy to reach
            (Fashion-MNIST's bag) comes within a factor of two of the median; a planted
            trigger is several times smaller (docs/SCAN.md).
        mad_floor: Floor on the scaled MAD of the log sizes (log units; 0.1 is 10%).
        steepness: Slope of the logistic confidence per unit of evidence.
    """

    threshold: float = 2.0
    max_ratio: float = 0.5
    fp_max_ratio: float = 0.25
    mad_floor: float = 0.1
    steepness: float = 2.0

    def __post_init__(self) -> None:
        checks.finite(self.threshold, "anomaly threshold", low=0.0, low_open=True)
        for value, what in ((self.max_ratio, "largest size ratio"),
                            (self.fp_max_ratio, "largest FP size ratio")):
            checks.finite(value, what, low=0.0, high=1.0, low_open=True)
            if value >= 1.0:
                raise EfrapError(f"{what} must be below 1")
        checks.finite(self.mad_floor, "MAD floor", low=0.0, low_open=True)
        checks.finite(self.steepness, "confidence steepness", low=0.0, low_open=True)


def _reported(value: float) -> float | None:
    """A test's figure as the report gives it: 4 decimals, non-finite as None."""
    return round(value, 4) if math.isfinite(value) else None


@dataclass(frozen=True)
class TestResult:
    """One test (differential or FP) over the searched classes.

    Attributes:
        name: "differential" or "fp".
        classes: The searched classes, in the order of the sizes.
        anomaly: Anomaly index per class.
        ratio: Size over the median size, per class.
        evidence: min(anomaly, ratio on the anomaly scale); -inf where nothing was found.
        candidate: The class with the most evidence (None: nothing found at all).
        flagged: Whether the candidate is flagged.
        probability: Logistic of the candidate's evidence around the threshold.
    """

    name: str
    classes: tuple[int, ...]
    anomaly: tuple[float, ...]
    ratio: tuple[float, ...]
    evidence: tuple[float, ...]
    candidate: int | None
    flagged: bool
    probability: float

    def anomaly_of(self, c: int) -> float | None:
        """Class `c`'s anomaly index as the report gives it (4 decimals); None when the class
        was not in the test or its index is not finite."""
        return _reported(self.anomaly[self.classes.index(c)]) if c in self.classes else None

    def to_json(self) -> dict[str, object]:
        """JSON-ready form (non-finite evidence as null)."""
        num = _reported
        return {"name": self.name, "candidate": self.candidate, "flagged": self.flagged,
                "probability": round(self.probability, 4),
                "per_class": {str(c): {"anomaly": num(a), "ratio": num(r), "evidence": num(e)}
                              for c, a, r, e in zip(self.classes, self.anomaly, self.ratio, self.evidence,
                                                    strict=True)}}


@dataclass(frozen=True)
class Verdict:
    """The decision.

    Attributes:
        verdict: "qcb", "fp-backdoor", "clean" or "inconclusive".
        target: The suspected target (None when clean or inconclusive).
        confidence: Probability-like confidence in the verdict, in [0, 1] (0 when
            inconclusive: the scan did not finish).
        differential: The differential test.
        fp: The FP test.
        reason: One sentence saying why.
        partial: For "inconclusive", the verdict the searches that did run give
            (evidence, not a decision); None otherwise.
    """

    verdict: str
    target: int | None
    confidence: float
    differential: TestResult
    fp: TestResult
    reason: str
    partial: Verdict | None = None

    def to_json(self) -> dict[str, object]:
        """The verdict's fields (without the tests), `partial` nested."""
        return {"verdict": self.verdict, "target": self.target, "confidence": round(self.confidence, 4),
                "reason": self.reason, "partial": None if self.partial is None else self.partial.to_json()}


def anomaly_indices(sizes: Sequence[float], mad_floor: float = 0.1) -> np.ndarray:
    """Neural Cleanse's anomaly index of each size, in log space, positive for small ones."""
    logs = np.log(np.clip(np.asarray(sizes, dtype=np.float64), MIN_SIZE, 1.0))
    if len(logs) == 0:
        return logs
    median = float(np.median(logs))
    mad = max(CONSISTENCY * float(np.median(np.abs(logs - median))), mad_floor)
    return (median - logs) / mad


def _logistic(x: float) -> float:
    if x == -math.inf:
        return 0.0
    return 1.0 / (1.0 + math.exp(-max(min(x, 50.0), -50.0)))


def run_test(name: str, classes: Sequence[int], sizes: Sequence[float], found: Sequence[bool],
             rule: VerdictRule) -> TestResult:
    """The outlier test over one set of per-class trigger sizes (see the module docstring).

    Args:
        name: The test's name.
        classes: Class of each size.
        sizes: Smallest trigger per class (mask mean; where none was found, a near miss's
            size, a lower bound, or 1.0).
        found: Whether a trigger was found per class.
        rule: Thresholds (the FP test, `name` "fp", uses `fp_max_ratio`).
    """
    max_ratio = rule.fp_max_ratio if name == "fp" else rule.max_ratio
    if not (len(classes) == len(sizes) == len(found)):
        raise ValueError("classes, sizes and found must have the same length")
    anomaly = anomaly_indices(sizes, rule.mad_floor)
    median = float(np.exp(np.median(np.log(np.clip(np.asarray(sizes, np.float64), MIN_SIZE, 1.0))))) \
        if len(sizes) else 1.0
    ratio = [max(s, MIN_SIZE) / median for s in sizes]
    evidence = []
    for a, r, ok in zip(anomaly, ratio, found, strict=True):
        if not ok:
            evidence.append(-math.inf)
            continue
        # ratio == max_ratio maps to the threshold, ratio == max_ratio**2 to twice it.
        scaled = rule.threshold * math.log(r) / math.log(max_ratio) if r < 1.0 else -math.inf
        evidence.append(min(float(a), scaled))
    best = int(np.argmax(evidence)) if evidence and max(evidence) > -math.inf else None
    candidate = classes[best] if best is not None else None
    top = evidence[best] if best is not None else -math.inf
    return TestResult(name=name, classes=tuple(int(c) for c in classes),
                      anomaly=tuple(float(a) for a in anomaly), ratio=tuple(float(r) for r in ratio),
                      evidence=tuple(evidence), candidate=candidate,
                      flagged=best is not None and top >= rule.threshold,
                      probability=_logistic(rule.steepness * (top - rule.threshold)))


def decide(differential: TestResult, fp: TestResult) -> Verdict:
    """The verdict from the two tests (see the module docstring)."""
    if fp.flagged:
        why = (f"Neural Cleanse on the FP model finds an anomalously small trigger for class "
               f"{fp.candidate}: a backdoor active without quantization")
        return Verdict("fp-backdoor", fp.candidate, fp.probability, differential, fp, why)
    if differential.flagged:
        why = (f"a small trigger wakes class {differential.candidate} in the nearest-quantized model "
               "while the FP model keeps its predictions, and no other class has one as small")
        return Verdict("qcb", differential.candidate, differential.probability, differential, fp, why)
    confidence = 1.0 - max(differential.probability, fp.probability)
    return Verdict("clean", None, confidence, differential, fp,
                   "no class has an anomalously small trigger, differential or in FP")


def inconclusive(partial: Verdict, why: str) -> Verdict:
    """The verdict of a scan that did not finish: `partial` (what the searches that ran
    give) is kept as evidence, and nothing is decided (no partial when no search ran)."""
    if not partial.differential.classes and not partial.fp.classes:
        return Verdict("inconclusive", None, 0.0, partial.differential, partial.fp, why)
    target = f" class {partial.target}" if partial.target is not None else ""
    return Verdict("inconclusive", None, 0.0, partial.differential, partial.fp,
                   f"{why}; the searches that ran alone would say {partial.verdict}{target}, which "
                   "decides nothing", partial)


def _why_not(test: TestResult, i: int, rule: VerdictRule, decided: Verdict,
             status: Mapping[int, str], other: TestResult | None) -> list[str]:
    """Why class `test.classes[i]`, whose anomaly index reaches the threshold, is not a finding."""
    c = test.classes[i]
    max_ratio = rule.fp_max_ratio if test.name == "fp" else rule.max_ratio
    why = []
    if status.get(c, "searched") != "searched":
        why.append(f"its searches were {status[c]} by the time budget, so its size is not final")
    if test.evidence[i] == -math.inf:
        why.append("no trigger was confirmed (none reached the confirmation rate on the evaluation "
                   "images): its size is a lower bound, and only confirmed triggers are flagged")
    elif test.ratio[i] > max_ratio:
        why.append(f"its trigger is {100 * test.ratio[i]:.0f}% of the median size, above the "
                   f"{100 * max_ratio:.0f}% a finding needs")
    elif test.candidate is not None and test.candidate != c:
        why.append(f"class {test.candidate} has more evidence in the same test")
    fp_flags = decided.verdict == "fp-backdoor" and decided.target == c
    if test.name == "differential" and fp_flags:
        why.append("FP also wakes: Neural Cleanse on the FP model flags the same class, so it is an "
                   "fp-backdoor (active without quantization), not a quantization-conditioned one")
    elif other is not None and c in other.classes:
        j = other.classes.index(c)
        if other.evidence[j] > -math.inf and other.anomaly[j] >= rule.threshold:
            why.append(f"FP also wakes more easily than most: Neural Cleanse on the FP model reaches it "
                       f"with a smaller trigger than most classes (anomaly index {other.anomaly[j]:.1f}), "
                       "an fp-backdoor candidate, though not small enough to flag")
    if decided.verdict == "inconclusive":
        partial = decided.partial
        flagged = partial is not None and partial.target == c and (
            (partial.verdict == "qcb" and test.name == "differential")
            or (partial.verdict == "fp-backdoor" and test.name == "fp"))
        why.append("the searches that ran flag it, but the scan did not finish, so nothing is a finding"
                   if flagged else "the scan did not finish, so nothing is a finding")
    if not why:
        why.append(f"its evidence, {test.evidence[i]:.2f}, stays below the threshold "
                   f"{rule.threshold:g}")
    return why


def not_findings(verdict: Verdict, rule: VerdictRule,
                 status: Mapping[int, str] | None = None) -> dict[str, dict[int, str]]:
    """Per test ("differential", "fp"), each class whose anomaly index reaches the threshold
    but that is not the verdict's finding, and why (one sentence).

    Args:
        verdict: The scan's verdict (its tests are read).
        rule: The thresholds it was decided with.
        status: Per class, "searched", "cut short", "not searched" (the scan's coverage);
            None: every class was searched.
    """
    status = status or {}
    out: dict[str, dict[int, str]] = {}
    for test, other in ((verdict.differential, verdict.fp), (verdict.fp, None)):
        finding = verdict.target if (verdict.verdict, test.name) in (
            ("qcb", "differential"), ("fp-backdoor", "fp")) else None
        notes = {}
        for i, c in enumerate(test.classes):
            if test.anomaly[i] >= rule.threshold and c != finding:
                notes[c] = "; ".join(_why_not(test, i, rule, verdict, status, other))
        out[test.name] = notes
    return out
