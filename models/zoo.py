"""The stored model zoo: small models shipped with the package, listed in manifest.json.

Each entry names its file and sha256, the data set and input it expects, whether it
is clean or a quantization-conditioned backdoor (QCB), the command that rebuilds it
and the figures measured on it. Exactly one entry is the demo's default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from pipeline.base.errors import EfrapError
from pipeline.base.safe_io import file_sha256

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
MANIFEST = ZOO_DIR / "manifest.json"


@dataclass(frozen=True)
class ZooEntry:
    """One stored model.

    Attributes:
        name: Unique name.
        file: ONNX file name inside the zoo folder.
        sha256: Hex digest of the file.
        architecture: Architecture name (models.architectures).
        dataset: Data spec it was trained on.
        input_shape: (C, H, W).
        normalization: {"mean": [...], "std": [...]}.
        kind: "clean" or "qcb".
        default: Whether `efrap demo` uses it.
        rebuild: The command that rebuilds it.
        build_time_s: Measured build time.
        fp_metrics: FP figures measured in onnxruntime.
        attack: QCB attack name.
        scheme: Scheme the QCB targets.
        trigger: Trigger file name inside the zoo folder.
        target: Target label of the backdoor.
        carrier: What a QCB's backdoor rides on (`efrap attack --carrier`).
        inflate: The grid inflation factor it was built with (`efrap attack --inflate`).
        extra: Any further fields of the entry.
    """

    name: str
    file: str
    sha256: str
    architecture: str
    dataset: str
    input_shape: tuple[int, ...]
    normalization: dict
    kind: str
    default: bool = False
    rebuild: str = ""
    build_time_s: float | None = None
    fp_metrics: dict = field(default_factory=dict)
    attack: str | None = None
    scheme: str | None = None
    trigger: str | None = None
    target: int | None = None
    carrier: str | None = None
    inflate: float | None = None
    extra: dict = field(default_factory=dict)


def load_manifest(path: Path = MANIFEST) -> list[ZooEntry]:
    """All entries of the manifest."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EfrapError(f"{path}: cannot read the zoo manifest ({exc})") from None
    names = {f.name for f in fields(ZooEntry)} - {"extra"}
    entries = []
    for raw in data.get("models", []):
        known = {k: v for k, v in raw.items() if k in names}
        known["input_shape"] = tuple(known.get("input_shape", ()))
        entries.append(ZooEntry(**known, extra={k: v for k, v in raw.items() if k not in names}))
    return entries


def zoo_path(entry: ZooEntry) -> Path:
    """Path of an entry's ONNX file."""
    return ZOO_DIR / entry.file


def trigger_path(entry: ZooEntry) -> Path:
    """Path of a QCB entry's trigger file."""
    if not entry.trigger:
        raise EfrapError(f"zoo entry {entry.name} has no trigger")
    return ZOO_DIR / entry.trigger


def default_entry() -> ZooEntry:
    """The demo's model."""
    defaults = [e for e in load_manifest() if e.default]
    if len(defaults) != 1:
        raise EfrapError(f"{MANIFEST}: expected exactly one default entry, found {len(defaults)}")
    return defaults[0]


def verify_sha(entry: ZooEntry) -> bool:
    """Whether the stored file's sha256 matches the manifest."""
    return file_sha256(zoo_path(entry)) == entry.sha256
