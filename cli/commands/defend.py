"""`efrap defend`: EFRAP with the release's defaults, written through the same converter."""

from __future__ import annotations

import argparse

from cli.args import lower_limit, positive_int, upper_limit
from cli.commands.quantize import add_common_quant_args, add_rounding_args, quantize_with
from pipeline.quantize import GuardOptions
from pipeline.rounding.efrap import EFRAP_DEFAULTS
from validators.guard import GuardLimits


def run(args: argparse.Namespace) -> int:
    """Quantize with EFRAP and check the result against FP on held-out images."""
    guard = GuardOptions(GuardLimits(max_agreement_drop=args.max_agreement_drop,
                                     min_accuracy=args.min_accuracy), args.holdout, args.check_opt_level)
    return quantize_with(args, "efrap", guard)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap defend`."""
    p = sub.add_parser(
        "defend", help="quantize with EFRAP (error-guided flipped rounding) and its defaults",
        description="EFRAP: learn a non-nearest rounding that flips weights with large truncation "
        "error while a layer-wise activation reconstruction loss keeps clean accuracy. Defaults "
        "follow the release: 10,000 iterations per layer, batch 32, 1,024 calibration images, "
        "Adam lr 1e-3, regulariser 0.01 (b = 2), flip weight 1, element-wise truncation errors "
        "measured on the conv weight before BatchNorm folding when the model records its BN "
        "factors (efrap export does).")
    add_common_quant_args(p, "w4a4")
    add_rounding_args(p, EFRAP_DEFAULTS)
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
