"""Seeded training of clean classifiers, and safe checkpoints."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.architectures import build_model
from pipeline.base import checks
from pipeline.base.data import Dataset, normalize
from pipeline.base.errors import EfrapError
from pipeline.base.preprocess import Preprocess, checked, from_table
from pipeline.base.progress import Progress
from pipeline.base.safe_io import write_bytes

#: Largest seed torch takes (its generators hold a 64-bit seed; 63 bits keep it signed).
MAX_SEED = 2**63 - 1


def seed_everything(seed: int) -> None:
    """Seed torch and make CPU kernels deterministic where it is cheap."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Pad by `pad` pixels (zeros) and crop back at a random offset per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, x.shape[1], h, w)
    return cropped.gather(3, cols)


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy of a torch model on preprocessed images."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out = model(torch.from_numpy(images[i : i + batch_size]))
            correct += int((out.argmax(1).numpy() == labels[i : i + batch_size]).sum())
    return correct / max(1, len(labels))


def train_classifier(model: nn.Module, train: Dataset, test: Dataset, mean: list[float],
                     std: list[float], *, epochs: int, seed: int, batch_size: int = 128,
                     lr: float = 0.05, weight_decay: float = 5e-4, crop_pad: int = 2) -> float:
    """Train with SGD (Nesterov momentum, one-cycle schedule); returns test accuracy.

    Args:
        model: The network (trained in place).
        train: Training split.
        test: Test split (evaluated once per epoch).
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.
        epochs: Passes over the training split.
        seed: Seeds initialisation order, shuffling and augmentation.
        batch_size: Images per step.
        lr: Peak learning rate.
        weight_decay: L2 penalty.
        crop_pad: Random-crop padding in pixels (0 disables augmentation).
    """
    checks.integer(epochs, "epochs", low=1)
    checks.integer(seed, "seed", low=0, high=MAX_SEED)
    checks.integer(batch_size, "batch size", low=1)
    checks.finite(lr, "learning rate", low=0.0, low_open=True)
    checks.finite(weight_decay, "weight decay", low=0.0)
    checks.integer(crop_pad, "crop padding", low=0)
    seed_everything(seed)
    x_train = normalize(train.images, mean, std)
    x_test = normalize(test.images, mean, std)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    acc = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=gen).numpy()
        bar = Progress(f"train epoch {epoch}/{epochs}", total=len(order))
        total, seen = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = torch.from_numpy(x_train[idx])
            if crop_pad:
                x = random_crop(x, crop_pad, gen)
            y = torch.from_numpy(train.labels[idx])
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            bar.update(len(idx), f"loss {total / seen:.4f}")
        acc = evaluate(model, x_test, test.labels)
        bar.close(f"loss {total / seen:.4f}, test accuracy {100 * acc:.2f}%")
    return acc


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict) -> None:
    """Write {"state_dict", "meta"} atomically; loadable with weights_only=True."""
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "meta": meta}, buf)
    write_bytes(path, buf.getvalue())


def _checked_meta(meta: object, source: str) -> dict:
    """A checkpoint's meta with the fields export needs, types and ranges checked."""
    raw = checks.table(meta, f"{source}: meta")
    for key in ("arch", "in_channels", "num_classes", "image_size", "normalization"):
        if key not in raw:
            raise EfrapError(f"{source}: checkpoint meta has no '{key}'")
    checks.string(raw["arch"], f"{source}: meta arch")
    channels = checks.integer(raw["in_channels"], f"{source}: meta in_channels", low=1)
    checks.integer(raw["num_classes"], f"{source}: meta num_classes", low=2)
    checks.integer(raw["image_size"], f"{source}: meta image_size", low=1)
    checks.finite(raw.get("width", 1.0), f"{source}: meta width", low=0.0, low_open=True)
    norm = checks.table(raw["normalization"], f"{source}: meta normalization", {"mean", "std"})
    fields = from_table({"mean": norm.get("mean"), "std": norm.get("std")}, f"{source}: meta")
    checked(Preprocess(fields["mean"], fields["std"]), channels, f"{source}: meta")
    return dict(raw)


def _torch_load(path: Path, what: str) -> object:
    """`torch.load(weights_only=True)` of an untrusted file; any failure is one EfrapError."""
    if not path.is_file():
        raise EfrapError(f"{path}: no such {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or hostile file
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EfrapError(f"{path}: not a readable torch {what} ({msg})") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict a weights checkpoint holds (a bare state_dict or {"state_dict": ...}).

    For `efrap attack --init`: read and checked before any data is loaded or any
    training starts. Whether it fits the architecture is checked when it is loaded.

    Raises:
        EfrapError: missing, not a torch file, hostile (weights_only refuses code), or
            not a mapping of names to tensors.
    """
    path = Path(path)
    data = _torch_load(path, "checkpoint")
    if isinstance(data, dict) and "state_dict" in data:
        data = data["state_dict"]
    if not isinstance(data, dict) or not data or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise EfrapError(f"{path}: not a state_dict checkpoint (expected a mapping of parameter "
                         "names to tensors, or {'state_dict': ...})")
    return data


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint (never unpickling code: weights_only=True)."""
    path = Path(path)
    data = _torch_load(path, "checkpoint")
    if not isinstance(data, dict) or "state_dict" not in data or "meta" not in data:
        raise EfrapError(f"{path}: not an efrap checkpoint (expected 'state_dict' and 'meta')")
    meta = _checked_meta(data["meta"], str(path))
    model = build_model(meta["arch"], meta["in_channels"], meta["num_classes"], meta.get("width", 1.0),
                        meta["image_size"])
    try:
        model.load_state_dict(data["state_dict"])
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EfrapError(f"{path}: weights do not fit the architecture ({msg})") from None
    return model.eval(), meta
