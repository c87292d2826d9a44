"""What a scan found and what it was measured on: the `efrap scan --json` report."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.base.trigger import PatternTrigger
from pipeline.scan.search import Found
from pipeline.scan.verdict import Verdict, VerdictRule, not_findings

#: What became of one planned search.
SEARCH_STATES = ("done", "cut short", "not run")
#: Per class: every planned search ran to its end; the budget stopped one or left one
#: unstarted; none ran; not on the shortlist (more classes than `max_targets`).
CLASS_STATES = ("searched", "cut short", "not searched", "not shortlisted")

#: A planned search: (class, mode, family).
Planned = tuple[int, str, str]
#: The models a trigger's attack success is measured on.
FIGURE_MODELS = ("fp", "nearest", "defended")


def search_states(planned: tuple[Planned, ...],
                  searches: dict[int, list[Found]]) -> dict[int, dict[str, str]]:
    """Per planned class, each planned search ("mode_family") and what became of it."""
    out: dict[int, dict[str, str]] = {}
    for c, mode, family in planned:
        ran = [f for f in searches.get(c, []) if (f.mode, f.family) == (mode, family)]
        state = "not run" if not ran else "cut short" if ran[0].cut_short else "done"
        out.setdefault(c, {})[f"{mode}_{family}"] = state
    return out


def class_states(classes: int, planned: tuple[Planned, ...], shortlisted: bool,
                 searches: dict[int, list[Found]]) -> dict[int, str]:
    """Per class, one of CLASS_STATES."""
    states = search_states(planned, searches)
    out = {}
    for c in range(classes):
        if c not in states:
            out[c] = "not shortlisted" if shortlisted else "not searched"
            continue
        done = list(states[c].values())
        out[c] = ("searched" if all(s == "done" for s in done)
                  else "not searched" if all(s == "not run" for s in done) else "cut short")
    return out


@dataclass(frozen=True)
class Coverage:
    """What a scan searched and measured, against what it planned.

    Attributes:
        planned: The searches of the FP model's part, (class, mode, family).
        defended_planned: The differential searches against the defended model.
        shortlisted: Whether the classes to search were chosen (False: the budget ran out
            first, and every class counts as not searched).
        figures: Whether the recovered trigger was measured in onnxruntime on the held-out
            images (and, with a defended model, the defended search's trigger too).
        stopped: The stage at which the time budget stopped the scan (None: none did).
    """

    planned: tuple[Planned, ...]
    defended_planned: tuple[Planned, ...]
    shortlisted: bool
    figures: bool
    stopped: str | None

    def complete(self, searches: dict[int, list[Found]]) -> bool:
        """Whether every planned search of `searches`' part ran to its end and the figures were measured."""
        return self.shortlisted and self.figures and self.stopped is None and all(
            s == "done" for per in search_states(self.planned, searches).values() for s in per.values())

    def counts(self, searches: dict[int, list[Found]]) -> dict[str, int]:
        """The planned searches ("planned") and how many of them are in each of SEARCH_STATES
        (keyed with underscores: "done", "cut_short", "not_run")."""
        states = [s for per in search_states(self.planned, searches).values() for s in per.values()]
        return {"planned": len(states), **{s.replace(" ", "_"): states.count(s) for s in SEARCH_STATES}}

    def to_json(self, classes: int, searches: dict[int, list[Found]]) -> dict[str, object]:
        """Counts of the planned searches by state, and the classes by state."""
        by_class = class_states(classes, self.planned, self.shortlisted, searches)
        return {"complete": self.complete(searches), "stopped_at": self.stopped,
                "figures_measured": self.figures, "shortlisted": self.shortlisted,
                "searches": self.counts(searches),
                "classes": {s: [c for c, v in by_class.items() if v == s] for s in CLASS_STATES}}


def trigger_summary(found: Found, trigger: PatternTrigger) -> dict[str, object]:
    """Numbers that describe a recovered trigger without its arrays."""
    assert trigger.mask is not None  # PatternTrigger always holds one
    alpha = trigger.blend * trigger.mask[0]
    height, width = alpha.shape
    strong = alpha > 0.5
    rows, cols = np.nonzero(strong)
    box = None
    if len(rows):
        box = {"top": int(rows.min()), "left": int(cols.min()), "bottom": int(rows.max()),
               "right": int(cols.max())}
    weights = alpha.sum()
    mean_value = float((trigger.pattern * alpha).sum() / (trigger.pattern.shape[0] * weights)) \
        if weights > 0 else None
    return {
        "family": found.family, "mode": found.mode, "target": trigger.target,
        "size": round(found.size, 5), "mask_l1_pixels": round(float(weights), 2),
        "pixels_over_half": int(strong.sum()), "image": [height, width], "box_over_half": box,
        "blend": round(float(trigger.blend), 5),
        "mean_pattern_value": None if mean_value is None else round(mean_value, 4),
        "simulated_success": round(found.success, 4),
    }


def recovered_trigger(found: Found) -> PatternTrigger:
    """The trigger a search kept, in the project's trigger format.

    A patch keeps its mask with blend 1; a blend trigger is a full-image pattern whose
    blend is its factor (the same stamping: x + blend * mask * (pattern - x)).
    """
    if found.family == "blend":
        blend = float(found.mask.reshape(-1)[0])
        return PatternTrigger(pattern=found.pattern, target=found.target, blend=max(blend, 1e-6),
                              name="recovered trigger")
    return PatternTrigger(pattern=found.pattern, target=found.target, mask=found.mask, blend=1.0,
                          name="recovered trigger")


@dataclass(frozen=True)
class Figures:
    """A trigger's attack success in onnxruntime on held-out images.

    Attributes:
        asr: Model name ("fp", "nearest", "defended") -> share of held-out images whose FP
            clean prediction is not the target that the triggered image sends to the target.
        agreement: Model name -> share of clean held-out images on which it agrees with FP.
        images: Held-out images measured.
        non_target_images: Of them, those whose FP prediction is not the target.
    """

    asr: dict[str, float | None]
    agreement: dict[str, float]
    images: int
    non_target_images: int

    def reported_asr(self) -> dict[str, float | None]:
        """`asr` as the report gives it (4 decimals; None where not measured)."""
        return {k: None if v is None else round(v, 4) for k, v in self.asr.items()}

    def success(self, model: str) -> float | None:
        """The attack success on `model` as reported (4 decimals); None where it was not measured.

        Raises:
            KeyError: `model` is not one of FIGURE_MODELS (a misspelt name is an error, not
                a missing figure).
        """
        if model not in FIGURE_MODELS:
            raise KeyError(f"no such model in a trigger's figures: {model!r}")
        return self.reported_asr().get(model)

    def to_json(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"asr": self.reported_asr(),
                "clean_agreement_with_fp": {k: round(v, 4) for k, v in self.agreement.items()},
                "images": self.images, "non_target_images": self.non_target_images}


@dataclass(frozen=True)
class DefendedScan:
    """The defended model's part of a scan (`--defended`).

    Attributes:
        model: Its path.
        model_sha256: Its sha256.
        recovered: The FP model's recovered trigger on FP, nearest and defended (None when
            the scan recovered none).
        verdict: The verdict with the defended model as the quantized side.
        searches: Per class, the differential searches against the defended model.
        own_trigger: The strongest differential trigger of the defended search on FP,
            nearest and defended (None when none was found).
        states: Per planned class, what became of its searches against the defended model
            (CLASS_STATES).
    """

    model: str
    model_sha256: str
    recovered: Figures | None
    verdict: Verdict
    searches: dict[int, list[Found]]
    own_trigger: tuple[Found, Figures] | None
    states: dict[int, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether the defended part finished (its verdict is not "inconclusive")."""
        return self.verdict.verdict != "inconclusive"

    @property
    def own_figures(self) -> Figures | None:
        """The figures of the defended search's strongest trigger (None when none was found)."""
        return None if self.own_trigger is None else self.own_trigger[1]

    def to_json(self) -> dict[str, object]:
        """JSON-ready form."""
        own = None
        if self.own_trigger is not None:
            found, figures = self.own_trigger
            own = {**found.to_json(), "figures": figures.to_json()}
        return {
            "model": self.model, "model_sha256": self.model_sha256,
            "recovered_trigger": None if self.recovered is None else self.recovered.to_json(),
            "verdict": self.verdict.verdict, "target": self.verdict.target,
            "confidence": round(self.verdict.confidence, 4), "reason": self.verdict.reason,
            "partial": None if self.verdict.partial is None else self.verdict.partial.to_json(),
            "complete": self.complete,
            "class_status": {str(c): v for c, v in sorted(self.states.items())},
            "differential_test": self.verdict.differential.to_json(),
            "searches": {str(c): [f.to_json() for f in fs] for c, fs in sorted(self.searches.items())},
            "strongest_trigger": own,
        }


@dataclass(frozen=True)
class MeasuredOn:
    """What a scan's figures were measured on (from its provenance).

    Attributes:
        data: The data spec the images came from.
        holdout_images: Held-out images the figures were measured on.
        opt_level: onnxruntime's optimization level.
        provider: onnxruntime's execution provider.
    """

    data: str
    holdout_images: int
    opt_level: str
    provider: str


@dataclass(frozen=True)
class ScanReport:
    """Everything one scan decided and measured.

    Attributes:
        model: The scanned FP model's path.
        model_sha256: Its sha256.
        verdict: The decision (pipeline.scan.verdict).
        trigger: The recovered trigger (the flagged class's; for a clean verdict the
            differential test's strongest candidate), or None when no search ran.
        trigger_found: The search that produced `trigger`.
        figures: `trigger`'s attack success in onnxruntime (held-out images).
        classes: Number of classes of the model.
        searched: The classes searched, in search order.
        drift: Per class, the share of calibration images the nearest model moves into it.
        searches: Per searched class, every search's outcome (differential and FP).
        parity: Share of held-out images on which the PyTorch simulation and onnxruntime
            disagree, per side ("fp", "nearest").
        defended: The `--defended` part, or None.
        settings: The scan's options as JSON.
        provenance: Data, scheme, seed, onnxruntime provider and opt level, versions, threads.
        cut_short: Whether the time budget stopped a search, left one unstarted or left the
            figures unmeasured (the verdict is then "inconclusive").
        coverage: What was searched and measured against what was planned.
        seconds: Wall time of the scan.
        cpu_seconds: CPU time of the scan's process (its wall time on an otherwise idle core
            when it runs one thread).
        defended_seconds: Wall time of the `--defended` part (its searches and figures).
        notes: What the reader should know (ranking, budget).
        rule: The thresholds the verdict was decided with.
    """

    model: str
    model_sha256: str
    verdict: Verdict
    trigger: PatternTrigger | None
    trigger_found: Found | None
    figures: Figures | None
    classes: int
    searched: tuple[int, ...]
    drift: tuple[float, ...]
    searches: dict[int, list[Found]]
    parity: dict[str, float]
    defended: DefendedScan | None
    settings: dict[str, object]
    provenance: dict[str, object]
    cut_short: bool
    coverage: Coverage
    seconds: float
    cpu_seconds: float = math.nan
    defended_seconds: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    rule: VerdictRule = field(default_factory=VerdictRule)

    @property
    def confidence(self) -> float:
        """The verdict's confidence as the report gives it (4 decimals)."""
        return round(self.verdict.confidence, 4)

    @property
    def reported_seconds(self) -> float | None:
        """The scan's wall time as the report gives it (2 decimals; None when not finite)."""
        return round(self.seconds, 2) if math.isfinite(self.seconds) else None

    @property
    def trigger_figures(self) -> Figures | None:
        """The recovered trigger's figures, when the report describes a recovered trigger."""
        return self.figures if self.trigger is not None and self.trigger_found is not None else None

    def class_states(self) -> dict[int, str]:
        """Per class, one of CLASS_STATES."""
        return class_states(self.classes, self.coverage.planned, self.coverage.shortlisted, self.searches)

    def not_findings(self) -> dict[str, dict[int, str]]:
        """Per test, each class whose anomaly index reaches the threshold but that is not the
        finding, and why (`pipeline.scan.verdict.not_findings`)."""
        return not_findings(self.verdict, self.rule, self.class_states())

    def smallest_trigger(self, c: int, mode: str) -> tuple[float, bool] | None:
        """Class `c`'s smallest trigger size in `mode` ("diff" or "fp"), 5 decimals, and whether a
        trigger was found: a found one's size, else the smallest a search reached; None when
        no search of that mode ran on the class."""
        part = [f for f in self.searches.get(c, []) if f.mode == mode]
        if not part:
            return None
        hits = [f for f in part if f.found]
        return round(min(f.size for f in (hits or part)), 5), bool(hits)

    def measured_on(self) -> MeasuredOn:
        """The data, held-out images and onnxruntime settings the figures were measured on.

        Raises:
            KeyError: the provenance lacks one of them (never a silent None).
        """
        data, images, onnxruntime = (self.provenance[k] for k in ("data", "holdout_images", "onnxruntime"))
        if not (isinstance(data, str) and isinstance(images, int) and isinstance(onnxruntime, dict)):
            raise TypeError("the scan's provenance does not name its data, held-out images and onnxruntime")
        return MeasuredOn(data=data, holdout_images=images, opt_level=str(onnxruntime["opt_level"]),
                          provider=str(onnxruntime["provider"]))

    def triggers(self) -> dict[str, PatternTrigger]:
        """The triggers the scan kept, with their arrays: "recovered" (the FP model's, `trigger`)
        and "fresh" (the strongest of the search against the defended model); those it has."""
        out: dict[str, PatternTrigger] = {}
        if self.trigger is not None:
            out["recovered"] = self.trigger
        if self.defended is not None and self.defended.own_trigger is not None:
            out["fresh"] = recovered_trigger(self.defended.own_trigger[0])
        return out

    def trigger_json(self, trigger_file: str | Path | None = None) -> dict[str, object] | None:
        """The recovered trigger's JSON as `save_trigger` writes it for `trigger_file`
        (its npz beside it); without a file, the same with `pattern` null."""
        if self.trigger is None:
            return None
        if trigger_file is not None:
            path = Path(trigger_file)
            return self.trigger.to_json(path.with_name(path.stem + ".npz").name)
        return {"kind": "pattern", "pattern": None, "blend": self.trigger.blend,
                "target": self.trigger.target}

    def to_json(self, trigger_file: str | Path | None = None) -> dict[str, object]:
        """JSON-ready dict (the `efrap scan --json` file); `trigger_file`: where the trigger went."""
        v = self.verdict
        trigger = None
        if self.trigger is not None and self.trigger_found is not None:
            trigger = {"json": self.trigger_json(trigger_file),
                       "file": None if trigger_file is None else str(trigger_file),
                       "summary": trigger_summary(self.trigger_found, self.trigger),
                       "figures": None if self.figures is None else self.figures.to_json()}
        states = self.class_states()
        runs = search_states(self.coverage.planned, self.searches)
        per_class = {}
        for c in range(self.classes):
            entry: dict[str, object] = {
                "drift": round(self.drift[c], 5) if c < len(self.drift) else None,
                "searched": states[c] == "searched", "status": states[c], "searches": runs.get(c, {})}
            for f in self.searches.get(c, []):
                entry[f"{f.mode}_{f.family}"] = f.to_json()
            for key, mode in (("differential", "diff"), ("fp", "fp")):
                smallest = self.smallest_trigger(c, mode)
                if smallest is not None:
                    entry[f"{key}_size"], entry[f"{key}_found"] = smallest
            per_class[str(c)] = entry
        notes = self.not_findings()
        return {
            "verdict": v.verdict, "target": v.target, "confidence": self.confidence,
            "reason": v.reason, "candidate": v.differential.candidate if v.target is None else v.target,
            "partial": None if v.partial is None else v.partial.to_json(),
            "coverage": self.coverage.to_json(self.classes, self.searches),
            "not_findings": {name: {str(c): why for c, why in sorted(per.items())}
                             for name, per in notes.items()},
            "trigger": trigger,
            "tests": {"differential": v.differential.to_json(), "fp": v.fp.to_json()},
            "classes": per_class, "num_classes": self.classes, "searched": list(self.searched),
            "parity_pytorch_vs_onnxruntime": {k: round(x, 5) for k, x in self.parity.items()},
            "defended": None if self.defended is None else self.defended.to_json(),
            "model": self.model, "model_sha256": self.model_sha256,
            "settings": self.settings, **self.provenance,
            "cut_short": self.cut_short, "notes": list(self.notes),
            "seconds": self.reported_seconds,
            "cpu_seconds": round(self.cpu_seconds, 2) if math.isfinite(self.cpu_seconds) else None,
            "defended_seconds": None if self.defended_seconds is None else round(self.defended_seconds, 2),
        }


#: `scan_model`'s shape, (FP path, options, defended=Q path) -> report: what the runner, the
#: gate and the audit take, so that a test can give them a scan of its own.
ScanFunction = Callable[..., ScanReport]
