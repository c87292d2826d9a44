"""What a user asks of one model, parsed once: the spec every way in fills and every step reads.

The command line (`pipeline.cli`), a gate config (`pipeline.gate.config`) and a batch
manifest (`pipeline.batch.manifest`) are thin parsers into a `ReleaseSpec`; its methods are
the one place that turns user settings into `QuantizeOptions`, `GuardOptions`,
`ScanOptions` and `VerifyOptions`, so a setting means the same whichever way it came in:
the deployment (`pipeline.base.deployment.Deployment`), the rounding (the method, EFRAP's
preset and the overrides, resolved by `pipeline.rounding.settings.method_settings`), the
check against FP, the scan and verification.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from pipeline.base.deployment import Deployment
from pipeline.quantize import GuardOptions, QuantizeOptions
from pipeline.rounding.settings import PRESET_METHOD, method_settings
from pipeline.scan import ScanOptions, SearchConfig
from validators.guard import GuardLimits
from validators.limits import VerifyLimits
from validators.verify import Reference, VerifyOptions


@dataclass(frozen=True)
class RoundingChoice:
    """How the weights are rounded.

    Attributes:
        method: The rounding method's name.
        preset: EFRAP's named settings (None: the default rule). Read for EFRAP only: a
            gate config carries its default preset whatever the method, and each parser
            refuses a preset the user gave with another method.
        overrides: The rounding settings the user changed (field -> value).
        weight_storage: "int8" containers or packed "int4".
        device: torch device of learned rounding.
        exclude: Node names or op types kept in float.
    """

    method: str = "efrap"
    preset: str | None = None
    # A plain dict, not a read-only view: a batch job travels to its worker by pickle.
    overrides: Mapping[str, object] = field(default_factory=dict)
    weight_storage: str = "int8"
    device: str = "auto"
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScanChoice:
    """The scan's own settings; None takes the deployment's.

    Attributes:
        budget: Seconds the whole scan may take (None: no limit).
        holdout: Held-out training images of its onnxruntime figures.
        max_targets: Most classes searched.
        num_calib: Its calibration images, where they differ from the rounding run's (a gate
            config's `[scan] num_calib`).
        seed: Its seed, likewise.
        steps: Most search steps per class and family (None: the scan's default).
    """

    budget: float | None = None
    holdout: int = 1000
    max_targets: int = 10
    num_calib: int | None = None
    seed: int | None = None
    steps: int | None = None


@dataclass(frozen=True)
class ReleaseSpec:
    """Everything a user asked of one model.

    Attributes:
        deployment: The settings every step shares.
        rounding: How the weights are rounded.
        holdout: Held-out training images of the check against FP.
        check: The check's limits.
        scan: The scan's settings (None: no scan).
        limit: Test images verified (None: all).
        limits: Verification's limits.
        trigger: The user's trigger file (None: attack success is measured only with a
            trigger the scan recovers).
        verify_seed: The seed of verification's choice of `limit` images (None: the
            deployment's; the gate has always chosen them with 0).
    """

    deployment: Deployment
    rounding: RoundingChoice = field(default_factory=RoundingChoice)
    holdout: int = 1000
    check: GuardLimits = field(default_factory=GuardLimits)
    scan: ScanChoice | None = None
    limit: int | None = None
    limits: VerifyLimits = field(default_factory=VerifyLimits)
    trigger: str | None = None
    verify_seed: int | None = None

    def quantize_options(self) -> QuantizeOptions:
        """The rounding run's options (the method's settings resolved once, here)."""
        r = self.rounding
        preset = r.preset if r.method == PRESET_METHOD else None
        return QuantizeOptions(self.deployment, method=r.method,
                               rounding=method_settings(r.method, preset, dict(r.overrides) or None),
                               weight_storage=r.weight_storage, device=r.device, exclude=r.exclude)

    def guard_options(self) -> GuardOptions:
        """The check against FP, at the deployment's optimization level."""
        return GuardOptions(self.check, self.holdout, self.deployment.opt_level)

    def scan_options(self) -> ScanOptions:
        """The scan's options: the deployment's, with the scan's own count and seed where given."""
        s = self.scan or ScanChoice()
        d = self.deployment
        deployment = replace(d, num_calib=d.num_calib if s.num_calib is None else s.num_calib,
                             seed=d.seed if s.seed is None else s.seed)
        search = SearchConfig() if s.steps is None else SearchConfig(steps=s.steps)
        return ScanOptions(deployment, budget=s.budget, holdout=s.holdout, search=search,
                           max_targets=s.max_targets)

    def verify_options(self, trigger: str | None = None, reference: Reference | None = None) -> VerifyOptions:
        """Verification's options; `trigger` (a recovered one) when the spec names none."""
        d = self.deployment if self.verify_seed is None else replace(self.deployment, seed=self.verify_seed)
        return VerifyOptions(d, trigger=self.trigger or trigger, reference=reference, limit=self.limit,
                             gate=self.limits)
