"""`ScanOptions`: the settings of one scan, checked when built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.base import checks, limits
from pipeline.base.deployment import Deployment, DeploymentViews
from pipeline.base.errors import EfrapError
from pipeline.scan.search import FAMILIES, SearchConfig
from pipeline.scan.verdict import VerdictRule


@dataclass(frozen=True)
class ScanOptions(DeploymentViews):
    """Settings of one scan, checked when built.

    Attributes:
        deployment: The settings every step shares, checked there: the deployment's scheme
            (the nearest model is built with it; required), the clean unlabelled images'
            data set (training split: calibration of the nearest model, the searches, and
            the held-out figures), calibration images (as `efrap quantize`; the default
            1,024 and seed reproduce its nearest model exactly; a quarter of them, at most
            `eval_images`, check the triggers, the rest drive the search), the scan's one
            seed (calibration images, search batches and initial patterns), the
            onnxruntime provider and optimization level of the figures, preprocessing.
        budget: Seconds the whole scan may take, held-out figures included (searches split
            what is left; a scan the budget stops is "inconclusive"; None: no limit).
        holdout: Held-out training images for the onnxruntime figures.
        search: Settings of each class's search.
        rule: Thresholds of the verdict.
        families: Trigger families of the differential search ("patch", "blend").
        fp_families: Trigger families of Neural Cleanse on the FP model.
        max_targets: Most classes searched; with more classes, a ranked shortlist.
        probe_steps: Steps of the short differential probe that ranks a shortlist.
        eval_images: Most calibration images set aside to check the triggers.
    """

    deployment: Deployment
    budget: float | None = None
    holdout: int = 1000
    search: SearchConfig = field(default_factory=SearchConfig)
    rule: VerdictRule = field(default_factory=VerdictRule)
    families: tuple[str, ...] = ("patch", "blend")
    fp_families: tuple[str, ...] = ("patch",)
    max_targets: int = 10
    probe_steps: int = 20
    eval_images: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.deployment, Deployment):
            raise EfrapError(f"deployment must be a Deployment, got {self.deployment!r}")
        self.deployment.quantized()
        # The scan's own floor on the same count: a quarter of the images check the triggers.
        limits.SCAN_CALIB.check(self.deployment.num_calib, "number of calibration images")
        if self.budget is not None:
            checks.finite(self.budget, "budget (seconds)", low=0.0, low_open=True)
        checks.integer(self.holdout, "held-out images", low=1)
        if not self.families:
            raise EfrapError("the differential search needs at least one trigger family")
        for family in (*self.families, *self.fp_families):
            checks.string(family, "trigger family", FAMILIES)
        # An outlier test needs at least three classes to compare.
        checks.integer(self.max_targets, "most searched classes", low=3)
        checks.integer(self.probe_steps, "probe steps", low=1)
        checks.integer(self.eval_images, "evaluation images", low=1)

    def to_json(self) -> dict[str, object]:
        """JSON-ready settings (the report's `settings`)."""
        return {"scheme": self.scheme.name, "calib": self.calib, "num_calib": self.num_calib,
                "seed": self.seed, "budget": self.budget, "holdout": self.holdout,
                "search": asdict(self.search), "rule": asdict(self.rule), "families": list(self.families),
                "fp_families": list(self.fp_families), "max_targets": self.max_targets,
                "probe_steps": self.probe_steps, "eval_images": self.eval_images,
                "opt_level": self.opt_level, "provider": self.provider}
