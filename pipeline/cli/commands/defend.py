"""`efrap defend`: EFRAP (the project's default rule or the release's settings), then its check."""

from __future__ import annotations

import argparse

from pipeline.cli.args import lower_limit, positive_int, upper_limit
from pipeline.cli.commands.quantize import add_common_quant_args, add_rounding_args, quantize_with
from pipeline.quantize import GuardOptions
from pipeline.rounding.efrap import EFRAP_PRESETS
from validators.guard import GuardLimits


def run(args: argparse.Namespace) -> int:
    """Quantize with EFRAP and check the result against FP on held-out images."""
    guard = GuardOptions(GuardLimits(max_agreement_drop=args.max_agreement_drop,
                                     min_accuracy=args.min_accuracy), args.holdout, args.check_opt_level)
    return quantize_with(args, "efrap", guard, EFRAP_PRESETS[args.preset])


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap defend`."""
    p = sub.add_parser(
        "defend", help="quantize with EFRAP (error-guided flipped rounding), then check it against FP",
        description="EFRAP: learn a non-nearest rounding that flips weights with large truncation "
        "error while a layer-wise activation reconstruction loss keeps clean accuracy. Presets: "
        "default (the project's rule, docs/DEFENSE.md: the release's algorithm with truncation "
        "errors in grid steps and flip weight 0.02) and release (the release's settings: 10,000 "
        "iterations per layer, batch 32, Adam lr 1e-3, regulariser 0.01 with b = 2, flip weight 1, "
        "element-wise errors in the conv weight's pre-BN units when the model records its BN "
        "factors, output step sizes learned at 4e-5). Options below override the preset. The "
        "defended model is then compared with FP on held-out images.")
    p.add_argument("--preset", choices=tuple(EFRAP_PRESETS), default="default",
                   help="EFRAP settings: default (the project's rule) or release (default: default)")
    add_common_quant_args(p, "w4a4")
    add_rounding_args(p, EFRAP_PRESETS["default"])
    g = p.add_argument_group(
        "check (exit 1 when the defended model breaks its budget; it is still written, and its "
        "metadata and --summary say why)",
        "The defended and the FP model run in onnxruntime on held-out training images that "
        "calibration did not use; thresholds are fractions (0.01) or percentages (1%%).")
    g.add_argument("--holdout", type=positive_int, default=1000, help="held-out images (default 1000)")
    g.add_argument("--max-agreement-drop", type=upper_limit,
                   help="largest share of held-out images whose prediction may differ from FP's")
    g.add_argument("--min-accuracy", type=lower_limit,
                   help="lowest clean accuracy on the held-out images (needs labelled data)")
    g.add_argument("--check-opt-level", choices=("faithful", "all"), default="faithful",
                   help="onnxruntime optimization level of the check (default faithful)")
    p.set_defaults(func=run)
