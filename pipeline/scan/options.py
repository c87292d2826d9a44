"""`ScanOptions`: the settings of one scan, checked when built."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.base import checks
from pipeline.base.errors import EfrapError
from pipeline.base.runtime import OPT_LEVELS, PROVIDERS
from pipeline.scan.search import FAMILIES, SearchConfig
from pipeline.scan.verdict import VerdictRule
from pipeline.scheme import Scheme


@dataclass(frozen=True)
class ScanOptions:
    """Settings of one scan, checked when built.

    Attributes:
        scheme: The deployment's quantization scheme (the nearest model is built with it).
        calib: Data spec of the clean unlabelled images (training split): calibration of
            the nearest model, the searches, and the held-out figures.
        num_calib: Calibration images (as `efrap quantize`; the default 1,024 and seed
            reproduce its nearest model exactly). A quarter of them (at most
            `eval_images`) check the triggers; the rest drive the search.
        seed: The scan's one seed (calibration images, search batches and initial patterns).
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
        opt_level: onnxruntime optimization level of the figures.
        provider: onnxruntime provider ("auto", "cpu", "cuda").
        preprocess: Checked preprocessing fields given by the user; None: what the model records.
    """

    scheme: Scheme
    calib: str = "fashion-mnist"
    num_calib: int = 1024
    seed: int = 0
    budget: float | None = None
    holdout: int = 1000
    search: SearchConfig = field(default_factory=SearchConfig)
    rule: VerdictRule = field(default_factory=VerdictRule)
    families: tuple[str, ...] = ("patch", "blend")
    fp_families: tuple[str, ...] = ("patch",)
    max_targets: int = 10
    probe_steps: int = 20
    eval_images: int = 256
    opt_level: str = "faithful"
    provider: str = "auto"
    preprocess: dict | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.scheme, Scheme):
            raise EfrapError(f"scheme must be a Scheme (pipeline.scheme.load_scheme), got {self.scheme!r}")
        checks.string(self.calib, "calibration data")
        checks.integer(self.num_calib, "number of calibration images", low=8)
        checks.integer(self.seed, "seed", low=0, high=2**63 - 1)
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
        checks.string(self.opt_level, "onnxruntime optimization level", tuple(OPT_LEVELS))
        checks.string(self.provider, "provider", PROVIDERS)

    def to_json(self) -> dict[str, object]:
        """JSON-ready settings (the report's `settings`)."""
        return {"scheme": self.scheme.name, "calib": self.calib, "num_calib": self.num_calib,
                "seed": self.seed, "budget": self.budget, "holdout": self.holdout,
                "search": asdict(self.search), "rule": asdict(self.rule), "families": list(self.families),
                "fp_families": list(self.fp_families), "max_targets": self.max_targets,
                "probe_steps": self.probe_steps, "eval_images": self.eval_images,
                "opt_level": self.opt_level, "provider": self.provider}
