"""The deployment: where a model runs and on what data, the settings every step shares.

A scan, a quantization (or defense) and a verification of one model are three views of one
deployment: the same scheme, data, calibration images, seed, onnxruntime provider and
optimization level, threads and preprocessing. `Deployment` holds them once and checks them
once; `pipeline.quantize.QuantizeOptions`, `pipeline.scan.ScanOptions` and
`validators.verify.VerifyOptions` embed it and add only what is their own. The command
line, a gate config and a batch manifest each parse into a `Deployment`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.base import checks, limits
from pipeline.base.data import DEFAULT_DATA
from pipeline.base.errors import EfrapError
from pipeline.base.runtime import OPT_LEVELS, PROVIDERS
from pipeline.base.scheme import Scheme


@dataclass(frozen=True)
class Deployment:
    """Settings shared by the scan, the rounding run and verification, checked when built.

    Attributes:
        scheme: The deployment's quantization scheme (None only where nothing is quantized:
            verifying a model as it is).
        data: The data set (a data spec); verification reads its labelled test split.
        calib: The data set whose training split calibrates, checks against FP and scans
            (None: `data`).
        num_calib: Calibration images.
        seed: The run's one seed (image choices, sampling, learned rounding's batches, the
            scan's searches, verification's --limit choice).
        provider: onnxruntime provider ("auto", "cpu", "cuda").
        opt_level: onnxruntime optimization level of every figure ("faithful", "all").
        threads: Threads of torch and onnxruntime (None: OMP_NUM_THREADS, else each library's
            default).
        preprocess: Checked preprocessing fields given by the user
            (`pipeline.base.preprocess.from_table`); None: what the model records.
    """

    scheme: Scheme | None = None
    data: str = DEFAULT_DATA
    calib: str | None = None
    num_calib: int = 1024
    seed: int = 0
    provider: str = "auto"
    opt_level: str = "faithful"
    threads: int | None = None
    preprocess: dict | None = None

    def __post_init__(self) -> None:
        if self.scheme is not None and not isinstance(self.scheme, Scheme):
            raise EfrapError(f"scheme must be a Scheme (pipeline.base.scheme.load_scheme), "
                             f"got {self.scheme!r}")
        checks.string(self.data, "data")
        if self.calib is not None:
            checks.string(self.calib, "calibration data")
        limits.IMAGES.check(self.num_calib, "number of calibration images")
        limits.SEED.check(self.seed, "seed")
        checks.string(self.provider, "provider", PROVIDERS)
        checks.string(self.opt_level, "onnxruntime optimization level", tuple(OPT_LEVELS))
        if self.threads is not None:
            limits.WORKERS.check(self.threads, "threads")
        if self.preprocess is not None and not isinstance(self.preprocess, dict):
            raise EfrapError(f"preprocess must be a table of checked fields, got {self.preprocess!r}")

    @property
    def calib_data(self) -> str:
        """The data set whose training split is read: `calib`, else `data`."""
        return self.data if self.calib is None else self.calib

    def quantized(self) -> Scheme:
        """The scheme, for a step that quantizes.

        Raises:
            EfrapError: when the deployment names none.
        """
        if self.scheme is None:
            raise EfrapError("this step quantizes, and the deployment names no scheme")
        return self.scheme


class DeploymentViews:
    """Read-only views of an options class's `deployment`, under the names its step reads.

    `QuantizeOptions`, `ScanOptions` and `VerifyOptions` inherit them, so the shared
    settings live (and are checked) in the one `Deployment` and are read the same way
    everywhere.
    """

    deployment: Deployment

    @property
    def scheme(self) -> Scheme:
        """The deployment's scheme (refused where it names none)."""
        return self.deployment.quantized()

    @property
    def calib(self) -> str:
        """The data set whose training split calibrates, checks and scans."""
        return self.deployment.calib_data

    @property
    def data(self) -> str:
        """The data set whose test split is verified."""
        return self.deployment.data

    @property
    def num_calib(self) -> int:
        """Calibration images."""
        return self.deployment.num_calib

    @property
    def seed(self) -> int:
        """The run's one seed."""
        return self.deployment.seed

    @property
    def provider(self) -> str:
        """onnxruntime provider."""
        return self.deployment.provider

    @property
    def opt_level(self) -> str:
        """onnxruntime optimization level."""
        return self.deployment.opt_level

    @property
    def preprocess(self) -> dict | None:
        """The user's preprocessing fields (None: what the model records)."""
        return self.deployment.preprocess
