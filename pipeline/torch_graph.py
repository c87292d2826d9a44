"""Run an ONNX graph in PyTorch, optionally with quantization applied.

This is the pipeline's simulation of a deployed model. It serves three purposes:
the parity reference (the same quantized network onnxruntime runs), the source of
each layer's cached inputs during reconstruction, and the differentiable forward
pass of the layer being optimized. Quantization is expressed as overrides:

- `weights`: initializer name -> tensor (e.g. dequantized integer weights);
- `act_quant`: tensor name -> QParams, fake-quantized as soon as the tensor exists.

QuantizeLinear/DequantizeLinear nodes are executed with the same arithmetic, so
a QDQ model runs here too. Only ops that CNN classifiers use are implemented; an
unsupported op is reported by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from pipeline.base.errors import EfrapError, NotSupported
from pipeline.prepare import prepare_model
from pipeline.qmath import QParams, fake_quant_qp, quantize
from validators.verify import Reference

Tensor = torch.Tensor
_OPS: dict[str, Callable[..., list[Tensor]]] = {}


def _op(name: str) -> Callable[[Callable[..., list[Tensor]]], Callable[..., list[Tensor]]]:
    def deco(fn: Callable[..., list[Tensor]]) -> Callable[..., list[Tensor]]:
        _OPS[name] = fn
        return fn

    return deco


def _auto_pads(attrs: dict, x: Tensor, kernel: list[int]) -> list[int]:
    """Explicit pads (begin..., end...) for a node's auto_pad setting on input `x`."""
    mode = attrs.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    spatial = len(kernel)
    if mode in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * 2 * spatial))
    if mode == "VALID":
        return [0] * 2 * spatial
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    begin, end = [], []
    for size, k, st, d in zip(x.shape[2:], kernel, strides, dilations, strict=True):
        total = max((-(-size // st) - 1) * st + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(large if mode == "SAME_LOWER" else small)
        end.append(small if mode == "SAME_LOWER" else large)
    return begin + end


def _pad_input(x: Tensor, pads: list[int], spatial: int, value: float = 0.0) -> tuple[Tensor, list[int]]:
    if not pads:
        return x, [0] * spatial
    begin, end = pads[:spatial], pads[spatial:]
    if begin == end:
        return x, begin
    torch_pads: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        torch_pads += [b, e]
    return F.pad(x, torch_pads, value=value), [0] * spatial


@_op("Conv")
def _conv(x: Tensor, w: Tensor, b: Tensor | None = None, *, attrs: dict) -> list[Tensor]:
    spatial = w.dim() - 2
    x, pad = _pad_input(x, _auto_pads(attrs, x, list(w.shape[2:])), spatial)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return [conv(x, w, b, stride=attrs.get("strides", 1), padding=pad,
                 dilation=attrs.get("dilations", 1), groups=attrs.get("group", 1))]


@_op("Gemm")
def _gemm(a: Tensor, b: Tensor, c: Tensor | None = None, *, attrs: dict) -> list[Tensor]:
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    y = attrs.get("alpha", 1.0) * (a @ b)
    if c is not None:
        y = y + attrs.get("beta", 1.0) * c
    return [y]


@_op("MatMul")
def _matmul(a: Tensor, b: Tensor, *, attrs: dict) -> list[Tensor]:
    return [torch.matmul(a, b)]


def _div(a: Tensor, b: Tensor) -> Tensor:
    # ONNX divides integers with truncation (shape arithmetic); torch.div would give floats.
    if not (a.dtype.is_floating_point or b.dtype.is_floating_point):
        return torch.div(a, b, rounding_mode="trunc")
    return torch.div(a, b)


for _name, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div}.items():
    _OPS[_name] = lambda a, b, *, attrs, _fn=_fn: [_fn(a, b)]


@_op("Relu")
def _relu(x: Tensor, *, attrs: dict) -> list[Tensor]:
    return [F.relu(x)]


class _ReluLeakyGrad(torch.autograd.Function):
    """ReLU forward; backward passes `slope` times the gradient where the input is negative."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, slope: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.slope = slope
        return F.relu(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return torch.where(x > 0, grad, grad * ctx.slope), None


@_op("Clip")
def _clip(x: Tensor, lo: Tensor | None = None, hi: Tensor | None = None, *, attrs: dict) -> list[Tensor]:
    return [torch.clamp(x, None if lo is None else lo.item(), None if hi is None else hi.item())]


@_op("Sigmoid")
def _sigmoid(x: Tensor, *, attrs: dict) -> list[Tensor]:
    return [torch.sigmoid(x)]


@_op("Softmax")
def _softmax(x: Tensor, *, attrs: dict) -> list[Tensor]:
    return [torch.softmax(x, dim=attrs.get("axis", -1))]


@_op("MaxPool")
def _maxpool(x: Tensor, *, attrs: dict) -> list[Tensor]:
    k = attrs["kernel_shape"]
    x, pad = _pad_input(x, _auto_pads(attrs, x, list(k)), len(k), value=float("-inf"))
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(k)]
    return [pool(x, k, stride=attrs.get("strides", k), padding=pad,
                 dilation=attrs.get("dilations", 1), ceil_mode=bool(attrs.get("ceil_mode", 0)))]


@_op("AveragePool")
def _avgpool(x: Tensor, *, attrs: dict) -> list[Tensor]:
    k = attrs["kernel_shape"]
    include = bool(attrs.get("count_include_pad", 0))
    x, pad = _pad_input(x, _auto_pads(attrs, x, list(k)), len(k))
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(k)]
    return [pool(x, k, stride=attrs.get("strides", k), padding=pad,
                 ceil_mode=bool(attrs.get("ceil_mode", 0)), count_include_pad=include)]


@_op("GlobalAveragePool")
def _gap(x: Tensor, *, attrs: dict) -> list[Tensor]:
    return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]


@_op("Flatten")
def _flatten(x: Tensor, *, attrs: dict) -> list[Tensor]:
    axis = attrs.get("axis", 1)
    return [x.reshape(int(np.prod(x.shape[:axis])), -1)]


@_op("Reshape")
def _reshape(x: Tensor, shape: Tensor, *, attrs: dict) -> list[Tensor]:
    dims = [int(v) for v in shape.tolist()]
    if not attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return [x.reshape(dims)]


@_op("Transpose")
def _transpose(x: Tensor, *, attrs: dict) -> list[Tensor]:
    perm = attrs.get("perm", list(reversed(range(x.dim()))))
    return [x.permute(*perm)]


@_op("Concat")
def _concat(*xs: Tensor, attrs: dict) -> list[Tensor]:
    return [torch.cat(xs, dim=attrs["axis"])]


@_op("Identity")
def _identity(x: Tensor, *, attrs: dict) -> list[Tensor]:
    return [x]


@_op("Dropout")
def _dropout(x: Tensor, *rest: Tensor, attrs: dict) -> list[Tensor]:
    return [x]


@_op("Shape")
def _shape(x: Tensor, *, attrs: dict) -> list[Tensor]:
    return [torch.tensor(list(x.shape), dtype=torch.int64)]


@_op("Gather")
def _gather(x: Tensor, idx: Tensor, *, attrs: dict) -> list[Tensor]:
    return [torch.index_select(x, attrs.get("axis", 0), idx.reshape(-1).long()).reshape(
        *x.shape[: attrs.get("axis", 0)], *idx.shape, *x.shape[attrs.get("axis", 0) + 1 :])]


@_op("Unsqueeze")
def _unsqueeze(x: Tensor, axes: Tensor, *, attrs: dict) -> list[Tensor]:
    for a in sorted(int(v) for v in axes.tolist()):
        x = x.unsqueeze(a if a >= 0 else a + x.dim() + 1)
    return [x]


@_op("Squeeze")
def _squeeze(x: Tensor, axes: Tensor | None = None, *, attrs: dict) -> list[Tensor]:
    if axes is None:
        return [x.squeeze()]
    for a in sorted((int(v) for v in axes.tolist()), reverse=True):
        x = x.squeeze(a)
    return [x]


@_op("BatchNormalization")
def _bn(x: Tensor, g: Tensor, b: Tensor, mean: Tensor, var: Tensor, *, attrs: dict) -> list[Tensor]:
    return [F.batch_norm(x, mean, var, g, b, False, 0.0, attrs.get("epsilon", 1e-5))]


_UNARY = {
    "HardSwish": F.hardswish, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
    "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs, "Erf": torch.erf,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil,
}
for _name, _fn in _UNARY.items():
    _OPS[_name] = lambda x, *, attrs, _fn=_fn: [_fn(x)]
_OPS["Pow"] = lambda a, b, *, attrs: [torch.pow(a, b)]
_OPS["Max"] = lambda *xs, attrs: [torch.stack(torch.broadcast_tensors(*xs)).amax(0)]
_OPS["Min"] = lambda *xs, attrs: [torch.stack(torch.broadcast_tensors(*xs)).amin(0)]
_OPS["Equal"] = lambda a, b, *, attrs: [torch.eq(a, b)]
_OPS["Where"] = lambda c, a, b, *, attrs: [torch.where(c.bool(), a, b)]


@_op("HardSigmoid")
def _hardsigmoid(x: Tensor, *, attrs: dict) -> list[Tensor]:
    return [torch.clamp(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0.0, 1.0)]


@_op("LeakyRelu")
def _leaky(x: Tensor, *, attrs: dict) -> list[Tensor]:
    return [F.leaky_relu(x, attrs.get("alpha", 0.01))]


@_op("Gelu")
def _gelu(x: Tensor, *, attrs: dict) -> list[Tensor]:
    approx = attrs.get("approximate", b"none")
    return [F.gelu(x, approximate=approx.decode() if isinstance(approx, bytes) else approx)]


@_op("LayerNormalization")
def _layernorm(x: Tensor, scale: Tensor, bias: Tensor | None = None, *, attrs: dict) -> list[Tensor]:
    axis = attrs.get("axis", -1) % x.dim()
    return [F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, attrs.get("epsilon", 1e-5))]


def _axes(x: Tensor, axes: Tensor | None, attrs: dict) -> list[int]:
    listed = attrs.get("axes") if axes is None else [int(v) for v in axes.tolist()]
    return list(range(x.dim())) if not listed else [a % x.dim() for a in listed]


@_op("ReduceMean")
def _reduce_mean(x: Tensor, axes: Tensor | None = None, *, attrs: dict) -> list[Tensor]:
    return [x.mean(dim=_axes(x, axes, attrs), keepdim=bool(attrs.get("keepdims", 1)))]


@_op("ReduceSum")
def _reduce_sum(x: Tensor, axes: Tensor | None = None, *, attrs: dict) -> list[Tensor]:
    return [x.sum(dim=_axes(x, axes, attrs), keepdim=bool(attrs.get("keepdims", 1)))]


@_op("GlobalMaxPool")
def _global_max(x: Tensor, *, attrs: dict) -> list[Tensor]:
    return [x.amax(dim=tuple(range(2, x.dim())), keepdim=True)]


@_op("Slice")
def _slice(x: Tensor, starts: Tensor, ends: Tensor, axes: Tensor | None = None,
           steps: Tensor | None = None, *, attrs: dict) -> list[Tensor]:
    axes_l = list(range(len(starts))) if axes is None else [int(a) % x.dim() for a in axes.tolist()]
    steps_l = [1] * len(axes_l) if steps is None else [int(v) for v in steps.tolist()]
    index: list[slice] = [slice(None)] * x.dim()
    for a, st, en, step in zip(axes_l, starts.tolist(), ends.tolist(), steps_l, strict=True):
        if step < 0:
            raise NotSupported("the PyTorch simulation does not cover Slice with negative steps")
        size = x.shape[a]
        st = max(0, min(size, st + size if st < 0 else st))
        en = max(0, min(size, en + size if en < 0 else en))
        index[a] = slice(st, en, step)
    return [x[tuple(index)]]


@_op("Split")
def _split(x: Tensor, split: Tensor | None = None, *, attrs: dict) -> list[Tensor]:
    axis = attrs.get("axis", 0) % x.dim()
    if split is not None:
        return list(torch.split(x, [int(v) for v in split.tolist()], dim=axis))
    parts = attrs.get("num_outputs")
    return list(torch.tensor_split(x, parts, dim=axis)) if parts else [x]


_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.DOUBLE: torch.float64, onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT8: torch.int8,
}


@_op("Cast")
def _cast(x: Tensor, *, attrs: dict) -> list[Tensor]:
    to = attrs["to"]
    if to not in _DTYPES:
        raise NotSupported(f"the PyTorch simulation does not cover Cast to type {to}")
    return [x.to(_DTYPES[to])]


@_op("Expand")
def _expand(x: Tensor, shape: Tensor, *, attrs: dict) -> list[Tensor]:
    ones = torch.ones([int(v) for v in shape.tolist()], dtype=x.dtype, device=x.device)
    return [x * ones if x.dtype.is_floating_point else (x + ones * 0)]


@_op("ConstantOfShape")
def _constant_of_shape(shape: Tensor, *, attrs: dict) -> list[Tensor]:
    value = attrs.get("value")
    fill = numpy_helper.to_array(value).reshape(-1)[0].item() if value is not None else 0.0
    dtype = torch.float32 if isinstance(fill, float) else torch.int64
    return [torch.full([int(v) for v in shape.tolist()], fill, dtype=dtype, device=shape.device)]


@_op("Pad")
def _pad(x: Tensor, pads: Tensor, value: Tensor | None = None, axes: Tensor | None = None, *,
         attrs: dict) -> list[Tensor]:
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    p = [int(v) for v in pads.tolist()]
    dims = list(range(x.dim())) if axes is None else [int(a) % x.dim() for a in axes.tolist()]
    half = len(p) // 2
    full = [0] * (2 * x.dim())
    for i, d in enumerate(dims):
        full[d], full[x.dim() + d] = p[i], p[half + i]
    torch_pads: list[int] = []
    for d in reversed(range(x.dim())):
        torch_pads += [full[d], full[x.dim() + d]]
    if mode != "constant":
        raise NotSupported(f"the PyTorch simulation does not cover Pad mode '{mode}'")
    fill = 0.0 if value is None or value.numel() == 0 else float(value.reshape(-1)[0])
    return [F.pad(x, torch_pads, value=fill)]


@_op("Resize")
def _resize(x: Tensor, roi: Tensor | None = None, scales: Tensor | None = None,
            sizes: Tensor | None = None, *, attrs: dict) -> list[Tensor]:
    mode = attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "nearest" or (scales is None or scales.numel() == 0):
        raise NotSupported(f"the PyTorch simulation does not cover Resize mode '{mode}' with sizes")
    factors = [float(v) for v in scales.tolist()[2:]]
    return [F.interpolate(x, scale_factor=factors, mode="nearest")]


def _qparams_tensors(x: Tensor, scale: Tensor, zp: Tensor | None, axis: int) -> tuple[Tensor, Tensor]:
    zp_t = torch.zeros_like(scale) if zp is None else zp.to(torch.float32)
    if scale.dim() == 1 and x.dim() > 1:
        shape = [1] * x.dim()
        shape[axis] = -1
        return scale.reshape(shape), zp_t.reshape(shape)
    return scale, zp_t


@_op("QuantizeLinear")
def _quantize(x: Tensor, scale: Tensor, zp: Tensor | None = None, *, attrs: dict,
              qrange: tuple[int, int]) -> list[Tensor]:
    s, z = _qparams_tensors(x, scale, zp, attrs.get("axis", 1))
    return [quantize(x, s, z, *qrange)]


@_op("DequantizeLinear")
def _dequantize(q: Tensor, scale: Tensor, zp: Tensor | None = None, *, attrs: dict) -> list[Tensor]:
    s, z = _qparams_tensors(q, scale, zp, attrs.get("axis", 1))
    return [(q.to(torch.float32) - z) * s]


_QRANGE = {
    onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT4: (0, 15), onnx.TensorProto.INT4: (-8, 7),
    onnx.TensorProto.UINT16: (0, 65535), onnx.TensorProto.INT16: (-32768, 32767),
}


def initializer_to_torch(init: onnx.TensorProto) -> Tensor:
    """An initializer as a torch tensor (integers widened, float kept float32)."""
    arr = numpy_helper.to_array(init)
    if arr.dtype in (ml_dtypes.int4, ml_dtypes.uint4) or arr.dtype.kind in "iu":
        arr = arr.astype(np.int64)
    elif arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    # np.array keeps 0-d arrays 0-d (a scalar Gather index must drop its axis).
    return torch.from_numpy(np.array(arr, order="C"))


class TorchGraph:
    """An ONNX graph executed with PyTorch ops.

    Args:
        model: A model prepared with pipeline.graph.prepare_model (or any model whose
            nodes are all named and whose constants are initializers).
        device: Where tensors live.
        relu_slope: Gradient a Relu passes below zero, times the incoming gradient (0: the
            true gradient). The forward pass is unchanged; a positive slope is a
            backward-pass surrogate for searches that must reach units no input has
            switched on yet (the scan's trigger search).
    """

    def __init__(self, model: onnx.ModelProto, device: torch.device | str = "cpu",
                 relu_slope: float = 0.0) -> None:
        self.device = torch.device(device)
        self.relu_slope = relu_slope
        graph = model.graph
        self.nodes = list(graph.node)
        for node in self.nodes:
            if node.op_type not in _OPS:
                raise NotSupported(f"the PyTorch simulation does not cover op '{node.op_type}' "
                                   f"(node '{node.name}')")
        self.initializers = {i.name: initializer_to_torch(i).to(self.device) for i in graph.initializer}
        self.init_types = {i.name: i.data_type for i in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.outputs = [o.name for o in graph.output]
        self.attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in self.nodes]
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output}
        self._qranges: dict[int, tuple[int, int]] = {}
        self._plans: dict[tuple[tuple[str, ...], frozenset[str]], list[int]] = {}
        for i, node in enumerate(self.nodes):
            if node.op_type == "QuantizeLinear":
                zp = node.input[2] if len(node.input) > 2 else ""
                dtype = self.init_types.get(zp, onnx.TensorProto.UINT8)
                dtype = self.attrs[i].get("output_dtype", 0) or dtype
                self._qranges[i] = _QRANGE[dtype]

    def _needed(self, outputs: Iterable[str], available: set[str]) -> list[int]:
        key = (tuple(outputs), frozenset(available))
        if key not in self._plans:
            self._plans[key] = self._walk(key[0], available)
        return self._plans[key]

    def _walk(self, outputs: Iterable[str], available: set[str]) -> list[int]:
        needed: set[int] = set()
        stack = [o for o in outputs if o not in available]
        while stack:
            name = stack.pop()
            if name in available or name in self.initializers:
                continue
            if name not in self.producer:
                raise EfrapError(f"tensor '{name}' cannot be computed from the given inputs")
            idx = self.producer[name]
            if idx in needed:
                continue
            needed.add(idx)
            stack.extend(i for i in self.nodes[idx].input if i)
        return sorted(needed)

    def run(
        self,
        feeds: Mapping[str, Tensor],
        outputs: Iterable[str] | None = None,
        weights: Mapping[str, Tensor] | None = None,
        act_quant: Mapping[str, QParams] | None = None,
        footprint: dict[str, int] | None = None,
    ) -> dict[str, Tensor]:
        """Compute `outputs` (default: the graph outputs) from `feeds`.

        Args:
            feeds: Tensor name -> value; graph inputs or any intermediate tensors.
            outputs: Names to return.
            weights: Initializer overrides.
            act_quant: Tensors to fake-quantize as soon as they exist (feeds included;
                re-quantizing an already quantized tensor is an exact identity).
            footprint: When given, filled with "live" (the most values alive at once) and
                "total" (every value computed: what a backward pass keeps), so that
                callers can size their batches by the model's activations, not its input.
        """
        outputs = list(outputs or self.outputs)
        act_quant = act_quant or {}
        values: dict[str, Tensor] = {}
        for name, value in feeds.items():
            values[name] = fake_quant_qp(value, act_quant[name]) if name in act_quant else value
        order = self._needed(outputs, set(values))
        # Each tensor is dropped after its last reader: a forward without gradients then
        # holds only the live tensors, not every activation of the graph (GBs at 224 x 224).
        last_read = {name: step for step, idx in enumerate(order) for name in self.nodes[idx].input if name}
        wanted = set(outputs)
        for step, idx in enumerate(order):
            node = self.nodes[idx]
            args: list[Tensor | None] = []
            for name in node.input:
                if not name:
                    args.append(None)
                elif name in values:
                    args.append(values[name])
                elif weights is not None and name in weights:
                    args.append(weights[name])
                else:
                    args.append(self.initializers[name])
            extra = {"qrange": self._qranges[idx]} if idx in self._qranges else {}
            if node.op_type == "Relu" and self.relu_slope:
                results = [_ReluLeakyGrad.apply(args[0], self.relu_slope)]
            else:
                results = _OPS[node.op_type](*args, attrs=self.attrs[idx], **extra)
            for name, value in zip(node.output, results, strict=False):
                values[name] = fake_quant_qp(value, act_quant[name]) if name in act_quant else value
            if footprint is not None:
                # The op's inputs and outputs are alive together, before the inputs are dropped.
                produced = sum(v.numel() for v in results if isinstance(v, Tensor))
                footprint["total"] = footprint.get("total", 0) + produced
                live = sum(v.numel() for v in values.values() if isinstance(v, Tensor))
                footprint["live"] = max(footprint.get("live", 0), live)
            for name in node.input:
                if name and last_read.get(name) == step and name not in wanted:
                    values.pop(name, None)
        return {o: values[o] for o in outputs}


def simulate_logits(model: onnx.ModelProto, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of a model (FP or QDQ) computed by the PyTorch simulation.

    Raises:
        NotSupported: the graph uses an op the simulation does not cover.
    """
    graph = TorchGraph(prepare_model(model))
    outs = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            feeds = {graph.inputs[0]: torch.from_numpy(images[i : i + batch_size])}
            outs.append(graph.run(feeds)[graph.outputs[0]].numpy())
    return np.concatenate(outs)


#: The pipeline's own simulation as a parity reference (`efrap verify --reference`, `pipeline.api.verify`).
SIMULATION = Reference("pytorch simulation", simulate_logits)
