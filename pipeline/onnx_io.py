"""Loading and saving ONNX models safely.

Models are untrusted input: external data must stay inside the model's folder,
and every write goes to a temporary file that is renamed into place, so a failed
run never leaves a partial output or touches its input.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.errors import EfrapError

META_PREFIX = "efrap."


def _check_external_data(model: onnx.ModelProto, folder: Path, path: Path) -> None:
    root = folder.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if os.path.isabs(location) or (root not in target.parents and target != root):
            raise EfrapError(
                f"{path}: external data of tensor '{tensor.name}' points outside the model's "
                f"folder ({location}); refusing to read it"
            )
        if not target.is_file():
            raise EfrapError(f"{path}: external data file {location} is missing")


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX model, checking it is readable, valid and self-contained.

    Raises:
        EfrapError: the file is missing, not ONNX, invalid, or its external data
            escapes the model's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise EfrapError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise EfrapError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if not model.graph.node:
        raise EfrapError(f"{path}: not a readable ONNX model (the graph has no nodes)")
    _check_external_data(model, path.parent, path)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EfrapError(f"{path}: invalid ONNX model ({msg})") from None
    return model


def check_not_same_path(inp: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Refuse to overwrite an input file with an output."""
    if Path(inp).resolve() == Path(out).resolve():
        raise EfrapError(f"{out}: output path equals the input path; choose another output")


def atomic_write(path: str | os.PathLike[str], writer: Callable[[str], None]) -> None:
    """Call `writer(tmp_path)` and rename the temporary file to `path` on success."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise EfrapError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        writer(tmp)
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Save an ONNX model atomically as a single file."""
    atomic_write(path, lambda tmp: onnx.save(model, tmp))


def write_json(data: object, path: str | os.PathLike[str]) -> None:
    """Write JSON atomically, with sorted keys for stable bytes."""

    def _write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")

    atomic_write(path, _write)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The model's metadata_props as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def set_metadata(model: onnx.ModelProto, values: dict[str, object]) -> None:
    """Set metadata_props (non-strings are stored as sorted JSON), keeping others."""
    current = get_metadata(model)
    for key, value in values.items():
        current[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    del model.metadata_props[:]
    for key in sorted(current):
        model.metadata_props.add(key=key, value=current[key])


def get_normalization(model: onnx.ModelProto) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) the model's input expects, from its metadata.

    Models without the entry get mean 0 and std 1 for every input channel.
    """
    meta = get_metadata(model)
    raw = meta.get(META_PREFIX + "normalization")
    channels = input_shape(model)[0]
    if raw is None:
        return [0.0] * channels, [1.0] * channels
    try:
        spec = json.loads(raw)
        mean = [float(v) for v in spec["mean"]]
        std = [float(v) for v in spec["std"]]
    except (ValueError, KeyError, TypeError):
        raise EfrapError("model metadata 'efrap.normalization' is not valid JSON") from None
    return mean, std


def input_shape(model: onnx.ModelProto) -> tuple[int, ...]:
    """The (C, H, W) shape of the model's single image input (batch dimension dropped)."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise EfrapError(f"model has {len(inputs)} inputs; exactly one image input is supported")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value for d in dims[1:])
    if not shape or any(v <= 0 for v in shape):
        raise EfrapError("model input has no static (C, H, W) shape")
    return shape


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """All initializers as numpy arrays, by name."""
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
