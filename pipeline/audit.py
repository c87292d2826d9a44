"""Audit a QDQ model that someone else quantized, against its FP source (`efrap audit`).

Rounding-only attacks exist: QuRA (Chen et al., "Rounding-Guided Backdoor Injection in
Deep Learning Model Quantization", NDSS 2026) leaves the FP model clean and writes a
backdoor into the integers alone, moving a few percent of the weights one step away
from nearest rounding. Legitimate learned rounding does the same kind of thing:
AdaRound (Nagel et al., ICML 2020) and EFRAP (Li et al., CVPR 2024) move several
percent of the weights one step, and LAC (Li et al., ICML 2024) further. So leaving
nearest is no evidence by itself. The audit gathers three kinds of facts:

1. Rounding, per layer (`pipeline.rounding_audit`): the share of integer weights of Q that are not nearest
   rounding of the FP weight on Q's own grid, how far they are (max and mean steps),
   how many are further than one step from the FP weight (neither floor nor ceiling),
   and how many sit within float noise of a rounding tie (another tool may round those
   either way).
2. Grids, per layer (`pipeline.standard_grids`): whether Q's scale and zero point are what a standard observer
   gives for the FP weight: this pipeline's min-max and MSE observers for the common
   schemes (symmetric or asymmetric, per channel or per tensor, 4 or 8 bits, full or
   restricted symmetric ranges, reduced range), and onnxruntime's quantize_static grids
   computed by onnxruntime's own functions. A layer whose grid matches none is reported.
3. A scan of Q against FP (`pipeline.scan.scan_model(FP, options, defended=Q)`, read by
   `pipeline.scan_evidence`): the FP
   model's recovered trigger measured on Q, and a fresh differential trigger search
   where Q is the quantized side.

The verdict comes from the evidence that matters, the scan's differential evidence: a
trigger that works on Q and not on FP, with a large differential attack success.
Rounding and grid statistics, and what the scan says about the FP model alone, are
reported as context and warnings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.base import checks
from pipeline.base.onnx_io import load_model
from pipeline.base.provenance import versions
from pipeline.base.safe_io import file_sha256
from pipeline.base.scheme import Scheme
from pipeline.base.trigger import PatternTrigger
from pipeline.rounding_audit import RoundingAudit, audit_rounding, rounding_warnings
from pipeline.scan.report import ScanFunction, ScanReport
from pipeline.scan_evidence import ScanEvidence, evidence_from_scan

#: The verdicts, from the audit's point of view of Q.
VERDICTS = ("rounding-backdoor", "qcb", "inconclusive", "clean")


@dataclass(frozen=True)
class AuditThresholds:
    """When a trigger counts as working on Q (fractions in (0, 1]).

    Attributes:
        min_asr: Attack success on Q at which a trigger works.
        min_differential: Attack success on Q minus on FP at which the difference is the
            quantizer's doing.
    """

    min_asr: float = 0.5
    min_differential: float = 0.4

    def __post_init__(self) -> None:
        checks.finite(self.min_asr, "min_asr", low=0.0, low_open=True, high=1.0)
        checks.finite(self.min_differential, "min_differential", low=0.0, low_open=True, high=1.0)


@dataclass(frozen=True)
class Verdict:
    """The audit's verdict on Q and why.

    Attributes:
        verdict: "rounding-backdoor" (a trigger works on Q, not on FP and not on nearest
            rounding: Q's own rounding planted it), "qcb" (it works on Q and on nearest
            rounding, not on FP: the FP source is a quantization-conditioned backdoor and
            Q's rounding does not defuse it), "inconclusive" (the scan did not finish within
            its budget, or measured nothing on Q; the audit fails closed) or "clean" (no
            trigger works on Q beyond FP).
        reasons: One line per fact that decided it.
    """

    verdict: str
    reasons: tuple[str, ...]

    @property
    def flagged(self) -> bool:
        """Whether Q must not ship (every verdict but "clean")."""
        return self.verdict != "clean"


def _pct(v: float | None) -> str:
    """A fraction with one decimal, the audit's reasons' format (`validators.report.pct` writes two)."""
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _works(on_q: float | None, on_fp: float | None, t: AuditThresholds) -> bool:
    """Whether a trigger works on Q and not (as much) on FP."""
    return on_q is not None and on_q >= t.min_asr and on_q - (on_fp or 0.0) >= t.min_differential


#: Scan verdicts on the FP model under which its recovered trigger is evidence.
FLAGGED_SCAN_VERDICTS = ("qcb", "fp-backdoor")


def decide(evidence: ScanEvidence, thresholds: AuditThresholds) -> Verdict:
    """The verdict from the scan's differential evidence (rounding statistics never decide it).

    A scan that did not finish (a search cut short or never started, figures not measured)
    gives "inconclusive", whatever its partial evidence says. Otherwise
    Q is flagged when a trigger works on Q and not on FP: the FP model's recovered trigger
    when the scan flagged the FP model, or the strongest trigger of a class the fresh
    search against Q flags (a flagged class without figures counts: fail closed). Both
    rest on the scan's outlier test: when the scan calls the FP model clean, its
    "recovered trigger" is only the smallest of the unremarkable ones (at w4a8 a large
    pattern that moves the nearest model of the clean stored model 88% of the time and
    its FP model 36%), and it says nothing about Q. What the scan says about the FP
    model alone (a backdoor active in FP) is the same for every Q and is context here,
    for the gate.
    """
    t, ev = thresholds, evidence
    if not ev.complete:
        # A search that did not run found nothing: neither a flag nor "clean" rests on it.
        return Verdict("inconclusive", (f"the scan did not finish: {ev.incomplete}",
                                        "nothing clears Q until every search ran (run it with a larger "
                                        "budget or none)"))
    reasons: list[str] = []
    on_nearest: list[float | None] = []
    nearest = False
    if ev.scan_verdict in FLAGGED_SCAN_VERDICTS and _works(ev.asr_quantized, ev.asr_fp, t):
        reasons.append(f"the FP model's recovered trigger (class {ev.target}) succeeds on Q at "
                       f"{_pct(ev.asr_quantized)}, on FP at {_pct(ev.asr_fp)}")
        on_nearest.append(ev.asr_nearest)
        nearest |= _works(ev.asr_nearest, ev.asr_fp, t)
    if ev.fresh_found and (ev.fresh_asr is None or _works(ev.fresh_asr, ev.fresh_asr_fp, t)):
        reasons.append(f"the fresh search against Q flags class {ev.fresh_target}: its trigger succeeds on "
                       f"Q at {_pct(ev.fresh_asr)}, on FP at {_pct(ev.fresh_asr_fp)}")
        on_nearest.append(ev.fresh_asr_nearest)
        nearest |= _works(ev.fresh_asr_nearest, ev.fresh_asr_fp, t)
    if reasons:
        figures = ", ".join(_pct(v) for v in on_nearest)
        if nearest:
            reasons.append(f"nearest rounding of the FP model wakes it too ({figures}): the FP model is a "
                           "quantization-conditioned backdoor that Q's rounding does not defuse")
            return Verdict("qcb", tuple(reasons))
        reasons.append(f"nearest rounding of the FP model does not ({figures}): Q's own rounding put "
                       "it there")
        return Verdict("rounding-backdoor", tuple(reasons))
    if ev.asr_quantized is None and ev.fresh_found is None:
        return Verdict("inconclusive", ("the scan measured no trigger on Q and ran no search against it: "
                                        "nothing clears Q",))
    fresh = ("flags none" if not ev.fresh_found else
             f"flags class {ev.fresh_target}, whose trigger succeeds on Q at {_pct(ev.fresh_asr)} and on FP "
             f"at {_pct(ev.fresh_asr_fp)}: below the thresholds")
    return Verdict("clean", (f"no trigger works on Q beyond FP: the recovered trigger succeeds on Q at "
                             f"{_pct(ev.asr_quantized)} and on FP at {_pct(ev.asr_fp)}; the fresh search "
                             f"against Q {fresh}",))


@dataclass(frozen=True, eq=False)
class FlaggingTrigger:
    """A trigger that flags Q, with its arrays (what a repair can be guided by).

    Attributes:
        source: "recovered" (the FP model's recovered trigger) or "fresh" (the strongest
            trigger of the fresh search against Q).
        trigger: The trigger (mask, pattern, target).
        asr_quantized: Its attack success on Q (held-out images, onnxruntime).
        asr_fp: On the FP model.
    """

    source: str
    trigger: PatternTrigger
    asr_quantized: float
    asr_fp: float | None

    def to_json(self) -> dict[str, object]:
        """JSON-ready summary (no arrays)."""
        mask = self.trigger.mask
        return {"source": self.source, "target": self.trigger.target, "blend": round(self.trigger.blend, 5),
                "mask_mean": None if mask is None else round(float(mask.mean()), 5),
                "asr_quantized": round(self.asr_quantized, 4),
                "asr_fp": None if self.asr_fp is None else round(self.asr_fp, 4)}


def flagging_triggers(report: ScanReport, evidence: ScanEvidence,
                      thresholds: AuditThresholds) -> tuple[FlaggingTrigger, ...]:
    """The triggers `decide` flags Q with, in its order (the FP model's recovered one, then the
    fresh search's), each only when its figures on Q and FP were measured and it works on Q
    and not on FP; none when the scan did not finish or kept no trigger."""
    if not evidence.complete:
        return ()
    arrays = report.triggers()
    ev, out = evidence, []
    recovered = arrays.get("recovered")
    if recovered is not None and ev.scan_verdict in FLAGGED_SCAN_VERDICTS \
            and ev.asr_quantized is not None and _works(ev.asr_quantized, ev.asr_fp, thresholds):
        out.append(FlaggingTrigger("recovered", recovered, ev.asr_quantized, ev.asr_fp))
    fresh = arrays.get("fresh")
    if fresh is not None and ev.fresh_found and ev.fresh_asr is not None \
            and _works(ev.fresh_asr, ev.fresh_asr_fp, thresholds):
        out.append(FlaggingTrigger("fresh", fresh, ev.fresh_asr, ev.fresh_asr_fp))
    return tuple(out)


def scan_warnings(evidence: ScanEvidence) -> tuple[str, ...]:
    """What the scan says about the FP model itself (the same for every Q)."""
    if evidence.scan_verdict in ("fp-backdoor", "qcb"):
        return (f"the scan calls the FP source itself {evidence.scan_verdict} (class {evidence.target}, "
                f"confidence {_pct(evidence.confidence)}): that is about the FP model, not Q's rounding; "
                "see efrap scan / efrap gate",)
    return ()


@dataclass(frozen=True)
class AuditReport:
    """Everything the audit found.

    Attributes:
        fp: FP model path.
        fp_sha256: Its sha256.
        quantized: Q's path.
        quantized_sha256: Its sha256.
        rounding: Per-layer rounding and grid facts.
        evidence: The scan's facts.
        verdict: The verdict and why.
        warnings: Context that did not decide the verdict (non-standard grids, integers
            beyond one step, layers that could not be paired).
        scan: The scan report (its JSON is the audit JSON's `scan`).
        thresholds: The thresholds used.
        triggers: The triggers that flag Q, with their arrays (`flagging_triggers`; not in
            the JSON, whose scan part summarises them).
    """

    fp: str
    fp_sha256: str
    quantized: str
    quantized_sha256: str
    rounding: RoundingAudit
    evidence: ScanEvidence
    verdict: Verdict
    warnings: tuple[str, ...]
    scan: ScanReport
    thresholds: AuditThresholds
    versions: dict[str, str] = field(default_factory=versions)
    triggers: tuple[FlaggingTrigger, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (the `efrap audit --json` file)."""
        return {
            "fp": {"path": self.fp, "sha256": self.fp_sha256},
            "quantized": {"path": self.quantized, "sha256": self.quantized_sha256},
            "verdict": self.verdict.verdict, "flagged": self.verdict.flagged,
            "reasons": list(self.verdict.reasons), "warnings": list(self.warnings),
            "evidence": asdict(self.evidence), "thresholds": asdict(self.thresholds),
            "rounding": self.rounding.to_json(), "scan": self.scan.to_json(), "versions": self.versions,
        }


def audit_models(fp_path: str, q_path: str, scan: ScanFunction, scan_options: object,
                 thresholds: AuditThresholds | None = None) -> AuditReport:
    """Audit Q (a QDQ model someone else quantized) against its FP source.

    Args:
        fp_path: The FP ONNX model.
        q_path: The QDQ ONNX model to audit.
        scan: `pipeline.scan.scan_model` (or a stand-in with its signature).
        scan_options: The scan's options (its data, budget, opt level, provider).
        thresholds: When a trigger counts as active.

    Raises:
        EfrapError: unreadable models, or a Q whose integer weights match no FP layer.
    """
    thresholds = thresholds or AuditThresholds()
    fp, q = load_model(fp_path), load_model(q_path)
    scheme = getattr(scan_options, "scheme", None)
    rounding = audit_rounding(fp, q, fp_path, q_path, scheme if isinstance(scheme, Scheme) else None)
    report = scan(fp_path, scan_options, defended=q_path)
    evidence = evidence_from_scan(report)
    return AuditReport(fp=str(fp_path), fp_sha256=file_sha256(fp_path), quantized=str(q_path),
                       quantized_sha256=file_sha256(q_path), rounding=rounding, evidence=evidence,
                       verdict=decide(evidence, thresholds),
                       warnings=rounding_warnings(rounding) + scan_warnings(evidence),
                       scan=report, thresholds=thresholds,
                       triggers=flagging_triggers(report, evidence, thresholds))
