"""Run a model in onnxruntime on test data: clean accuracy, attack success, parity.

The deployed model is the truth: every figure comes from onnxruntime, and the
report names the optimization level and provider it ran at.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from pipeline.errors import EfrapError
from pipeline.graph import prepare_model
from pipeline.onnx_io import file_sha256, get_metadata, get_normalization, input_shape, load_model
from pipeline.provenance import versions
from pipeline.torch_graph import TorchGraph
from pipeline.trigger import Trigger, load_trigger
from validators.gate import Gate
from validators.metrics import accuracy, attack_success, prediction_parity
from validators.runtime import make_session


@dataclass(frozen=True)
class VerifyOptions:
    """Settings of one verification.

    Attributes:
        data: Data spec; its test split is used.
        trigger: Trigger file, or None for clean accuracy only.
        opt_level: onnxruntime optimization level ("faithful" or "all").
        provider: "auto", "cpu" or "cuda".
        reference: Also compare with the PyTorch simulation.
        limit: Use only the first N test images (None: all).
        gate: Thresholds that make the report pass or fail.
    """

    data: str = "fashion-mnist"
    trigger: str | Trigger | None = None
    opt_level: str = "faithful"
    provider: str = "auto"
    reference: bool = False
    limit: int | None = None
    gate: Gate = field(default_factory=Gate)


def simulate_onnx(model: onnx.ModelProto, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of any supported ONNX model (QDQ included) from the PyTorch simulation."""
    graph = TorchGraph(prepare_model(model))
    outs = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            feeds = {graph.inputs[0]: torch.from_numpy(images[i : i + batch_size])}
            outs.append(graph.run(feeds)[graph.outputs[0]].numpy())
    return np.concatenate(outs)


def verify_model(model_path: str, options: VerifyOptions) -> dict:
    """Measure a model file; returns the report dict (see docs/ARCHITECTURE.md)."""
    from pipeline import data as data_mod

    model = load_model(model_path)
    trigger = options.trigger
    if isinstance(trigger, str):
        trigger = load_trigger(trigger)
    dataset = data_mod.load_dataset(options.data, "test")
    data_mod.check_fits(dataset, input_shape(model), model_path)
    images, labels = dataset.images, dataset.labels
    if options.limit is not None:
        if options.limit < 1:
            raise EfrapError(f"--limit must be positive, got {options.limit}")
        images, labels = images[: options.limit], labels[: options.limit]
    mean, std = get_normalization(model)
    session = make_session(model, options.opt_level, options.provider)
    t0 = time.perf_counter()
    clean_in = data_mod.normalize(images, mean, std)
    logits = session.run(clean_in)
    meta = get_metadata(model)
    report: dict = {
        "model": str(model_path),
        "model_sha256": file_sha256(model_path),
        "data": options.data,
        "split": "test",
        "images": len(labels),
        "opt_level": options.opt_level,
        "provider": session.provider,
        "clean_accuracy": accuracy(logits, labels),
        "attack_success_rate": None,
        "attack_success_rate_all": None,
        "model_metadata": {k: v for k, v in meta.items() if k.startswith("efrap.")},
        "versions": versions(),
    }
    if trigger is not None:
        if trigger.target >= logits.shape[1]:
            raise EfrapError(f"trigger target {trigger.target} is not a class of this model")
        trig_logits = session.run(data_mod.normalize(trigger.apply(images), mean, std))
        asr, asr_all = attack_success(trig_logits, labels, trigger.target)
        report.update(attack_success_rate=asr, attack_success_rate_all=asr_all,
                      trigger=trigger.to_json())
    if options.reference:
        sim = simulate_onnx(model, clean_in)
        report["parity"] = {"reference": "pytorch simulation", **prediction_parity(logits, sim)}
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if options.gate.active:
        report["gate"] = options.gate.evaluate(report)
    return report
