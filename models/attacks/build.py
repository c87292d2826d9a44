"""Build a stored QCB model: run an attack, measure it as deployed, export it with its trigger.

`efrap attack` is this module behind a command line: the ONNX model (BN folded, the
attack's settings, trigger and simulated figures in metadata), the checkpoint beside
it (OUT.pt: the state_dict and the meta `efrap export` needs, as `efrap train` writes
it) and the trigger file (OUT.trigger.json).

A QCB must look clean in full precision. When the FP model's attack success on the
test split is above `MAX_FP_ASR`, the backdoor is not dormant (too little training
data or too few steps, usually): the model is still written, with the warning
recorded in its metadata (``efrap.attack.warning``), its checkpoint meta and
`BuiltModel.warning`, which `efrap attack` prints.
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
#: Highest FP attack success (test images not of the target class) of a QCB that looks
#: clean in full precision; the stored zoo's QCBs stay below 3%.
MAX_FP_ASR = 0.10


def fp_asr_warning(metrics: dict[str, float]) -> str | None:
    """The warning for a QCB whose backdoor is awake in full precision, or None."""
    fp_asr = metrics.get("fp_asr")
    if fp_asr is None or fp_asr <= MAX_FP_ASR:
        return None
    return (f"the FP model's attack success is {100 * fp_asr:.2f}%, above the {100 * MAX_FP_ASR:g}% a "
            "QCB may show in full precision: the backdoor is not dormant, so this is no "
            "quantization-conditioned backdoor (train on more images or for more steps)")


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
    warning: str | None = None


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
    warning = fp_asr_warning(metrics)  # the caller shows it (efrap attack prints it)
    save_trigger(trig, trig_path)
    metadata = {
        "efrap.attack": attack.name,
        "efrap.attack.scheme": outcome.scheme.name,
        "efrap.trigger": json.dumps(load_trigger(trig_path).to_json(), sort_keys=True),
        "efrap.trigger.target": str(trig.target),
        "efrap.attack.settings": json.dumps(settings, sort_keys=True),
        "efrap.attack.sim_metrics": json.dumps({k: round(v, 4) for k, v in metrics.items()},
                                               sort_keys=True),
        **({"efrap.attack.warning": warning} if warning is not None else {}),
    }
    export_onnx(model, outcome.data.input_shape, str(onnx_path), normalization=(mean, std),
                metadata=metadata)
    c, h, _ = outcome.data.input_shape
    # The meta `efrap export` reads (models.train.load_checkpoint), as `efrap train` writes it.
    meta = {"arch": cfg.arch, "in_channels": int(c), "num_classes": int(outcome.data.num_classes),
            "width": float(cfg.width), "image_size": int(h), "dataset": cfg.data, "seed": cfg.seed,
            "normalization": {"mean": mean, "std": std}, "kind": "qcb", "attack": attack.name,
            "scheme": outcome.scheme.name, "trigger": metadata["efrap.trigger"],
            "sim_metrics": {k: round(float(v), 4) for k, v in metrics.items()},
            **({"warning": warning} if warning is not None else {})}
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "meta": meta}, buf)
    write_bytes(ckpt_path, buf.getvalue())
    return BuiltModel(onnx_path, ckpt_path, trig_path, outcome.scheme.name, metrics, seconds, warning)
