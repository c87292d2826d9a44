"""What a scan found and what it was measured on: the `efrap scan --json` report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.base.trigger import PatternTrigger
from pipeline.scan.search import Found
from pipeline.scan.verdict import Verdict


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

    def to_json(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"asr": {k: None if v is None else round(v, 4) for k, v in self.asr.items()},
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
    """

    model: str
    model_sha256: str
    recovered: Figures | None
    verdict: Verdict
    searches: dict[int, list[Found]]
    own_trigger: tuple[Found, Figures] | None

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
            "differential_test": self.verdict.differential.to_json(),
            "searches": {str(c): [f.to_json() for f in fs] for c, fs in sorted(self.searches.items())},
            "strongest_trigger": own,
        }


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
        cut_short: Whether the time budget stopped a search or left classes unsearched.
        seconds: Wall time of the scan.
        cpu_seconds: CPU time of the scan's process (its wall time on an otherwise idle core
            when it runs one thread).
        defended_seconds: Wall time of the `--defended` part (its searches and figures).
        notes: What the reader should know (ranking, budget).
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
    seconds: float
    cpu_seconds: float = math.nan
    defended_seconds: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

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
        per_class = {}
        for c in range(self.classes):
            entry: dict[str, object] = {"drift": round(self.drift[c], 5), "searched": c in self.searches}
            for f in self.searches.get(c, []):
                entry[f"{f.mode}_{f.family}"] = f.to_json()
            diff = [f for f in self.searches.get(c, []) if f.mode == "diff"]
            fp = [f for f in self.searches.get(c, []) if f.mode == "fp"]
            for key, part in (("differential", diff), ("fp", fp)):
                if part:
                    hits = [f for f in part if f.found]
                    entry[f"{key}_size"] = round(min(f.size for f in (hits or part)), 5)
                    entry[f"{key}_found"] = bool(hits)
            per_class[str(c)] = entry
        return {
            "verdict": v.verdict, "target": v.target, "confidence": round(v.confidence, 4),
            "reason": v.reason, "candidate": v.differential.candidate if v.target is None else v.target,
            "trigger": trigger,
            "tests": {"differential": v.differential.to_json(), "fp": v.fp.to_json()},
            "classes": per_class, "num_classes": self.classes, "searched": list(self.searched),
            "parity_pytorch_vs_onnxruntime": {k: round(x, 5) for k, x in self.parity.items()},
            "defended": None if self.defended is None else self.defended.to_json(),
            "model": self.model, "model_sha256": self.model_sha256,
            "settings": self.settings, **self.provenance,
            "cut_short": self.cut_short, "notes": list(self.notes),
            "seconds": round(self.seconds, 2) if math.isfinite(self.seconds) else None,
            "cpu_seconds": round(self.cpu_seconds, 2) if math.isfinite(self.cpu_seconds) else None,
            "defended_seconds": None if self.defended_seconds is None else round(self.defended_seconds, 2),
        }
