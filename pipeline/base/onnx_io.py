"""Loading and saving ONNX models safely, and reading what a model says about itself.

Models are untrusted input: external data must stay inside the model's folder, the
graph must pass the ONNX checker, and metadata is parsed as data and validated.
Every write goes through `pipeline.base.safe_io`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.base.errors import EfrapError
from pipeline.base.safe_io import atomic_write

META_PREFIX = "efrap."

#: Element types an image input may have.
_FLOAT_INPUTS = (onnx.TensorProto.FLOAT,)


def _external_locations(model: onnx.ModelProto) -> list[tuple[str, str]]:
    out = []
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            out.append((tensor.name, location))
    return out


def _check_external_data(model: onnx.ModelProto, folder: Path, path: Path) -> list[Path]:
    root = folder.resolve()
    files = []
    for name, location in _external_locations(model):
        target = (folder / location).resolve()
        if os.path.isabs(location) or root not in target.parents:
            raise EfrapError(
                f"{path}: external data of tensor '{name}' points outside the model's "
                f"folder ({location}); refusing to read it"
            )
        if not target.is_file():
            raise EfrapError(f"{path}: external data file {location} is missing")
        files.append(target)
    return files


def _read_proto(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise EfrapError(f"{path}: no such file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise EfrapError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None


def model_files(path: str | os.PathLike[str]) -> list[Path]:
    """The model file and every external-data file it reads (all inputs of a command).

    Raises:
        EfrapError: as `load_model` for a missing, unreadable or escaping model.
    """
    path = Path(path)
    return [path, *_check_external_data(_read_proto(path), path.parent, path)]


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX model, checking it is readable, valid and self-contained.

    Raises:
        EfrapError: the file is missing, not ONNX, invalid, or its external data
            escapes the model's folder.
    """
    path = Path(path)
    model = _read_proto(path)
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


#: Largest model one protobuf file holds.
MAX_PROTO_BYTES = (2 << 30) - 1


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Save an ONNX model atomically as a single file.

    Raises:
        EfrapError: the model is larger than one protobuf file holds (2 GiB), or the
            write fails (see `atomic_write`).
    """
    size = model.ByteSize()
    if size > MAX_PROTO_BYTES:
        raise EfrapError(f"{path}: the model is {size / 2**30:.1f} GiB; a single ONNX file holds "
                         "at most 2 GiB")
    atomic_write(path, lambda tmp: onnx.save(model, tmp))


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


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The model's data inputs (graph inputs that are not initializers)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


@dataclass(frozen=True)
class ImageInput:
    """A model's single image input.

    Attributes:
        name: The input's name.
        shape: Its four dimensions, batch first; None where a dimension is dynamic.
    """

    name: str
    shape: tuple[int | None, ...]

    @property
    def batch(self) -> int | None:
        """The fixed batch size, or None for a dynamic batch."""
        return self.shape[0]

    def layout_guess(self) -> str:
        """"nhwc" when the last dimension looks like channels and the second does not."""
        _, a, _, c = self.shape
        channel_like = (1, 3, 4)
        return "nhwc" if c in channel_like and a not in channel_like else "nchw"

    def chw(self, layout: str) -> tuple[int | None, int | None, int | None]:
        """(C, H, W) of one image in `layout` ("nchw" or "nhwc")."""
        _, a, b, c = self.shape
        return (c, a, b) if layout == "nhwc" else (a, b, c)


def image_input(model: onnx.ModelProto, source: str = "model") -> ImageInput:
    """The model's single float32, rank-4 image input.

    Raises:
        EfrapError: more than one data input (the node that reads the second is named),
            an input that is not float32, or not rank 4.
    """
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        names = {i.name for i in inputs[1:]}
        reader = next((n.name for n in model.graph.node if names & set(n.input)), "?")
        raise EfrapError(f"{source}: model has {len(inputs)} data inputs (node '{reader}' reads "
                         f"'{sorted(names)[0]}'); exactly one image input is supported")
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type not in _FLOAT_INPUTS:
        name = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else "unknown"
        raise EfrapError(f"{source}: input '{inputs[0].name}' has element type {name}; an image "
                         "input must be float32")
    dims = tensor.shape.dim
    if len(dims) != 4:
        raise EfrapError(f"{source}: input '{inputs[0].name}' has rank {len(dims)}; an image input is "
                         "N x C x H x W or N x H x W x C")
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)
    return ImageInput(inputs[0].name, shape)


def input_shape(model: onnx.ModelProto, source: str = "model") -> tuple[int, ...]:
    """The static (C, H, W) of an NCHW image input (the models this project exports).

    Raises:
        EfrapError: as `image_input`, or a dimension that is not static.
    """
    c, h, w = image_input(model, source).chw("nchw")
    if c is None or h is None or w is None:
        raise EfrapError(f"{source}: model input has no static (C, H, W) shape")
    return c, h, w


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's first input is fixed to, or None when it is dynamic."""
    inputs = graph_inputs(model)
    if not inputs or not inputs[0].type.tensor_type.shape.dim:
        return None
    dim = inputs[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None


def check_logits(model: onnx.ModelProto, source: str = "model") -> None:
    """Refuse a model whose first output is not batch x classes (where the graph says so)."""
    if not model.graph.output:
        raise EfrapError(f"{source}: model has no outputs")
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if dims and len(dims) != 2:
        raise EfrapError(f"{source}: output '{model.graph.output[0].name}' has rank {len(dims)}; "
                         "a classifier's logits are batch x classes")


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """All initializers as numpy arrays, by name."""
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
