"""`efrap train`: seeded training of a clean classifier."""

from __future__ import annotations

import argparse
import time

from converters.export import export_onnx
from models.architectures import ARCHITECTURES, build_model
from models.train import save_checkpoint, train_classifier
from pipeline.base.data import load_dataset, normalization_for, spec_files
from pipeline.base.safe_io import check_outputs
from pipeline.cli.args import positive_float, positive_int, seed_number, width_factor


def run(args: argparse.Namespace) -> int:
    """Train, save the checkpoint, optionally export to ONNX."""
    check_outputs({"-o": args.output, "--onnx": args.onnx}, spec_files(args.data))
    start = time.perf_counter()
    train, test = load_dataset(args.data, "train"), load_dataset(args.data, "test")
    c, h, _ = train.images.shape[1:]
    mean, std = normalization_for(train)
    model = build_model(args.arch, c, train.num_classes, args.width, h)
    acc = train_classifier(model, train, test, mean, std, epochs=args.epochs, seed=args.seed,
                           batch_size=args.batch_size, lr=args.lr)
    meta = {"arch": args.arch, "in_channels": int(c), "num_classes": train.num_classes,
            "width": args.width, "image_size": int(h), "dataset": args.data, "seed": args.seed,
            "epochs": args.epochs, "normalization": {"mean": mean, "std": std},
            "test_accuracy": acc}
    save_checkpoint(args.output, model, meta)
    print(f"test accuracy {100 * acc:.2f}% (torch); wrote {args.output}")
    if args.onnx:
        diff = export_onnx(model, (int(c), int(h), int(h)), args.onnx, normalization=(mean, std),
                           metadata={"efrap.arch": args.arch, "efrap.dataset": args.data,
                                     "efrap.num_classes": str(train.num_classes), "efrap.kind": "clean"})
        print(f"wrote {args.onnx} (max |onnx - torch| {diff:.2e})")
    print(f"done in {time.perf_counter() - start:.0f}s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap train`."""
    p = sub.add_parser("train", help="train a clean classifier (seeded)",
                       description="Train a clean model on the training split, report test "
                       "accuracy, save a state_dict checkpoint (loadable with weights_only=True).")
    p.add_argument("--arch", default="small_cnn", choices=sorted(ARCHITECTURES))
    p.add_argument("--data", default="fashion-mnist", help="data spec (default fashion-mnist)")
    p.add_argument("--epochs", type=positive_int, default=8, help="epochs (default 8)")
    p.add_argument("--seed", type=seed_number, default=0, help="seed (default 0)")
    p.add_argument("--width", type=width_factor, default=1.0, help="channel width multiplier (default 1)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="batch size (default 128)")
    p.add_argument("--lr", type=positive_float, default=0.05, help="peak learning rate (default 0.05)")
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.pt)")
    p.add_argument("--onnx", help="also export the model to this ONNX file")
    p.set_defaults(func=run)
