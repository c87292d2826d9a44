"""`efrap attack`: build a quantization-conditioned backdoor (red-team zoo)."""

from __future__ import annotations

import argparse
import sys

from models.architectures import ARCHITECTURES
from models.attacks import ATTACKS, ROUNDING_ATTACKS, get_attack
from models.attacks.base import CARRIERS, AttackConfig
from models.attacks.build import MAX_FP_ASR, build_qcb, output_paths
from models.attacks.qura import QuRAConfig, run_qura
from models.train import read_state_dict
from pipeline.base.data import spec_files
from pipeline.base.device import DEVICES
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import model_files
from pipeline.base.safe_io import check_outputs
from pipeline.base.scheme import scheme_files
from pipeline.base.trigger import load_trigger, trigger_files
from pipeline.cli.args import (
    above_one,
    fraction,
    nonnegative_int,
    positive_float,
    positive_int,
    seed_number,
    width_factor,
)

#: Options that shape training; a rounding-only attack starts from a trained FP model instead.
_TRAINING_ONLY = {"--init": "init", "--epochs": "epochs", "--steps-per-epoch": "steps_per_epoch",
                  "--inflate": "inflate"}
#: Options of the rounding-only attacks that training attacks do not take.
_ROUNDING_ONLY = {"--model": "model", "--budget": "budget", "--iters": "iters"}


def _check_options(args: argparse.Namespace, rounding: bool) -> None:
    """Refuse options that the chosen kind of attack would silently ignore."""
    if rounding:
        given = [opt for opt, key in _TRAINING_ONLY.items() if getattr(args, key) is not None]
        given += [opt for opt, key, default in (("--arch", "arch", "small_cnn"), ("--width", "width", 1.0),
                                                ("--pretrain-epochs", "pretrain_epochs", 2),
                                                ("--carrier", "carrier", "weights"))
                  if getattr(args, key) != default]
        if args.model is None:
            raise EfrapError(f"--method {args.method} quantizes a clean FP model: give --model FP.onnx")
        if given:
            raise EfrapError(f"--method {args.method} trains nothing; {', '.join(given)} would be ignored")
    else:
        given = [opt for opt, key in _ROUNDING_ONLY.items() if getattr(args, key) is not None]
        given += ["--weight-storage"] if args.weight_storage != "int8" else []
        if given:
            raise EfrapError(f"{', '.join(given)}: only for rounding-only attacks "
                             f"({', '.join(ROUNDING_ATTACKS)})")


def run_rounding(args: argparse.Namespace) -> int:
    """QuRA: quantize the clean FP model with a backdoored rounding; write OUT.onnx and its trigger."""
    onnx_path, _, trig_path = output_paths(args.output)
    inputs = [*model_files(args.model), *spec_files(args.data), *scheme_files(args.scheme)]
    if args.trigger:
        inputs += trigger_files(args.trigger)
    outputs = {"-o": onnx_path, "trigger file": trig_path,
               "trigger pattern": trig_path.with_name(trig_path.stem + ".npz") if args.trigger else None}
    check_outputs(outputs, inputs)
    defaults = QuRAConfig()
    cfg = QuRAConfig(scheme=args.scheme, data=args.data,
                     trigger=load_trigger(args.trigger) if args.trigger else None,
                     budget=args.budget if args.budget is not None else defaults.budget,
                     iters=args.iters or defaults.iters, lr=args.lr or defaults.lr, seed=args.seed,
                     train_images=args.train_limit or defaults.train_images, device=args.device,
                     weight_storage=args.weight_storage)
    out = run_qura(args.model, str(onnx_path), cfg)
    m = out.metrics
    print(f"wrote {out.onnx_path}, {out.trigger_path.name} (qura for {args.scheme}, {out.seconds:.0f}s): "
          f"{out.flip_count} of {out.total_weights} weights off nearest (budget {out.budget_count})")
    print(f"test set, onnxruntime faithful: FP CDA {100 * m['fp_cda']:.2f}% ASR {100 * m['fp_asr']:.2f}% "
          f"| nearest CDA {100 * m['nearest_cda']:.2f}% ASR {100 * m['nearest_asr']:.2f}% "
          f"| qura CDA {100 * m['qura_cda']:.2f}% ASR {100 * m['qura_asr']:.2f}%")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run one attack and write the FP ONNX, its checkpoint and its trigger."""
    _check_options(args, args.method in ROUNDING_ATTACKS)
    if args.method in ROUNDING_ATTACKS:
        return run_rounding(args)
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
    if built.warning is not None:
        print(f"warning: {built.onnx_path}: {built.warning}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap attack`."""
    p = sub.add_parser("attack", help="build a quantization-conditioned backdoor model (red team)",
                       description="Train a model that is clean in full precision and "
                       "backdoored once quantized with nearest rounding under SCHEME. Writes "
                       "the FP ONNX, OUT.pt (a checkpoint efrap export reads) and OUT.trigger.json. "
                       "When the FP model's attack success is above "
                       f"{100 * MAX_FP_ASR:g}% the backdoor is not dormant: a warning is printed "
                       "and recorded in the model's metadata (efrap.attack.warning). Rounding-only "
                       "attacks (qura) instead quantize a clean FP model (--model) with a "
                       "backdoored rounding and write the QDQ model OUT.onnx and OUT.trigger.json.")
    p.add_argument("--method", required=True, choices=(*ATTACKS, *ROUNDING_ATTACKS), help="the attack")
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
    g = p.add_argument_group(
        "rounding-only attacks (qura)", "QuRA (NDSS 2026): the attacker is the quantizer; the FP model stays "
        "clean and the backdoor is written only through which way weights round (each within one step "
        "of the FP weight, nearest rounding's grids). --data, --scheme, --trigger, --lr, --seed, "
        "--train-limit and --device apply too.")
    g.add_argument("--model", metavar="FP.onnx", help="the clean FP ONNX model to quantize")
    g.add_argument("--budget", type=fraction,
                   help="largest share of weights that may leave nearest rounding (default 3%%)")
    g.add_argument("--iters", type=positive_int, help="optimisation steps (default 1000)")
    g.add_argument("--weight-storage", choices=("int8", "int4"), default="int8",
                   help="integer storage of the written QDQ model (default int8)")
    p.add_argument("-o", "--output", required=True,
                   help="FP ONNX to write (OUT.onnx); the QDQ model for rounding-only attacks")
    p.set_defaults(func=run)
