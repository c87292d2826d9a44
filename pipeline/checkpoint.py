"""Per-layer checkpoints: a killed run resumes from its last finished layer.

A run that reads data (learned rounding, rare-unit pruning) writes each finished
layer into a folder beside its output (`checkpoint_folder`: ``OUT.ckpt``): one npz
file per layer, written atomically, holding what the layers after it and the written
model depend on, so that a resumed run writes the same bytes as an uninterrupted one:

- the layer's integers and grid (`QuantizedLayer`: q, qparams, bias_q, bias_scale, stats);
- the output step size it learned, if any (it changes the activation grid of every
  later layer's input and of the written model);
- its summary (op, bits, seconds, stats, notes) for the report; seconds do not reach
  the model's metadata, and a restored layer reports the seconds it took when it ran;
- torch's global random state after the layer (the rounding methods draw from their own
  generators seeded per layer, so nothing later reads it today; restoring it keeps a
  resumed run exact should a method ever draw from it).

The folder's ``key.json`` names everything that shapes the result: the input model's
sha256, every option, the calibration inputs' sha256, the device, the thread counts,
the package versions and the source of the packages that compute the numbers. A
checkpoint whose key differs is not used (one line says which parts differ) and is
replaced. Files are data, never pickles (`np.load(allow_pickle=False)`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.base.progress import log
from pipeline.base.safe_io import NAME_MAX, PathLike, atomic_write, check_work_folder
from pipeline.qmath import QParams
from pipeline.quantized import QuantizedLayer

#: Format of the files (part of the key: another format is another checkpoint).
FORMAT = 1
KEY_FILE = "key.json"
SUFFIX = ".ckpt"
#: The packages whose source computes the output; a change to any file invalidates a checkpoint.
CODE_PACKAGES = ("pipeline", "converters", "validators")
ROOT = Path(__file__).resolve().parent.parent


def checkpoint_folder(out_path: PathLike) -> Path:
    """Where the run writing `out_path` keeps its checkpoint: ``OUT.ckpt`` beside it.

    A name too long for the file system gets a short hashed one in the same folder.
    """
    out = Path(out_path)
    name = out.name + SUFFIX
    if len(os.fsencode(name)) > NAME_MAX:
        name = f".{hashlib.sha256(os.fsencode(out.name)).hexdigest()[:16]}{SUFFIX}"
    return out.with_name(name)


def file_sha256(paths: Iterable[PathLike]) -> str:
    """One sha256 over the bytes of `paths` (a model and its external-data files), in order."""
    digest = hashlib.sha256()
    for path in paths:
        p = Path(path)
        digest.update(os.fsencode(p.name) + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def array_sha256(images: object, batch: int = 256) -> str:
    """sha256 of model-ready inputs (an array or anything sliceable with a length), batch by batch."""
    digest = hashlib.sha256()
    n = len(images)  # type: ignore[arg-type]
    for start in range(0, n, batch):
        part = np.ascontiguousarray(np.asarray(images[start : start + batch]))  # type: ignore[index]
        digest.update(f"{part.dtype.str}{part.shape}".encode())
        digest.update(part.tobytes())
    return digest.hexdigest()


def code_sha256() -> str:
    """sha256 of the Python source of the packages that compute the output."""
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def check_folder(folder: PathLike, inputs: Iterable[PathLike | None]) -> Path:
    """Refuse a checkpoint folder that is, holds or lies inside an input, or is something else
    (`check_work_folder`, marked by its key file)."""
    return check_work_folder(folder, inputs, KEY_FILE, "checkpoint")


def _canonical(value: object) -> object:
    """`value` as JSON reads it back (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@dataclass
class LayerRecord:
    """What one finished layer leaves for the rest of the run.

    Attributes:
        layer: Its node name.
        quantized: Its integers, grid, int32 bias and stats.
        output_scale: The output step size it learned (as `_set_output_scale` took it), or None.
        summary: Its summary fields: op, bits, seconds, stats, notes.
        rng: torch's global random state after it ("cpu", and "cuda" on a GPU).
    """

    layer: str
    quantized: QuantizedLayer
    output_scale: float | None
    summary: dict[str, object]
    rng: dict[str, np.ndarray] = field(default_factory=dict)


def rng_state(device: torch.device) -> dict[str, np.ndarray]:
    """torch's global random state now (CPU, and the device's on CUDA)."""
    out = {"cpu": torch.get_rng_state().numpy().copy()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device).numpy().copy()
    return out


def set_rng_state(state: Mapping[str, np.ndarray], device: torch.device) -> None:
    """Put torch's global random state back to what `rng_state` returned."""
    torch.set_rng_state(torch.from_numpy(np.array(state["cpu"], np.uint8)))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.from_numpy(np.array(state["cuda"], np.uint8)), device)


def _qparams_arrays(prefix: str, qp: QParams) -> dict[str, np.ndarray]:
    return {f"{prefix}scale": np.asarray(qp.scale), f"{prefix}zero_point": np.asarray(qp.zero_point),
            f"{prefix}range": np.asarray([qp.qmin, qp.qmax], np.int64),
            f"{prefix}axis": np.asarray(-1 if qp.axis is None else qp.axis, np.int64)}


def _qparams_from(prefix: str, arrays: Mapping[str, np.ndarray]) -> QParams:
    qmin, qmax = (int(v) for v in arrays[f"{prefix}range"])
    axis = int(arrays[f"{prefix}axis"])
    return QParams(scale=arrays[f"{prefix}scale"], zero_point=arrays[f"{prefix}zero_point"],
                   qmin=qmin, qmax=qmax, axis=None if axis < 0 else axis)


class LayerStore:
    """The checkpoint folder of one run (see the module docstring).

    Args:
        folder: The folder (checked with `check_folder` first).
        key: Everything that shapes the result (JSON-ready).
    """

    def __init__(self, folder: PathLike, key: Mapping[str, object]) -> None:
        self.folder = Path(folder)
        self.key = _canonical({"format": FORMAT, **key})
        self.restored = 0
        stored = self._stored_key()
        if stored is not None and stored != self.key:
            assert isinstance(self.key, dict)
            differs = sorted(k for k in set(stored) | set(self.key) if stored.get(k) != self.key.get(k))
            log(f"checkpoint {self.folder}: made by a run with other settings ({', '.join(differs)} "
                "differ); not used, starting afresh")
            self._clear()
        self.folder.mkdir(exist_ok=True)
        if stored != self.key:
            text = json.dumps(self.key, indent=1, sort_keys=True) + "\n"
            atomic_write(self.folder / KEY_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def _stored_key(self) -> dict | None:
        path = self.folder / KEY_FILE
        if not path.is_file():
            return None
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _layer_files(self) -> list[Path]:
        return sorted(self.folder.glob("layer-*.npz")) if self.folder.is_dir() else []

    def _clear(self) -> None:
        for path in [*self._layer_files(), self.folder / KEY_FILE]:
            path.unlink(missing_ok=True)

    def stored(self) -> int:
        """How many layer files the folder holds."""
        return len(self._layer_files())

    def _path(self, index: int) -> Path:
        return self.folder / f"layer-{index:05d}.npz"

    def save(self, index: int, record: LayerRecord) -> None:
        """Write layer `index` (1-based) atomically: a killed write leaves no file."""
        ql = record.quantized
        meta = {"layer": record.layer, "summary": record.summary,
                "output_scale": record.output_scale, "stats": ql.stats,
                "bias": ql.bias_q is not None}
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8),
            "q": np.asarray(ql.q), **_qparams_arrays("w_", ql.qparams),
            **{f"rng_{k}": v for k, v in record.rng.items()},
        }
        if ql.bias_q is not None and ql.bias_scale is not None:
            arrays["bias_q"] = np.asarray(ql.bias_q)
            arrays["bias_scale"] = np.asarray(ql.bias_scale)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())

        atomic_write(self._path(index), write)

    def load(self, index: int, layer: str) -> LayerRecord | None:
        """Layer `index` as a finished run stored it (None: not there, or not readable)."""
        path = self._path(index)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            meta = json.loads(arrays["meta"].tobytes().decode())
            if meta["layer"] != layer:
                return None
            ql = QuantizedLayer(q=arrays["q"], qparams=_qparams_from("w_", arrays),
                                bias_q=arrays["bias_q"] if meta["bias"] else None,
                                bias_scale=arrays["bias_scale"] if meta["bias"] else None,
                                stats={k: float(v) for k, v in meta["stats"].items()})
            rng = {k[len("rng_"):]: v for k, v in arrays.items() if k.startswith("rng_")}
            scale = meta["output_scale"]
            return LayerRecord(layer, ql, None if scale is None else float(scale), meta["summary"], rng)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # A file this program did not finish writing cannot exist (atomic writes); one
            # that does not read is damaged: compute the layer again.
            log(f"checkpoint {path}: unreadable ({type(exc).__name__}); computing the layer again")
            return None

    def remove(self) -> None:
        """Delete the checkpoint (after the output was written): see `remove_folder`."""
        remove_folder(self.folder)


def remove_folder(folder: PathLike) -> None:
    """Delete a checkpoint folder's own files, then the folder if nothing else is in it."""
    path = Path(folder)
    if path.is_symlink() or not (path / KEY_FILE).is_file():
        return  # not a checkpoint (or none): never delete what this program did not write
    for file in [*sorted(path.glob("layer-*.npz")), path / KEY_FILE]:
        file.unlink(missing_ok=True)
    # Something else was put there: leave the folder.
    with contextlib.suppress(OSError):
        path.rmdir()
