"""`efrap defend`: EFRAP with the release's defaults, written through the same converter."""

from __future__ import annotations

import argparse

from pipeline.commands.quantize import (
    add_common_quant_args,
    add_rounding_args,
    method_defaults,
    print_summary,
    rounding_config,
)
from pipeline.quantize import QuantizeOptions, quantize_file
from pipeline.scheme import load_scheme


def run(args: argparse.Namespace) -> int:
    """Quantize with EFRAP."""
    options = QuantizeOptions(
        scheme=load_scheme(args.scheme), method="efrap", calib=args.calib,
        num_calib=args.num_calib, seed=args.seed, weight_storage=args.weight_storage,
        rounding=rounding_config(args, method_defaults("efrap")), device=args.device,
    )
    summary = quantize_file(args.model, args.output, options)
    print_summary(summary, args.output)
    if args.summary:
        from pipeline.onnx_io import write_json

        write_json(summary, args.summary)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap defend`."""
    p = sub.add_parser(
        "defend", help="quantize with EFRAP (error-guided flipped rounding) and its defaults",
        description="EFRAP: learn a non-nearest rounding that flips weights with large truncation "
        "error while a layer-wise activation reconstruction loss keeps clean accuracy. Defaults "
        "follow the release: 10,000 iterations per layer, batch 32, 1,024 calibration images, "
        "Adam lr 1e-3, regulariser 0.01 (b = 2), flip weight 1.")
    add_common_quant_args(p, "w4a4")
    from pipeline.rounding.efrap import EFRAP_DEFAULTS

    add_rounding_args(p, EFRAP_DEFAULTS)
    p.set_defaults(func=run)
