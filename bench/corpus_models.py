"""The quantizer corpus: nine architectures trained briefly on real data, exported by both torch
exporters, and three third-party OCR models (rapidocr).

Usage:
    python bench/corpus_models.py [--cache DIR] [--only NAME ...] [--epochs N]
        [--train-images N] [--test-images N] [--seed N] [--no-rapidocr]

Each model of `CORPUS` is trained on a seeded subset of Fashion-MNIST padded to 32x32
and repeated to three channels (models/corpus_data.py), so that its outputs mean
something, and exported twice into the cache (default ~/.cache/efrap-onnx/corpus, or
$EFRAP_CORPUS_CACHE, or --cache; never the git tree):

- ``NAME.torchscript.onnx``: ``torch.onnx.export(dynamo=False, opset_version=17)`` in
  eval mode, BatchNorm left to the exporter (it folds it), dynamic batch, input
  "input", output "logits", and the normalisation in metadata_props as
  ``efrap.normalization`` = {"mean": [...], "std": [...]};
- ``NAME.dynamo.onnx``: ``torch.onnx.export(dynamo=True, opset_version=21)`` then
  ``.save``, the exporter's own input and output names, the batch dynamic where
  ``dynamic_shapes`` works (else fixed at 1, recorded), and NO efrap metadata: a
  quantizer must be given the preprocessing by its options.

``manifest.json`` in the cache lists every file with its sha256, input shape, batch
(dynamic or fixed), normalisation, test accuracy (torch, and onnxruntime for the
file), the largest |ONNX - torch| logit difference, the training settings and the
seconds spent. The trained weights are kept as ``NAME.pt`` (models.train checkpoint).
Re-running skips a model whose files and settings match the manifest, and retrains
only when the training settings changed. A rebuild from scratch gives byte-identical files.

Cost (torch 2.13 CPU, one thread of a busy two-core machine): training 964 s for all nine
(ViT 183 s, ResNet-18 138 s, ..., ConvNeXt 41 s), exports 2-6 s each, about 21 minutes
in all with the onnxruntime checks. With torch 2.13 every dynamo export takes a dynamic
batch, so no corpus file has a fixed batch.

`rapidocr_models` takes the three PaddleOCR models out of the rapidocr-onnxruntime
1.4.4 wheel (``pip download``, no install); `RAPIDOCR_PREPROCESS` records their
preprocessing as the package's own code does it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.architectures import build_model
from models.corpus_data import FMNIST32_MEAN, FMNIST32_STD, fmnist32_dataset
from models.train import (
    evaluate,
    load_checkpoint,
    random_crop,
    save_checkpoint,
    seed_everything,
    train_classifier,
)
from pipeline.base.data import Dataset, normalize
from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import save_model, set_metadata
from pipeline.base.progress import Progress, log
from pipeline.base.safe_io import write_text

#: Bump when the recipe (data, training loop, export calls) changes: cached files are redone.
RECIPE_VERSION = 1
DEFAULT_CACHE = Path("~/.cache/efrap-onnx/corpus")
EXPORTERS = ("torchscript", "dynamo")
TORCHSCRIPT_OPSET = 17
DYNAMO_OPSET = 21
IMAGE_SIZE = 32
NUM_CLASSES = 10
#: The batch a dynamo export is fixed to when a dynamic batch does not export.
FIXED_BATCH = 1


@dataclass(frozen=True)
class CorpusModel:
    """One corpus model and how it is trained.

    Attributes:
        name: File stem in the cache.
        arch: Name in models.architectures.ARCHITECTURES.
        width: Width multiplier (below 1 only where full width would not train in the
            CPU budget).
        optimizer: "sgd" (models.train.train_classifier: Nesterov SGD, one-cycle) or
            "adamw" (one-cycle AdamW, for the models SGD did not train in the budget).
        lr: Peak learning rate.
        weight_decay: Weight decay (L2 for SGD, decoupled for AdamW).
        epoch_factor: Epochs as a multiple of the budget's (the ViT learns slowly from
            scratch: one epoch leaves it near 35%).
    """

    name: str
    arch: str
    width: float = 1.0
    optimizer: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 5e-4
    epoch_factor: int = 1


#: The corpus, by name. ResNet-18 and MobileNetV2 run at half width: at full width they
#: train at 18 and 24 images/s on one busy core, three times the budget of all others.
#: SGD at train_classifier's settings left SqueezeNet (no BatchNorm) at chance (also at
#: lr 0.01), ConvNeXt at chance and the ViT at 27%, in one epoch of 12,000 images: those
#: three train with one-cycle AdamW (SqueezeNet 63%, ConvNeXt 73%, ViT 4 epochs 64%).
CORPUS: dict[str, CorpusModel] = {m.name: m for m in (
    CorpusModel("resnet18", "resnet18", width=0.5),
    CorpusModel("mobilenet_v2", "mobilenet_v2", width=0.5),
    CorpusModel("mobilenet_v3_small", "mobilenet_v3_small"),
    CorpusModel("efficientnet_b0", "efficientnet_b0"),
    CorpusModel("shufflenet_v2", "shufflenet_v2"),
    CorpusModel("regnet", "regnet"),
    CorpusModel("squeezenet", "squeezenet", optimizer="adamw", lr=1e-3, weight_decay=1e-4),
    CorpusModel("vit_tiny", "vit_tiny", optimizer="adamw", lr=1e-3, weight_decay=0.05, epoch_factor=4),
    CorpusModel("convnext_tiny", "convnext_tiny", optimizer="adamw", lr=2e-3, weight_decay=0.05),
)}

RAPIDOCR_VERSION = "1.4.4"
_RAPIDOCR_WHEEL = f"rapidocr_onnxruntime-{RAPIDOCR_VERSION}-py3-none-any.whl"
_RAPIDOCR_FILES = {
    "rapidocr_cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "rapidocr_det": "ch_PP-OCRv4_det_infer.onnx",
    "rapidocr_rec": "ch_PP-OCRv4_rec_infer.onnx",
}

#: Preprocessing of the three rapidocr models, read from the package's Python code in
#: rapidocr_onnxruntime-1.4.4 (paths inside the wheel, under rapidocr_onnxruntime/).
#: Common to all three: utils/load_image.py LoadImage reads a file with Pillow as RGB and
#: turns it into BGR (cv2.cvtColor(img, cv2.COLOR_RGB2BGR); numpy input is taken as BGR
#: already), so the networks see BGR; pixels are scaled by 1/255, then (x - 0.5) / 0.5
#: per channel; layout N x C x H x W, float32; onnxruntime at ORT_ENABLE_ALL
#: (utils/infer_engine.py).
RAPIDOCR_PREPROCESS: dict[str, dict[str, object]] = {
    # ch_ppocr_cls/text_cls.py TextClassifier.resize_norm_img, config.yaml Cls:
    # cls_image_shape [3, 48, 192], label_list ['0', '180'], cls_thresh 0.9; a crop judged
    # '180' with score > 0.9 is turned with cv2.rotate(img, 1) (ROTATE_180).
    "rapidocr_cls": {
        "file": _RAPIDOCR_FILES["rapidocr_cls"],
        "input": "x", "layout": "NCHW", "channels": 3, "height": 48,
        "width": "192: the crop is resized to height 48 keeping its aspect ratio, width "
                 "ceil(48 * w / h) capped at 192 (wider crops are squeezed), then padded on the "
                 "right with zeros after normalisation",
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_scale": 1 / 255,
        "channel_order": "BGR",
        "output": "N x 2 softmax probabilities; index 0 = '0' (upright), 1 = '180' (rotated)",
    },
    # ch_ppocr_det/text_detect.py TextDetector + ch_ppocr_det/utils.py DetPreProcess, config.yaml
    # Det: limit_side_len 736, limit_type min, mean/std [0.5]*3; DetPreProcess.normalize is
    # (img * (1/255) - mean) / std; DBPostProcess thresholds the map at 0.3 (box_thresh 0.5).
    "rapidocr_det": {
        "file": _RAPIDOCR_FILES["rapidocr_det"],
        "input": "x", "layout": "NCHW", "channels": 3,
        "height": "the shorter side is scaled up to 736 when below it (limit_type 'min'), the "
                  "other by the same ratio, then each side rounded to a multiple of 32",
        "width": "as height (any multiple of 32)",
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_scale": 1 / 255,
        "channel_order": "BGR",
        "output": "N x 1 x H x W text probability map (sigmoid); not logits",
    },
    # ch_ppocr_rec/text_recognize.py TextRecognizer.resize_norm_img, config.yaml Rec:
    # rec_img_shape [3, 48, 320], rec_batch_num 6; ch_ppocr_rec/utils.py CTCLabelDecode:
    # characters from the model's metadata 'character', 'blank' inserted at 0, ' ' at the end.
    "rapidocr_rec": {
        "file": _RAPIDOCR_FILES["rapidocr_rec"],
        "input": "x", "layout": "NCHW", "channels": 3, "height": 48,
        "width": "per batch: int(48 * max(320 / 48, widest w / h in the batch)); each crop "
                 "resized to height 48 keeping its aspect ratio and zero-padded on the right",
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_scale": 1 / 255,
        "channel_order": "BGR",
        "output": "N x T x 6625 softmax over CTC classes (T = width / 8)",
    },
}


def default_cache() -> Path:
    """$EFRAP_CORPUS_CACHE, else ~/.cache/efrap-onnx/corpus."""
    return Path(os.environ.get("EFRAP_CORPUS_CACHE") or DEFAULT_CACHE).expanduser()


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(cache: Path) -> dict:
    """The cache's manifest ({"models": [], "rapidocr": {}} when there is none)."""
    path = Path(cache) / "manifest.json"
    if not path.is_file():
        return {"models": [], "rapidocr": {}}
    manifest = json.loads(path.read_text())
    manifest.setdefault("models", [])
    manifest.setdefault("rapidocr", {})
    return manifest


def _save_manifest(cache: Path, manifest: dict) -> None:
    manifest["models"].sort(key=lambda e: (list(CORPUS).index(e["name"]) if e["name"] in CORPUS
                                           else len(CORPUS), e["name"], e["exporter"]))
    write_text(cache / "manifest.json", json.dumps(manifest, indent=1) + "\n")


@dataclass(frozen=True)
class Budget:
    """How much each model is trained, and on what.

    Attributes:
        epochs: Passes over the training subset.
        train_images: Size of the seeded training subset.
        test_images: Size of the seeded test subset (accuracy is reported on it).
        seed: Seeds the subsets, initialisation, order and augmentation.
        batch_size: Images per step.
    """

    epochs: int = 1
    train_images: int = 12000
    test_images: int = 2000
    seed: int = 0
    batch_size: int = 128


def training_settings(spec: CorpusModel, budget: Budget) -> dict[str, object]:
    """Everything that decides the trained weights (compared to decide whether to retrain)."""
    return {"recipe": RECIPE_VERSION, **asdict(spec), **asdict(budget), "crop_pad": 2,
            "data": "fashion-mnist padded to 32x32, 3 channels", "schedule": "one-cycle",
            "torch": str(torch.__version__)}  # a str subclass that weights_only loading refuses


def _train_adamw(model: nn.Module, train: Dataset, test: Dataset, spec: CorpusModel, budget: Budget,
                 epochs: int) -> float:
    """One-cycle AdamW with the same data order and augmentation as train_classifier."""
    seed_everything(budget.seed)
    x_train = normalize(train.images, FMNIST32_MEAN, FMNIST32_STD)
    x_test = normalize(test.images, FMNIST32_MEAN, FMNIST32_STD)
    gen = torch.Generator().manual_seed(budget.seed)
    batch_size = budget.batch_size
    steps = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps, pct_start=0.2)
    acc = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=gen).numpy()
        bar = Progress(f"train epoch {epoch}/{epochs}", total=len(order))
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = random_crop(torch.from_numpy(x_train[idx]), 2, gen)
            loss = F.cross_entropy(model(x), torch.from_numpy(train.labels[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            bar.update(len(idx), f"loss {total / min(i + batch_size, len(order)):.4f}")
        acc = evaluate(model, x_test, test.labels)
        bar.close(f"test accuracy {100 * acc:.2f}%")
    return acc


def train_model(spec: CorpusModel, budget: Budget, checkpoint: Path) -> tuple[nn.Module, float]:
    """Train one corpus model, or reload it when `checkpoint` was trained with the same settings.

    Returns:
        The eval-mode model and the seconds its training took.
    """
    settings = training_settings(spec, budget)
    if checkpoint.is_file():
        with contextlib.suppress(EfrapError):  # unreadable or another architecture: retrain
            model, meta = load_checkpoint(checkpoint)
            if meta.get("training") == settings:
                return model, float(meta.get("train_seconds", 0.0))
    train = fmnist32_dataset("train", budget.train_images, budget.seed)
    test = fmnist32_dataset("test", budget.test_images, budget.seed)
    seed_everything(budget.seed)
    model = build_model(spec.arch, 3, NUM_CLASSES, spec.width, IMAGE_SIZE)
    start = time.perf_counter()
    epochs = budget.epochs * spec.epoch_factor
    if spec.optimizer == "adamw":
        acc = _train_adamw(model, train, test, spec, budget, epochs)
    else:
        acc = train_classifier(model, train, test, FMNIST32_MEAN, FMNIST32_STD, epochs=epochs,
                               seed=budget.seed, batch_size=budget.batch_size, lr=spec.lr,
                               weight_decay=spec.weight_decay, crop_pad=2)
    seconds = time.perf_counter() - start
    meta = {"arch": spec.arch, "in_channels": 3, "num_classes": NUM_CLASSES, "width": spec.width,
            "image_size": IMAGE_SIZE, "normalization": {"mean": FMNIST32_MEAN, "std": FMNIST32_STD},
            "training": settings, "test_accuracy": acc, "train_seconds": seconds}
    save_checkpoint(checkpoint, model, meta)
    return model.eval(), seconds


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporters' warnings and the dynamo exporter's logging."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def export_torchscript(model: nn.Module, path: Path) -> dict[str, object]:
    """TorchScript export (opset 17, dynamic batch) with the normalisation in metadata."""
    x = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, _quiet_export(), torch.no_grad():
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(model.eval(), (x,), str(raw), dynamo=False, opset_version=TORCHSCRIPT_OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        proto = onnx.load(str(raw))
    set_metadata(proto, {"efrap.normalization": {"mean": FMNIST32_MEAN, "std": FMNIST32_STD}})
    save_model(proto, path)
    return {"batch": "dynamic", "dynamic_error": None}


def export_dynamo(model: nn.Module, path: Path) -> dict[str, object]:
    """dynamo export (opset 21), batch dynamic when `dynamic_shapes` works, else fixed."""
    x = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    error = None
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, _quiet_export(), torch.no_grad():
        raw = Path(tmp) / "model.onnx"
        try:
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(model.eval(), (x,), dynamo=True, opset_version=DYNAMO_OPSET,
                                        dynamic_shapes=({0: batch},), verbose=False)
        except Exception as exc:  # torch.export raises many kinds; any means "not dynamic"
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            program = torch.onnx.export(model.eval(), (x[:FIXED_BATCH],), dynamo=True,
                                        opset_version=DYNAMO_OPSET, verbose=False)
        assert program is not None
        program.save(str(raw))
        os.replace(raw, path)
    return {"batch": "dynamic" if error is None else f"fixed {FIXED_BATCH}", "dynamic_error": error}


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _io_shapes(proto: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    inits = {t.name for t in proto.graph.initializer}

    def describe(v: onnx.ValueInfoProto) -> dict:
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
                for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "shape": dims,
                "type": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}

    return ([describe(v) for v in proto.graph.input if v.name not in inits],
            [describe(v) for v in proto.graph.output])


def inspect_onnx(path: Path) -> dict[str, object]:
    """Inputs, outputs, opsets, IR version, op counts and weight count of an ONNX file.

    Weights are counted in initializers and in Constant nodes (Paddle's exporter stores
    every weight as a Constant node and no initializer).
    """
    proto = onnx.load(str(path))
    inputs, outputs = _io_shapes(proto)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    weights = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    constants = sum(int(np.prod(a.t.dims)) for n in proto.graph.node if n.op_type == "Constant"
                    for a in n.attribute if a.name == "value")
    return {"inputs": inputs, "outputs": outputs, "ir_version": proto.ir_version,
            "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
            "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
            "nodes": len(proto.graph.node), "op_types": dict(sorted(ops.items())),
            "initializer_values": weights, "constant_node_values": constants,
            "metadata_keys": [p.key for p in proto.metadata_props]}


def check_export(path: Path, model: nn.Module, test: Dataset) -> dict[str, object]:
    """onnxruntime vs torch on the normalised test images: accuracy and max |difference|."""
    x = normalize(test.images, FMNIST32_MEAN, FMNIST32_STD)
    sess = _session(path)
    batch = sess.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else 256
    name = sess.get_inputs()[0].name
    got = np.concatenate([sess.run(None, {name: x[i : i + step]})[0] for i in range(0, len(x), step)])
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    return {"test_accuracy_onnx": float((got.argmax(1) == test.labels).mean()),
            "max_abs_diff_vs_torch": float(np.abs(got - expected).max())}


def _matches(entry: dict | None, path: Path, settings: dict) -> bool:
    return (entry is not None and entry.get("training") == settings and path.is_file()
            and entry.get("sha256") == sha256(path))


def build_model_files(spec: CorpusModel, cache: Path, manifest: dict, budget: Budget) -> list[dict]:
    """Train and export one corpus model (skipped when the manifest already matches)."""
    settings = training_settings(spec, budget)
    entries = {(e["name"], e["exporter"]): e for e in manifest["models"]}
    paths = {exp: cache / f"{spec.name}.{exp}.onnx" for exp in EXPORTERS}
    if all(_matches(entries.get((spec.name, exp)), paths[exp], settings) for exp in EXPORTERS):
        log(f"{spec.name}: up to date, skipped")
        return [entries[(spec.name, exp)] for exp in EXPORTERS]
    log(f"{spec.name}: training ({spec.arch}, width {spec.width}, {spec.optimizer})")
    model, train_seconds = train_model(spec, budget, cache / f"{spec.name}.pt")
    test = fmnist32_dataset("test", budget.test_images, budget.seed)
    acc = evaluate(model, normalize(test.images, FMNIST32_MEAN, FMNIST32_STD), test.labels)
    out = []
    for exp in EXPORTERS:
        start = time.perf_counter()
        info = (export_torchscript if exp == "torchscript" else export_dynamo)(model, paths[exp])
        seconds = time.perf_counter() - start
        facts = inspect_onnx(paths[exp])
        entry = {
            "name": spec.name, "architecture": spec.arch, "exporter": exp, "file": paths[exp].name,
            "sha256": sha256(paths[exp]), "bytes": paths[exp].stat().st_size,
            "params": sum(p.numel() for p in model.parameters()),
            "input": facts["inputs"][0], "output": facts["outputs"][0], **info,  # type: ignore[index]
            "opset": facts["opsets"]["ai.onnx"], "ir_version": facts["ir_version"],  # type: ignore[index]
            "op_types": facts["op_types"],
            "normalization": {"mean": FMNIST32_MEAN, "std": FMNIST32_STD},
            "normalization_in_metadata": exp == "torchscript",
            "test_accuracy_torch": acc, **check_export(paths[exp], model, test),
            "training": settings, "seconds": {"train": round(train_seconds, 1), "export": round(seconds, 1)},
        }
        out.append(entry)
        log(f"{spec.name}: {exp} export {seconds:.1f} s, batch {info['batch']}, "
            f"onnx accuracy {100 * entry['test_accuracy_onnx']:.2f}%")
    manifest["models"] = [e for e in manifest["models"] if e["name"] != spec.name] + out
    _save_manifest(cache, manifest)
    return out


def build_corpus(cache: Path | None = None, only: list[str] | None = None,
                 budget: Budget | None = None) -> list[dict]:
    """Train and export the corpus (or the models in `only`) into `cache`; returns manifest entries.

    Raises:
        ValueError: a name in `only` is not in CORPUS.
    """
    cache = Path(cache or default_cache()).expanduser()
    unknown = [n for n in only or [] if n not in CORPUS]
    if unknown:
        raise ValueError(f"unknown corpus model(s) {', '.join(unknown)}: choose from {', '.join(CORPUS)}")
    cache.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(cache)
    out = []
    for name in only or list(CORPUS):
        out += build_model_files(CORPUS[name], cache, manifest, budget or Budget())
    return out


def rapidocr_models(cache: Path | None = None) -> dict[str, Path]:
    """The three PaddleOCR models of rapidocr-onnxruntime 1.4.4, unzipped into `cache`.

    Downloads the wheel with ``pip download --no-deps`` into ``cache/wheels`` only when it
    is not there yet (nothing is installed), and extracts the ONNX files only when missing.

    Returns:
        {"rapidocr_cls", "rapidocr_det", "rapidocr_rec"} -> path of the .onnx file.

    Raises:
        RuntimeError: pip failed (no network or no such release).
    """
    cache = Path(cache or default_cache()).expanduser()
    wheels = cache / "wheels"
    wheel = wheels / _RAPIDOCR_WHEEL
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               f"rapidocr-onnxruntime=={RAPIDOCR_VERSION}", "-d", str(wheels)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"pip download of rapidocr-onnxruntime=={RAPIDOCR_VERSION} failed:\n"
                               f"{done.stderr.strip()[-2000:]}")
    out: dict[str, Path] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name, file in _RAPIDOCR_FILES.items():
            target = cache / file
            if not target.is_file():
                tmp = target.with_suffix(".onnx.part")
                tmp.write_bytes(zf.read(f"rapidocr_onnxruntime/models/{file}"))
                os.replace(tmp, target)
            out[name] = target
    manifest = load_manifest(cache)
    manifest["rapidocr"] = {name: {"file": path.name, "sha256": sha256(path), "bytes": path.stat().st_size,
                                   "source": f"{_RAPIDOCR_WHEEL}:rapidocr_onnxruntime/models/{path.name}",
                                   "preprocess": RAPIDOCR_PREPROCESS[name], **inspect_onnx(path)}
                            for name, path in out.items()}
    _save_manifest(cache, manifest)
    return out


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build the corpus and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache folder (default $EFRAP_CORPUS_CACHE or ~/.cache/efrap-onnx/corpus)")
    parser.add_argument("--only", nargs="+", choices=list(CORPUS), default=None, metavar="NAME",
                        help=f"models to build, of: {', '.join(CORPUS)}")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=12000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-rapidocr", action="store_true", help="skip the rapidocr models")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the corpus is built beside other work on a shared CPU
    cache = (args.cache or default_cache()).expanduser()
    start = time.perf_counter()
    budget = Budget(epochs=args.epochs, train_images=args.train_images, test_images=args.test_images,
                    seed=args.seed)
    entries = build_corpus(cache, args.only, budget)
    rows = [[e["name"], e["exporter"], f"{e['params'] / 1e6:.2f}M", f"{100 * e['test_accuracy_torch']:.2f}",
             f"{100 * e['test_accuracy_onnx']:.2f}", f"{e['max_abs_diff_vs_torch']:.1e}",
             f"{e['seconds']['train']:.0f}", f"{e['seconds']['export']:.1f}", str(e["batch"]),
             "x".join(str(d) for d in e["input"]["shape"]), f"{e['bytes'] / 1e6:.2f} MB"] for e in entries]
    print(_table(rows, ["model", "exporter", "params", "acc torch %", "acc onnx %", "max |d|", "train s",
                        "export s", "batch", "input", "size"]))
    if not args.no_rapidocr:
        for name, path in rapidocr_models(cache).items():
            facts = inspect_onnx(path)
            print(f"\n{name}: {path} ({path.stat().st_size / 1e6:.2f} MB), opsets {facts['opsets']}, "
                  f"IR {facts['ir_version']}, {facts['nodes']} nodes")
            for io in (*facts["inputs"], *facts["outputs"]):  # type: ignore[misc]
                print(f"  {io['name']}: {io['shape']} {io['type']}")
            print(f"  ops: {facts['op_types']}")
    print(f"\ncache: {cache}, {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
