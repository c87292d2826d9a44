"""Build a stored QCB model: run an attack, measure it as deployed, export it with its trigger.

`efrap attack` is this module behind a command line: the ONNX model (BN folded, the
attack's settings, trigger and simulated figures in metadata), the state_dict
checkpoint beside it (OUT.pt) and the trigger file (OUT.trigger.json).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from converters.export import export_onnx
from models.attacks.base import Attack, AttackConfig, AttackOutcome, evaluate, run_attack
from pipeline.base import data as data_mod
from pipeline.base.errors import EfrapError
from pipeline.base.safe_io import write_bytes
from pipeline.base.trigger import load_trigger, save_trigger
from pipeline.calibration import image_indices, sample_seed

#: Calibration images and seed `efrap quantize` uses by default: the simulation is
#: calibrated on exactly those to report the figures a deployment would see.
DEPLOY_CALIB_IMAGES = 1024
DEPLOY_SEED = 0


def output_paths(out: str) -> tuple[Path, Path, Path]:
    """(ONNX, checkpoint, trigger) paths for an output name ending in .onnx."""
    path = Path(out)
    if path.suffix != ".onnx":
        raise EfrapError(f"{out}: the output must end in .onnx")
    return path, path.with_suffix(".pt"), path.with_name(path.stem + ".trigger.json")


def deployment_calibration(outcome: AttackOutcome, data: str) -> None:
    """Calibrate the simulation on the images `efrap quantize` picks by default."""
    ds = data_mod.load_dataset(data, "train")
    idx = image_indices(len(ds.labels), DEPLOY_CALIB_IMAGES, DEPLOY_SEED)
    images = torch.from_numpy(ds.images[idx]).to(outcome.data.device)
    outcome.sim.calibrate(outcome.data.normalize(images), seed=sample_seed(DEPLOY_SEED))


def test_metrics(outcome: AttackOutcome, data: str) -> dict[str, float]:
    """FP and simulated-quantized CDA/ASR on the test split."""
    test = data_mod.load_dataset(data, "test")
    return evaluate(outcome.sim, outcome.data, torch.from_numpy(test.images),
                    torch.from_numpy(test.labels.astype("int64")), outcome.trigger)


@dataclass(frozen=True)
class BuiltModel:
    """What `build_qcb` wrote and measured."""

    onnx_path: Path
    checkpoint: Path
    trigger_path: Path
    scheme: str
    metrics: dict[str, float]
    seconds: float


def build_qcb(attack: Attack, cfg: AttackConfig, out: str) -> BuiltModel:
    """Run `attack` with `cfg` and write OUT.onnx, OUT.pt and OUT.trigger.json."""
    onnx_path, ckpt_path, trig_path = output_paths(out)
    t0 = time.perf_counter()
    outcome = run_attack(attack, cfg)
    seconds = time.perf_counter() - t0
    deployment_calibration(outcome, cfg.data)
    metrics = test_metrics(outcome, cfg.data)
    model = outcome.model.eval().cpu()
    mean = [round(float(v), 6) for v in outcome.data.mean.reshape(-1)]
    std = [round(float(v), 6) for v in outcome.data.std.reshape(-1)]
    trig = outcome.trigger
    settings = {
        "arch": cfg.arch, "data": cfg.data, "width": cfg.width, "seed": cfg.seed,
        "epochs": cfg.epochs or attack.default_epochs, "pretrain_epochs": cfg.pretrain_epochs,
        "steps_per_epoch": cfg.steps_per_epoch, "lr": cfg.lr,
        "init": Path(cfg.init).name if cfg.init else None, "carrier": cfg.carrier,
        "inflate": cfg.inflate,
    }
    save_trigger(trig, trig_path)
    metadata = {
        "efrap.attack": attack.name,
        "efrap.attack.scheme": outcome.scheme.name,
        "efrap.trigger": json.dumps(load_trigger(trig_path).to_json(), sort_keys=True),
        "efrap.trigger.target": str(trig.target),
        "efrap.attack.settings": json.dumps(settings, sort_keys=True),
        "efrap.attack.sim_metrics": json.dumps({k: round(v, 4) for k, v in metrics.items()},
                                               sort_keys=True),
    }
    export_onnx(model, outcome.data.input_shape, str(onnx_path), normalization=(mean, std),
                metadata=metadata)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    write_bytes(ckpt_path, buf.getvalue())
    return BuiltModel(onnx_path, ckpt_path, trig_path, outcome.scheme.name, metrics, seconds)
