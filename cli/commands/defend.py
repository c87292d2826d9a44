"""`efrap defend`: EFRAP with the release's defaults, written through the same converter."""

from __future__ import annotations

import argparse

from cli.commands.quantize import add_common_quant_args, add_rounding_args, quantize_with
from pipeline.rounding.efrap import EFRAP_DEFAULTS


def run(args: argparse.Namespace) -> int:
    """Quantize with EFRAP."""
    return quantize_with(args, "efrap")


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
    p.set_defaults(func=run)
