"""`efrap defend`: EFRAP (the project's default rule or the release's settings), then its check."""

from __future__ import annotations

import argparse

from pipeline.cli.commands.quantize import add_common_quant_args, add_rounding_args, quantize_with
from pipeline.rounding.efrap import EFRAP_PRESETS


def run(args: argparse.Namespace) -> int:
    """Quantize with EFRAP and check the result against FP on held-out images."""
    return quantize_with(args, "efrap", EFRAP_PRESETS[args.preset])


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
        "factors, output step sizes learned at 4e-5) and fast (the default's loss and pruning on "
        "sampled (image, position) rows: 2,000 steps at lr 5e-3, a layer stops once its rounding "
        "settles; a candidate, docs/DEFENSE.md). Options below override the preset. The "
        "defended model is then compared with FP on held-out images (the check below).")
    p.add_argument("--preset", choices=tuple(EFRAP_PRESETS), default="default",
                   help="EFRAP settings: default (the project's rule), release or fast (default: default)")
    add_common_quant_args(p, "w4a4")
    add_rounding_args(p, EFRAP_PRESETS["default"])
    p.set_defaults(func=run)
