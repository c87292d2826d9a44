"""`efrap export`: checkpoint -> ONNX (BN folded, opset 21, dynamic batch)."""

from __future__ import annotations

import argparse

from converters.export import export_onnx
from models.train import load_checkpoint
from pipeline.base.safe_io import check_outputs


def run(args: argparse.Namespace) -> int:
    """Export a checkpoint written by `efrap train` or `efrap attack`."""
    check_outputs({"-o": args.output}, [args.checkpoint])
    model, meta = load_checkpoint(args.checkpoint)
    shape = (meta["in_channels"], meta["image_size"], meta["image_size"])
    norm = meta["normalization"]
    extra = {f"efrap.{k}": v for k, v in meta.items()
             if k in ("arch", "dataset", "attack", "scheme", "trigger", "kind") and isinstance(v, str)}
    if isinstance(meta.get("warning"), str):  # an attack's FP-awake warning stays with the model
        extra["efrap.attack.warning"] = meta["warning"]
    extra["efrap.num_classes"] = str(meta["num_classes"])
    diff = export_onnx(model, shape, args.output, normalization=(norm["mean"], norm["std"]),
                       metadata=extra)
    print(f"wrote {args.output}; max |onnx - torch| = {diff:.3e}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap export`."""
    p = sub.add_parser("export", help="export a checkpoint to ONNX",
                       description="Fold BatchNorm, export to ONNX opset 21 with a dynamic batch, "
                       "store the input normalisation in metadata, and report the largest "
                       "difference against torch.")
    p.add_argument("checkpoint", help="checkpoint (.pt) from efrap train or efrap attack")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.set_defaults(func=run)
