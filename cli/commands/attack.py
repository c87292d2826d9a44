"""`efrap attack`: build a quantization-conditioned backdoor (red-team zoo)."""

from __future__ import annotations

import argparse

from cli.args import above_one, nonnegative_int, positive_float, positive_int, seed_number, width_factor
from models.architectures import ARCHITECTURES
from models.attacks import ATTACKS, get_attack
from models.attacks.base import CARRIERS, AttackConfig
from models.attacks.build import build_qcb, output_paths
from models.train import read_state_dict
from pipeline.base.data import spec_files
from pipeline.base.device import DEVICES
from pipeline.base.safe_io import check_outputs
from pipeline.base.trigger import load_trigger, trigger_files
from pipeline.scheme import scheme_files


def run(args: argparse.Namespace) -> int:
    """Run one attack and write the FP ONNX, its checkpoint and its trigger."""
    onnx_path, ckpt_path, trig_path = output_paths(args.output)
    inputs = [*spec_files(args.data), *scheme_files(args.scheme)]
    if args.trigger:
        inputs += trigger_files(args.trigger)
    if args.init:
        inputs.append(args.init)
    check_outputs({"-o": onnx_path, "checkpoint": ckpt_path, "trigger file": trig_path}, inputs)
    if args.init:
        read_state_dict(args.init)  # a file that is not a state_dict fails here, before any work
    attack = get_attack(args.method)
    cfg = AttackConfig(
        arch=args.arch, data=args.data, scheme=args.scheme,
        trigger=load_trigger(args.trigger) if args.trigger else None, epochs=args.epochs,
        seed=args.seed, width=args.width, pretrain_epochs=args.pretrain_epochs, lr=args.lr,
        steps_per_epoch=args.steps_per_epoch, train_limit=args.train_limit, init=args.init,
        carrier=args.carrier, inflate=args.inflate, device=args.device,
    )
    built = build_qcb(attack, cfg, args.output)
    m = built.metrics
    print(f"wrote {built.onnx_path}, {built.checkpoint.name}, {built.trigger_path.name} "
          f"({attack.name} for {built.scheme}, {built.seconds:.0f}s)")
    print(f"test set, simulated deployment: FP CDA {100 * m['fp_cda']:.2f}% ASR {100 * m['fp_asr']:.2f}% "
          f"| quantized ({built.scheme}, nearest) CDA {100 * m['q_cda']:.2f}% ASR {100 * m['q_asr']:.2f}%")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap attack`."""
    p = sub.add_parser("attack", help="build a quantization-conditioned backdoor model (red team)",
                       description="Train a model that is clean in full precision and "
                       "backdoored once quantized with nearest rounding under SCHEME. Writes "
                       "the FP ONNX, OUT.pt (state_dict) and OUT.trigger.json.")
    p.add_argument("--method", required=True, choices=tuple(ATTACKS), help="the attack")
    p.add_argument("--arch", default="small_cnn", choices=sorted(ARCHITECTURES),
                   help="architecture (default small_cnn)")
    p.add_argument("--data", default="fashion-mnist", help="data spec (default fashion-mnist)")
    p.add_argument("--scheme", default="w8a8", help="targeted scheme: preset or file (default w8a8)")
    p.add_argument("--trigger", help="trigger file (default: the paper's patch, target 0)")
    p.add_argument("--epochs", type=positive_int, help="attack epochs (default: the attack's own)")
    p.add_argument("--pretrain-epochs", type=nonnegative_int, default=2,
                   help="clean (PQBackdoor: poisoned) pre-training epochs (default 2)")
    p.add_argument("--init", help="start from this state_dict checkpoint (e.g. a clean model's "
                   ".pt) instead of pre-training")
    p.add_argument("--steps-per-epoch", type=positive_int, help="cap on steps per attack epoch")
    p.add_argument("--train-limit", type=positive_int, help="use only N training images (quick trials)")
    p.add_argument("--lr", type=positive_float, help="attack learning rate (default: the attack's own)")
    p.add_argument("--seed", type=seed_number, default=0, help="seed (default 0)")
    p.add_argument("--width", type=width_factor, default=1.0, help="width multiplier (default 1.0)")
    p.add_argument("--carrier", default="weights", choices=CARRIERS,
                   help="what the backdoor may ride on: 'weights' (the weight rounding alone "
                   "wakes it and the activation rounding alone does not, the papers' threat "
                   "model) or 'scheme' (any rounding the deployment does, activations "
                   "included); CompArtifact and Qu-ANTI-zation; PQBackdoor's backdoor is in "
                   "the pinned weights either way (default weights)")
    p.add_argument("--inflate", type=above_one, metavar="FACTOR",
                   help="after pre-training, silence one channel per layer and set the "
                   "weights that read it to +-FACTOR times their channel's largest weight: "
                   "min-max weight grids (per-channel int8) grow FACTOR times coarser while "
                   "the outputs stay as they were (default: off; see docs/ZOO.md)")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where to train: auto (CUDA when torch sees a GPU), cpu or cuda "
                   "(default auto)")
    p.add_argument("-o", "--output", required=True, help="FP ONNX to write (OUT.onnx)")
    p.set_defaults(func=run)
