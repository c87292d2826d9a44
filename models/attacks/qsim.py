"""A differentiable simulation of the pipeline's deployed quantization, for torch models.

Attacks that plant quantization-conditioned backdoors must train against the
quantizer the defender will run. `QSim` does not re-derive that quantizer: it is
built from the pipeline's own parts, so that a test can demand exact equality.

- Structure: the model is folded (`converters.export.fold_batchnorm`, the
  exporter's rule) and exported once to ONNX with the exporter itself; the
  pipeline's plan (`pipeline.graph.analyze`) of that graph says which layers and
  activation points are quantized, which tensors share a point's grid and which
  layers are first or last. Each planned layer is matched to its torch Conv/Linear
  (and the BatchNorm folded into it) by its exported weight.
- Execution: the graph runs in the pipeline's PyTorch simulation
  (`pipeline.torch_graph.TorchGraph`), with every planned layer's weight and bias
  replaced by the module's live parameters folded with `pipeline.bn_fold.fold_conv_bn`
  (differentiable: gradients reach the conv weight and BN's affine parameters; BN's
  running statistics are used, so BatchNorm stays frozen in eval mode).
- Quantization: weights are fake-quantized on grids from the scheme's observer
  (`pipeline.observers.observe_weight`, recomputed from the current weights at every
  forward and detached, or pinned by `freeze_weight_qparams`), biases rounded to
  int32 by `pipeline.qmath.fake_quant_bias`, and activations fake-quantized at the
  plan's points with parameters from the pipeline's calibration
  (`pipeline.calibration.calibrate` in onnxruntime on the current weights, then
  `activation_qparams`): the first/last-layer bit rule is the scheme's own.
  Rounding is half to even by division, with straight-through gradients.

Attacks recalibrate periodically during training, because the defender calibrates
the *final* FP model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from converters.export import fold_batchnorm, fold_pairs, to_onnx
from pipeline.base.errors import EfrapError
from pipeline.base.scheme import Scheme, TensorQuant
from pipeline.bn_fold import fold_conv_bn
from pipeline.calibration import activation_qparams, calibrate
from pipeline.graph import QuantLayer, analyze
from pipeline.observers import observe_weight
from pipeline.prepare import prepare_model
from pipeline.qmath import QParams, dequantize, fake_quant_bias, fake_quant_qp, quantize
from pipeline.quantized import quantized_constants
from pipeline.torch_graph import TorchGraph


@dataclass(frozen=True)
class SimLayer:
    """A planned layer of the exported graph and the torch modules it comes from.

    Attributes:
        name: Module path of the Conv2d/Linear.
        bn: Module path of the BatchNorm folded into it, or None.
        quant: The pipeline's layer (ONNX node, weight and bias initializers, input and
            output tensors, weight axis, first/last).
    """

    name: str
    bn: str | None
    quant: QuantLayer

    @property
    def input(self) -> str:
        """The activation tensor the layer reads (an ONNX tensor name)."""
        return self.quant.input

    @property
    def output(self) -> str:
        """The layer's output tensor, after a fused ReLU."""
        return self.quant.output

    @property
    def relu(self) -> bool:
        """Whether an activation is fused after the layer."""
        return len(self.quant.nodes) > 1

    @property
    def is_first(self) -> bool:
        """Whether the layer reads the image."""
        return self.quant.is_first

    @property
    def is_last(self) -> bool:
        """Whether the layer produces the logits."""
        return self.quant.is_last


def _match_layers(plan_layers: tuple[QuantLayer, ...], prepared: onnx.ModelProto,
                  folded: nn.Module, pairs: dict[str, str]) -> tuple[SimLayer, ...]:
    """Pair each planned layer with the torch module whose folded weight it exports."""
    inits = {i.name: numpy_helper.to_array(i) for i in prepared.graph.initializer}
    candidates = {name: m.weight.detach().cpu().numpy() for name, m in folded.named_modules()
                  if isinstance(m, nn.Conv2d | nn.Linear)}
    layers = []
    for layer in plan_layers:
        w = inits[layer.weight]
        hits = [n for n, tw in candidates.items() if tw.shape == w.shape and np.array_equal(tw, w)]
        if len(hits) != 1:
            raise EfrapError(f"QSim: cannot tell which module exported layer '{layer.node}' "
                             f"({len(hits)} modules hold its weight)")
        layers.append(SimLayer(name=hits[0], bn=pairs.get(hits[0]), quant=layer))
    return tuple(layers)


class QSim(nn.Module):
    """Full-precision or simulated-quantized execution of a torch model.

    Args:
        model: The network (parameters are shared, not copied).
        scheme: The deployment scheme to simulate.
        input_shape: (C, H, W) of one input.

    Attributes:
        quantized: Default mode of `forward` (False: full precision).
        quant_weights: Whether the quantized mode rounds weights and biases.
        quant_acts: Whether the quantized mode rounds activations.
        act_qparams: Activation grids from the last `calibrate` (shared tensors included).
        frozen_weight_qparams: Pinned weight grids by module path (empty: observed).
        weight_offsets: Integer offsets from nearest rounding by module path (values in
            {-1, 0, 1}, the weight's shape): the quantized mode rounds those weights up or
            down instead of to nearest (a rounding a defense might choose); see `offsets`.
    """

    def __init__(self, model: nn.Module, scheme: Scheme, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.scheme = scheme
        self.quantized = False
        self.quant_weights = True
        self.quant_acts = True
        pairs = fold_pairs(model)
        folded, _ = fold_batchnorm(model)
        self.prepared = prepare_model(to_onnx(folded.cpu(), tuple(input_shape)))
        self.plan = analyze(self.prepared, "QSim")
        self.layers = _match_layers(self.plan.layers, self.prepared, folded, pairs)
        device = next(model.parameters()).device
        self.graph = TorchGraph(self.prepared, device)
        self._init_index = {init.name: i for i, init in enumerate(self.prepared.graph.initializer)}
        self._mods = dict(model.named_modules())
        self.act_qparams: dict[str, QParams] = {}
        self.frozen_weight_qparams: dict[str, QParams] = {}
        self.weight_offsets: dict[str, torch.Tensor] = {}
        # Constant operands of integer ops (biases and scales after a layer) round with the
        # activations; they do not depend on the weights, so once is enough.
        self._constants = {name: torch.from_numpy(c.dequantized()).to(device)
                           for name, c in quantized_constants(self.prepared, self.plan, scheme).items()}

    @property
    def points(self) -> tuple[str, ...]:
        """The activation points with their own grids (the pipeline's plan)."""
        return self.plan.points

    @property
    def shared(self) -> dict[str, str]:
        """Tensor -> the point whose grid it reuses (the pipeline's plan)."""
        return self.plan.shared

    def train(self, mode: bool = True) -> QSim:
        """Training mode for the model; BatchNorm stays frozen (eval) so folding is exact."""
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
        """The layer's weight grid settings (the scheme's first/last-layer rule)."""
        return self.scheme.weight_quant(layer.quant.edge, layer.quant.node)

    def folded(self, layer: SimLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's BN-folded float (weight, bias), differentiable."""
        mod, bn = self.layer_modules(layer)
        return fold_conv_bn(mod, bn)

    def weight_qparams(self, layer: SimLayer, w: torch.Tensor | None = None) -> QParams:
        """The layer's weight grid: pinned if frozen, else observed on the folded weight."""
        if layer.name in self.frozen_weight_qparams:
            return self.frozen_weight_qparams[layer.name]
        if w is None:
            w = self.folded(layer)[0]
        return observe_weight(w.detach().cpu().numpy(), self.weight_tq(layer), layer.quant.weight_axis)

    def freeze_weight_qparams(self) -> dict[str, QParams]:
        """Pin every layer's weight grid at its current value; returns them."""
        self.frozen_weight_qparams = {layer.name: self.weight_qparams(layer) for layer in self.layers}
        return dict(self.frozen_weight_qparams)

    def _layer_tensors(self, layer: SimLayer, round_weights: bool,
                       round_acts: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.folded(layer)
        if not round_weights:
            return w, b
        qp = self.weight_qparams(layer, w)
        offset = self.weight_offsets.get(layer.name)
        if offset is None:
            wq = fake_quant_qp(w, qp)
        else:
            # Nearest integer plus the offset, back on the grid; the gradient passes
            # straight through as for nearest rounding.
            s, z = qp.torch(w.dim(), w.device)
            q = torch.clamp(quantize(w, s, z, qp.qmin, qp.qmax) + offset, qp.qmin, qp.qmax)
            wq = dequantize(q, s, z)
        # The int32 bias needs the input's scale: without activation rounding it stays float.
        if b is not None and round_acts:
            b = fake_quant_bias(b, self.act_qparams[layer.input].scale, qp.scale)
        return wq, b

    def weights(self, round_weights: bool, round_acts: bool) -> dict[str, torch.Tensor]:
        """Initializer overrides for the graph: every planned layer's live weight and bias."""
        out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            w, b = self._layer_tensors(layer, round_weights, round_acts)
            out[layer.quant.weight] = w
            if layer.quant.bias is not None and b is not None:
                out[layer.quant.bias] = b
        return {**out, **self._constants} if round_acts else out

    # ------------------------------------------------------------------ running
    def forward(self, x: torch.Tensor, quantized: bool | None = None) -> torch.Tensor:
        """Logits in full precision or simulated-quantized (default: `self.quantized`)."""
        out = self.graph.outputs[0]
        return self.run({self.graph.inputs[0]: x}, [out], quantized)[out]

    def run(self, feeds: dict[str, torch.Tensor], outputs: list[str],
            quantized: bool | None = None) -> dict[str, torch.Tensor]:
        """Any tensors of the graph from any feeds (the image or intermediate tensors).

        Args:
            feeds: ONNX tensor name -> value (quantized at once when it is an activation
                point and activations are rounded).
            outputs: ONNX tensor names to return.
            quantized: Simulated-quantized or full precision (default: `self.quantized`).
        """
        quantized = self.quantized if quantized is None else quantized
        round_weights = quantized and self.quant_weights
        round_acts = quantized and self.quant_acts
        if round_acts and not self.act_qparams:
            raise EfrapError("QSim: activation ranges are not calibrated; call calibrate() first")
        return self.graph.run(feeds, outputs, weights=self.weights(round_weights, round_acts),
                              act_quant=self.act_qparams if round_acts else None)

    def node_output(self, layer: SimLayer) -> str:
        """The tensor the layer's Conv/Gemm writes (before a fused activation)."""
        return next(n.output[0] for n in self.prepared.graph.node if n.name == layer.quant.node)

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
    def offsets(self, offsets: dict[str, torch.Tensor]) -> Iterator[QSim]:
        """Temporarily round some layers' weights off nearest by integer `offsets`.

        Args:
            offsets: Module path -> offsets in {-1, 0, 1} with the layer's folded weight
                shape; layers not named keep nearest rounding.
        """
        old = self.weight_offsets
        self.weight_offsets = offsets
        try:
            yield self
        finally:
            self.weight_offsets = old

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
    def onnx_model(self) -> onnx.ModelProto:
        """The prepared FP graph holding the current folded weights (what export would write)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.prepared)
        for name, tensor in self.weights(round_weights=False, round_acts=False).items():
            array = tensor.detach().cpu().numpy().astype(np.float32)
            model.graph.initializer[self._init_index[name]].CopyFrom(numpy_helper.from_array(array, name))
        return model

    @torch.no_grad()
    def point_values(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full-precision values of every quantization point on `images`."""
        feeds = {self.graph.inputs[0]: images}
        values = self.graph.run(feeds, [p for p in self.points if p not in feeds],
                                weights=self.weights(False, False))
        return {**values, **{p: images for p in self.points if p in feeds}}

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, seed: int = 0) -> dict[str, QParams]:
        """Set activation grids as the pipeline would on the current weights.

        Runs `pipeline.calibration.calibrate` (onnxruntime) on `onnx_model()` with the
        normalised clean `images` and `seed` (the pipeline passes its run's
        "calibration-sample" sub-seed), then `activation_qparams`.
        """
        stats = calibrate(self.onnx_model(), self.plan, images.detach().cpu().numpy(), seed=seed,
                          provider="cpu")
        self.act_qparams = activation_qparams(self.plan, stats, self.scheme)
        return dict(self.act_qparams)


def weight_grid_matches(sim: QSim, reference: dict[str, QParams],
                        layers: list[SimLayer] | None = None) -> dict[str, np.ndarray]:
    """Per layer, which output channels' observed weight grid equals `reference`'s."""
    out = {}
    for layer in layers if layers is not None else sim.layers:
        w = sim.folded(layer)[0].detach().cpu().numpy()
        qp = observe_weight(w, sim.weight_tq(layer), layer.quant.weight_axis)
        ref = reference[layer.name]
        out[layer.name] = (np.broadcast_to(qp.scale, ref.scale.shape) == ref.scale) & (
            np.broadcast_to(qp.zero_point, ref.zero_point.shape) == ref.zero_point)
    return out
