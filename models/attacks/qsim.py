"""A differentiable simulation of the pipeline's deployed quantization, for torch models.

Attacks that plant quantization-conditioned backdoors must train against the
quantizer the defender will run. `QSim` wraps a torch model and runs it either in
full precision or exactly as `efrap quantize --method nearest` deploys it:

- BatchNorm is folded into the preceding convolution before anything else. The
  folding is differentiable (gradients reach the conv weight and BN's affine
  parameters) and uses BN's *running* statistics: attacks therefore train with BN
  frozen (`QSim.train()` keeps every BatchNorm in eval mode). This is the only way
  the simulated integers equal the exported ones; the attacks start from a model
  pre-trained normally (BN in training mode) and then fine-tune with BN frozen.
- Weights are fake-quantized with the scheme's observer
  (`pipeline.observers.observe_weight`) on the folded weight; the parameters are
  recomputed from the current weights at every forward pass and detached (no
  gradient through the range). `freeze_weight_qparams` pins them instead.
- Biases are rounded to int32 with scale ``s_in * s_w`` (half to even).
- Activations are fake-quantized at the pipeline's points (see `pipeline.graph`):
  the input of every Conv/Linear, and every layer's output after its following
  ReLU unless it is the network's output; MaxPool/Flatten/Dropout outputs of a
  quantized tensor reuse its parameters. With `first_last_bits` the points read by
  the first and last layers, and those layers' weights, use that bit-width.
- Activation parameters come from `calibrate`, a full-precision pass over clean
  images that mirrors `pipeline.calibration.calibrate` value for value (batches of
  64, the same per-point value sampling, the same observers). Attacks recalibrate
  periodically during training (every `recalib_every` steps, on a fresh random set
  of 1,024 clean training images), because the defender calibrates the *final*
  FP model; no EMA is used.
- Rounding is half to even by division (`pipeline.qmath.fake_quant`), with
  straight-through gradients.

The model is traced with `torch.fx`; Conv2d/Linear layers, BatchNorm2d, ReLU,
MaxPool, Flatten, Dropout, adds and pooling are understood (anything else runs in
float as is).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from pipeline.errors import EfrapError
from pipeline.graph import assign_points
from pipeline.observers import ActivationStats, observe_activation, observe_weight
from pipeline.qmath import QParams, fake_quant, round_ste
from pipeline.scheme import Scheme, TensorQuant

SAMPLE_PER_BATCH = 16_384  # pipeline.calibration's per-batch sample size
CALIB_BATCH = 64  # pipeline.calibration's batch size

_PASSTHROUGH_MODULES = (nn.MaxPool2d, nn.MaxPool1d, nn.Flatten, nn.Dropout, nn.Identity)
_PASSTHROUGH_FUNCTIONS = (torch.flatten, F.max_pool2d, F.dropout, torch.reshape)
_PASSTHROUGH_METHODS = ("view", "reshape", "flatten")
_RELU_FUNCTIONS = (F.relu, torch.relu)


@dataclass(frozen=True)
class SimLayer:
    """A Conv2d/Linear with what the exporter folds or fuses into it.

    Attributes:
        name: Module path of the Conv2d/Linear.
        node: Its fx node name.
        bn: Module path of a BatchNorm2d folded into it, or None.
        input: fx node name of the activation it reads.
        output: fx node name of its output (after a fused ReLU).
        skipped: fx node names computed by this layer (BN, ReLU).
        relu: Whether a ReLU is fused after it.
        is_first: Whether it reads the model input.
        is_last: Whether its output is the model output.
    """

    name: str
    node: str
    bn: str | None
    input: str
    output: str
    skipped: tuple[str, ...]
    relu: bool
    is_first: bool
    is_last: bool


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target == "relu"


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], _PASSTHROUGH_MODULES)
    if node.op == "call_function":
        return node.target in _PASSTHROUGH_FUNCTIONS
    return node.op == "call_method" and node.target in _PASSTHROUGH_METHODS


def fold_bn(layer: nn.Module, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Folded (weight, bias) of a conv/linear and its BatchNorm, differentiably.

    Uses BN's running statistics (eval-mode semantics), like the ONNX exporter.
    """
    w = layer.weight
    b = layer.bias
    if bn is None:
        return w, b
    k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shape = [-1] + [1] * (w.dim() - 1)
    w = w * k.reshape(shape)
    base = b if b is not None else torch.zeros_like(bn.running_mean)
    return w, (base - bn.running_mean) * k + bn.bias


class QSim(nn.Module):
    """Full-precision or simulated-quantized execution of a torch model.

    Args:
        model: The network (parameters are shared, not copied).
        scheme: The deployment scheme to simulate.

    Attributes:
        quantized: Default mode of `forward` (False: full precision).
        quant_weights: Whether the quantized mode rounds weights and biases.
        quant_acts: Whether the quantized mode rounds activations.
    """

    def __init__(self, model: nn.Module, scheme: Scheme) -> None:
        super().__init__()
        self.model = model
        self.scheme = scheme
        self.quantized = False
        self.quant_weights = True
        self.quant_acts = True
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as exc:  # fx raises many types for untraceable code
            raise EfrapError(f"cannot trace the model for quantization simulation ({exc})") from None
        self._mods = dict(model.named_modules())
        self._analyze()
        self.act_qparams: dict[str, QParams] = {}
        self.frozen_weight_qparams: dict[str, QParams] = {}
        self._collect: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ analysis
    def _analyze(self) -> None:
        graph = self.gm.graph
        mods = self._mods
        output_node = next(n for n in graph.nodes if n.op == "output")
        outs = output_node.args[0]
        out_names = {n.name for n in (outs if isinstance(outs, list | tuple) else [outs])
                     if isinstance(n, fx.Node)}
        self.nodes = list(graph.nodes)
        layers: list[SimLayer] = []
        for node in self.nodes:
            if node.op != "call_module" or not isinstance(mods[str(node.target)], nn.Conv2d | nn.Linear):
                continue
            inp = node.args[0]
            assert isinstance(inp, fx.Node)
            out, bn, skipped = node, None, []
            users = list(out.users)
            if (isinstance(mods[str(node.target)], nn.Conv2d) and len(users) == 1
                    and users[0].op == "call_module"
                    and isinstance(mods[str(users[0].target)], nn.BatchNorm2d)):
                bn = str(users[0].target)
                out = users[0]
                skipped.append(out.name)
            users = list(out.users)
            relu = len(users) == 1 and _is_relu(users[0], mods) and out.name not in out_names
            if relu:
                out = users[0]
                skipped.append(out.name)
            layers.append(SimLayer(
                name=str(node.target), node=node.name, bn=bn, input=inp.name, output=out.name,
                skipped=tuple(skipped), relu=relu, is_first=inp.op == "placeholder",
                is_last=out.name in out_names,
            ))
        if not layers:
            raise EfrapError("the model has no Conv2d or Linear layer to quantize")
        self.layers = tuple(layers)
        self._layer_at = {layer.node: layer for layer in layers}
        self._skip = {s for layer in layers for s in layer.skipped}

        by_name = {n.name: n for n in self.nodes}

        def upstream(name: str) -> str | None:
            node = by_name[name]
            if not _is_passthrough(node, mods):
                return None
            prev = node.args[0]
            assert isinstance(prev, fx.Node)
            return prev.name

        points, shared = assign_points([(layer.input, layer.output) for layer in layers],
                                       out_names, upstream)
        self.points: tuple[str, ...] = points
        self.shared = shared
        readers: dict[str, list[SimLayer]] = {}
        for layer in layers:
            readers.setdefault(shared.get(layer.input, layer.input), []).append(layer)
        self._point_tq: dict[str, TensorQuant] = {}
        for p in self.points:
            tq = self.scheme.activation
            if self.scheme.first_last_bits and any(r.is_first or r.is_last for r in readers.get(p, [])):
                tq = tq.with_bits(self.scheme.first_last_bits)
            self._point_tq[p] = tq
        self._point_set = set(self.points)

    def train(self, mode: bool = True) -> QSim:
        """Training mode for dropout; BatchNorm stays frozen (eval) so folding is exact."""
        super().train(mode)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    # ------------------------------------------------------------------ weights
    def layer_modules(self, layer: SimLayer) -> tuple[nn.Module, nn.BatchNorm2d | None]:
        """The Conv2d/Linear module and its folded BatchNorm."""
        bn = self._mods[layer.bn] if layer.bn else None
        return self._mods[layer.name], bn  # type: ignore[return-value]

    def weight_tq(self, layer: SimLayer) -> TensorQuant:
        """The weight grid settings of a layer (first/last layers may use more bits)."""
        if self.scheme.first_last_bits and (layer.is_first or layer.is_last):
            return self.scheme.weight.with_bits(self.scheme.first_last_bits)
        return self.scheme.weight

    def folded(self, layer: SimLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's BN-folded float (weight, bias), differentiable."""
        mod, bn = self.layer_modules(layer)
        return fold_bn(mod, bn)

    def weight_qparams(self, layer: SimLayer, w: torch.Tensor | None = None) -> QParams:
        """The layer's weight grid: frozen if pinned, else observed on the folded weight."""
        if layer.name in self.frozen_weight_qparams:
            return self.frozen_weight_qparams[layer.name]
        if w is None:
            w = self.folded(layer)[0]
        return observe_weight(w.detach().cpu().numpy(), self.weight_tq(layer), 0)

    def freeze_weight_qparams(self) -> dict[str, QParams]:
        """Pin every layer's weight grid at its current value; returns them."""
        self.frozen_weight_qparams = {}
        for layer in self.layers:
            self.frozen_weight_qparams[layer.name] = self.weight_qparams(layer)
        return dict(self.frozen_weight_qparams)

    def _quant_layer_params(self, layer: SimLayer, x_point: str | None
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.folded(layer)
        qp = self.weight_qparams(layer, w)
        s, z = qp.torch(w.dim(), w.device)
        wq = fake_quant(w, s, z, qp.qmin, qp.qmax)
        if b is not None and x_point is not None and self.quant_acts:
            aq = self.act_qparams[x_point]
            bscale = (torch.as_tensor(np.float32(aq.scale)) * s.reshape(-1)).to(w.device)
            bd = bscale.double()
            q = round_ste(b.double() / bd).clamp(-(2**31), 2**31 - 1)
            b = (q * bd).float()
        return wq, b

    # ------------------------------------------------------------------ running
    def _act(self, name: str, value: torch.Tensor, quantized: bool) -> torch.Tensor:
        if self._collect is not None and name in self._point_set:
            self._collect[name] = value.detach()
        if not (quantized and self.quant_acts):
            return value
        root = self.shared.get(name, name)
        if name not in self._point_set:
            return value  # shares a point's grid: an exact identity
        if root not in self.act_qparams:
            raise EfrapError("QSim: activation ranges are not calibrated; call calibrate() first")
        qp = self.act_qparams[root]
        s, z = qp.torch(value.dim(), value.device)
        return fake_quant(value, s, z, qp.qmin, qp.qmax)

    def _run_layer(self, layer: SimLayer, env: dict[str, torch.Tensor], quantized: bool) -> torch.Tensor:
        mod = self._mods[layer.name]
        x = env[layer.input]
        root = self.shared.get(layer.input, layer.input)
        if quantized and self.quant_weights:
            w, b = self._quant_layer_params(layer, root if root in self._point_set else None)
        else:
            w, b = self.folded(layer)
        if isinstance(mod, nn.Conv2d):
            if mod.padding_mode != "zeros":
                raise EfrapError(f"QSim: conv '{layer.name}' uses padding_mode {mod.padding_mode}")
            y = F.conv2d(x, w, b, mod.stride, mod.padding, mod.dilation, mod.groups)
        else:
            y = F.linear(x, w, b)
        if layer.relu:
            y = F.relu(y)
        return y

    def forward(self, x: torch.Tensor, quantized: bool | None = None) -> torch.Tensor:
        """Logits in full precision or simulated-quantized (default: `self.quantized`)."""
        quantized = self.quantized if quantized is None else quantized
        env: dict[str, torch.Tensor] = {}
        mods = self._mods

        def arg(a: object) -> object:
            return fx.node.map_arg(a, lambda n: env[n.name])

        result: object = None
        for node in self.nodes:
            if node.name in self._skip:
                continue
            if node.op == "placeholder":
                value = x
            elif node.op == "output":
                result = arg(node.args[0])
                break
            elif node.name in self._layer_at:
                layer = self._layer_at[node.name]
                env[layer.output] = self._act(layer.output, self._run_layer(layer, env, quantized),
                                              quantized)
                continue
            elif node.op == "call_module":
                value = mods[str(node.target)](*arg(node.args), **arg(node.kwargs))
            elif node.op == "call_function":
                value = node.target(*arg(node.args), **arg(node.kwargs))  # type: ignore[operator]
            elif node.op == "call_method":
                args = arg(node.args)
                value = getattr(args[0], str(node.target))(*args[1:], **arg(node.kwargs))
            elif node.op == "get_attr":
                value = operator.attrgetter(str(node.target))(self.model)
            else:  # pragma: no cover - fx has no other ops
                raise EfrapError(f"QSim: unsupported fx op {node.op}")
            env[node.name] = self._act(node.name, value, quantized)
        return result  # type: ignore[return-value]

    @contextmanager
    def mode(self, quantized: bool) -> Iterator[QSim]:
        """Temporarily set the default mode."""
        old = self.quantized
        self.quantized = quantized
        try:
            yield self
        finally:
            self.quantized = old

    @contextmanager
    def rounding(self, weights: bool = True, activations: bool = True) -> Iterator[QSim]:
        """Temporarily choose what the quantized mode rounds (weights, activations or both)."""
        old = self.quant_weights, self.quant_acts
        self.quant_weights, self.quant_acts = weights, activations
        try:
            yield self
        finally:
            self.quant_weights, self.quant_acts = old

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def point_values(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full-precision values of every quantization point on `images` (eval mode)."""
        was_training = self.training
        self.eval()
        self._collect = {}
        try:
            self.forward(images, quantized=False)
            return self._collect
        finally:
            self._collect = None
            self.train(was_training)

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, seed: int = 0) -> dict[str, QParams]:
        """Set activation grids from a full-precision pass over normalised clean images.

        Mirrors `pipeline.calibration.calibrate` (batches of 64, the same value
        sampling in the same order) and `pipeline.quantize.activation_qparams`.
        """
        rng = np.random.default_rng(seed)
        mins = {p: np.inf for p in self.points}
        maxs = {p: -np.inf for p in self.points}
        samples: dict[str, list[np.ndarray]] = {p: [] for p in self.points}
        for start in range(0, len(images), CALIB_BATCH):
            values = self.point_values(images[start : start + CALIB_BATCH])
            for p in self.points:  # plan order, like pipeline.calibration
                flat = values[p].reshape(-1).cpu().numpy()
                mins[p] = min(mins[p], float(flat.min()))
                maxs[p] = max(maxs[p], float(flat.max()))
                k = min(SAMPLE_PER_BATCH, flat.size)
                samples[p].append(flat[rng.choice(flat.size, size=k, replace=False)])
        self.act_qparams = {
            p: observe_activation(
                ActivationStats(min=mins[p], max=maxs[p], sample=np.concatenate(samples[p])),
                self._point_tq[p])
            for p in self.points
        }
        return dict(self.act_qparams)


def weight_grid_matches(sim: QSim, reference: dict[str, QParams],
                        layers: list[SimLayer] | None = None) -> dict[str, np.ndarray]:
    """Per layer, which output channels' observed weight grid equals `reference`'s."""
    out = {}
    for layer in layers if layers is not None else sim.layers:
        w = sim.folded(layer)[0].detach().cpu().numpy()
        qp = observe_weight(w, sim.weight_tq(layer), 0)
        ref = reference[layer.name]
        out[layer.name] = (np.broadcast_to(qp.scale, ref.scale.shape) == ref.scale) & (
            np.broadcast_to(qp.zero_point, ref.zero_point.shape) == ref.zero_point)
    return out
