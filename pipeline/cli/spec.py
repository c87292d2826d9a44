"""The command line as a release spec: every command's arguments parsed into one `ReleaseSpec`.

Each command takes the options that concern it; what it does not take is the spec's
default. The options are then built by the spec (`pipeline.release_spec`), as for a gate
config or a batch manifest.
"""

from __future__ import annotations

import argparse

from pipeline.base.deployment import Deployment
from pipeline.base.scheme import load_scheme
from pipeline.cli.args import exclusions, preprocess_options
from pipeline.release_spec import ReleaseSpec, RoundingChoice, ScanChoice
from validators.guard import GuardLimits
from validators.limits import VerifyLimits

#: The options a command may lack (each command takes those that concern it). Read only
#: through `_given`, so a misspelt name is an error here, not a silent default;
#: tests/test_cli_spec.py checks that each is an option of some command.
OPTIONAL = frozenset({"num_calib", "seed", "provider", "check_opt_level", "opt_level", "weight_storage",
                      "device", "exclude", "max_agreement_drop", "min_accuracy", "max_output_error",
                      "budget", "holdout", "max_targets", "limit", "trigger"})


def _given(args: argparse.Namespace, name: str, default: object = None) -> object:
    """An argument of the command, or `default` where the command has no such option or it was not given."""
    if name not in OPTIONAL:
        raise KeyError(f"{name} is not a command-line option the release spec reads")
    value = getattr(args, name, None)
    return default if value is None else value


def deployment(args: argparse.Namespace, quantized: bool = True) -> Deployment:
    """The deployment the arguments name (`quantized`: the command takes --scheme and --data)."""
    return Deployment(
        scheme=load_scheme(args.scheme) if quantized else None,
        data=args.calib if quantized else args.data,
        num_calib=_given(args, "num_calib", 1024),  # type: ignore[arg-type]
        seed=_given(args, "seed", 0),  # type: ignore[arg-type]
        provider=_given(args, "provider", "auto"),  # type: ignore[arg-type]
        # The check's level on quantize and defend, verification's on verify.
        opt_level=_given(args, "check_opt_level", _given(args, "opt_level", "faithful")),  # type: ignore[arg-type]
        preprocess=preprocess_options(args))


def release_spec(args: argparse.Namespace, method: str = "efrap", preset: str | None = None,
                 overrides: dict[str, object] | None = None, quantized: bool = True) -> ReleaseSpec:
    """What the command's arguments ask for.

    Args:
        args: The parsed arguments.
        method: The rounding method (quantize, defend).
        preset: EFRAP's preset (defend).
        overrides: The rounding options given (quantize, defend).
        quantized: Whether the command names a scheme and calibration data (all but verify).
    """
    rounding = RoundingChoice(method, preset, overrides or {}, _given(args, "weight_storage", "int8"),  # type: ignore[arg-type]
                              _given(args, "device", "auto"),  # type: ignore[arg-type]
                              exclusions(args) if _given(args, "exclude") is not None else ())
    check = GuardLimits(max_agreement_drop=_given(args, "max_agreement_drop"),  # type: ignore[arg-type]
                        min_accuracy=_given(args, "min_accuracy") if quantized else None,  # type: ignore[arg-type]
                        max_output_error=_given(args, "max_output_error"))  # type: ignore[arg-type]
    scan = ScanChoice(budget=_given(args, "budget"), holdout=_given(args, "holdout", 1000),  # type: ignore[arg-type]
                      max_targets=_given(args, "max_targets", 10))  # type: ignore[arg-type]
    limits = VerifyLimits() if quantized else VerifyLimits(
        min_accuracy=args.min_accuracy, max_asr=args.max_asr, max_parity_diff=args.max_parity_diff)
    return ReleaseSpec(deployment(args, quantized), rounding, holdout=_given(args, "holdout", 1000),  # type: ignore[arg-type]
                       check=check, scan=scan, limit=_given(args, "limit"), limits=limits,  # type: ignore[arg-type]
                       trigger=_given(args, "trigger"))  # type: ignore[arg-type]
