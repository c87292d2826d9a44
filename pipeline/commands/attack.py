"""`efrap attack`: build a quantization-conditioned backdoor (red-team zoo)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.errors import EfrapError


def output_paths(out: str) -> tuple[Path, Path, Path]:
    """(ONNX, checkpoint, trigger) paths for an output name ending in .onnx."""
    path = Path(out)
    if path.suffix != ".onnx":
        raise EfrapError(f"{out}: the output must end in .onnx")
    if not path.parent.exists():
        raise EfrapError(f"{out}: folder {path.parent} does not exist")
    return path, path.with_suffix(".pt"), path.with_name(path.stem + ".trigger.json")


def deployment_calibration(outcome: object, data: str, n: int = 1024, seed: int = 0) -> None:
    """Calibrate the simulation on the images `efrap quantize` picks by default."""
    import torch

    from pipeline import data as data_mod

    ds = data_mod.load_dataset(data, "train")
    idx = data_mod.sample_indices(len(ds.labels), min(n, len(ds.labels)), seed)
    mean, std = data_mod.normalization_for(ds)
    images = data_mod.normalize(ds.images[idx], mean, std)
    device = outcome.data.device  # type: ignore[attr-defined]
    outcome.sim.calibrate(torch.from_numpy(images).to(device), seed=seed)  # type: ignore[attr-defined]


def test_metrics(outcome: object, data: str) -> dict[str, float]:
    """FP and simulated-quantized CDA/ASR on the test split."""
    import torch

    from models.attacks.base import evaluate
    from pipeline import data as data_mod

    test = data_mod.load_dataset(data, "test")
    return evaluate(outcome.sim, outcome.data, torch.from_numpy(test.images),  # type: ignore[attr-defined]
                    torch.from_numpy(test.labels.astype("int64")), outcome.trigger)  # type: ignore[attr-defined]


def run(args: argparse.Namespace) -> int:
    """Run one attack and write the FP ONNX, its checkpoint and its trigger."""
    from models.attacks import get_attack

    onnx_path, ckpt_path, trig_path = output_paths(args.output)
    attack = get_attack(args.method)

    import torch

    from converters.export import export_onnx
    from models.attacks.base import AttackConfig, run_attack
    from pipeline.onnx_io import atomic_write, write_json
    from pipeline.trigger import load_trigger

    if args.epochs is not None and args.epochs < 1:
        raise EfrapError(f"--epochs must be at least 1, got {args.epochs}")
    if args.inflate is not None and args.inflate <= 1:
        raise EfrapError(f"--inflate must be above 1, got {args.inflate}")
    if args.width <= 0:
        raise EfrapError(f"--width must be positive, got {args.width}")
    trigger = load_trigger(args.trigger) if args.trigger else None
    cfg = AttackConfig(
        arch=args.arch, data=args.data, scheme=args.scheme, trigger=trigger, epochs=args.epochs,
        seed=args.seed, width=args.width, pretrain_epochs=args.pretrain_epochs, lr=args.lr,
        steps_per_epoch=args.steps_per_epoch, train_limit=args.train_limit, init=args.init,
        carrier=args.carrier, inflate=args.inflate, device=args.device,
    )
    t0 = time.perf_counter()
    outcome = run_attack(attack, cfg)
    seconds = time.perf_counter() - t0
    deployment_calibration(outcome, args.data)
    metrics = test_metrics(outcome, args.data)
    model = outcome.model.eval().cpu()
    mean = [round(float(v), 6) for v in outcome.data.mean.reshape(-1)]
    std = [round(float(v), 6) for v in outcome.data.std.reshape(-1)]
    trig = outcome.trigger
    metadata = {
        "efrap.attack": attack.name,
        "efrap.attack.scheme": outcome.scheme.name,
        "efrap.trigger": json.dumps(trig.to_json(), sort_keys=True),
        "efrap.trigger.target": str(trig.target),
        "efrap.attack.settings": json.dumps({
            "arch": args.arch, "data": args.data, "width": args.width, "seed": args.seed,
            "epochs": args.epochs or attack.default_epochs,
            "pretrain_epochs": args.pretrain_epochs, "steps_per_epoch": args.steps_per_epoch,
            "lr": args.lr, "init": Path(args.init).name if args.init else None,
            "carrier": args.carrier, "inflate": args.inflate,
        }, sort_keys=True),
        "efrap.attack.sim_metrics": json.dumps({k: round(v, 4) for k, v in metrics.items()},
                                               sort_keys=True),
    }
    export_onnx(model, outcome.data.input_shape, str(onnx_path), normalization=(mean, std),
                metadata=metadata)
    state = model.state_dict()
    atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))
    write_json(trig.to_json(), trig_path)
    print(f"wrote {onnx_path}, {ckpt_path.name}, {trig_path.name} "
          f"({attack.name} for {outcome.scheme.name}, {seconds:.0f}s)")
    print(f"test set, simulated deployment: FP CDA {100 * metrics['fp_cda']:.2f}% "
          f"ASR {100 * metrics['fp_asr']:.2f}% | quantized ({outcome.scheme.name}, nearest) "
          f"CDA {100 * metrics['q_cda']:.2f}% ASR {100 * metrics['q_asr']:.2f}%")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `efrap attack`."""
    p = sub.add_parser("attack", help="build a quantization-conditioned backdoor model (red team)",
                       description="Train a model that is clean in full precision and "
                       "backdoored once quantized with nearest rounding under SCHEME. Writes "
                       "the FP ONNX, OUT.pt (state_dict) and OUT.trigger.json.")
    p.add_argument("--method", required=True, help="compartifact, quantization or pqbackdoor")
    p.add_argument("--arch", default="small_cnn", help="architecture (default small_cnn)")
    p.add_argument("--data", default="fashion-mnist", help="data spec (default fashion-mnist)")
    p.add_argument("--scheme", default="w8a8", help="targeted scheme: preset or file (default w8a8)")
    p.add_argument("--trigger", help="trigger JSON (default: the paper's patch, target 0)")
    p.add_argument("--epochs", type=int, help="attack epochs (default: the attack's own)")
    p.add_argument("--pretrain-epochs", type=int, default=2,
                   help="clean (PQBackdoor: poisoned) pre-training epochs (default 2)")
    p.add_argument("--init", help="start from this state_dict checkpoint (e.g. a clean model's "
                   ".pt) instead of pre-training")
    p.add_argument("--steps-per-epoch", type=int, help="cap on steps per attack epoch")
    p.add_argument("--train-limit", type=int, help="use only N training images (quick trials)")
    p.add_argument("--lr", type=float, help="attack learning rate (default: the attack's own)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier (default 1.0)")
    p.add_argument("--carrier", default="weights", choices=("weights", "scheme"),
                   help="what the backdoor may ride on: 'weights' (the weight rounding alone "
                   "wakes it and the activation rounding alone does not, the papers' threat "
                   "model) or 'scheme' (any rounding the deployment does, activations "
                   "included); CompArtifact and Qu-ANTI-zation; PQBackdoor's backdoor is in "
                   "the pinned weights either way (default weights)")
    p.add_argument("--inflate", type=float, metavar="FACTOR",
                   help="after pre-training, silence one channel per layer and set the "
                   "weights that read it to +-FACTOR times their channel's largest weight: "
                   "min-max weight grids (per-channel int8) grow FACTOR times coarser while "
                   "the outputs stay as they were (default: off; see docs/ZOO.md)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to train: auto (CUDA when torch sees a GPU), cpu or cuda "
                   "(default auto)")
    p.add_argument("-o", "--output", required=True, help="FP ONNX to write (OUT.onnx)")
    p.set_defaults(func=run)
