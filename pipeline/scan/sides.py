"""The two sides the scan compares, as differentiable functions of images in [0, 1].

A trigger is stamped on images in [0, 1] before preprocessing (the rule of
pipeline.base.trigger), so each side is the model's preprocessing, written in torch,
followed by the model's graph run by the pipeline's PyTorch simulation
(pipeline.torch_graph.TorchGraph):

- the FP side: the prepared FP graph as it is;
- the nearest side: the same graph with the nearest deployment's dequantized weights
  and biases and its activation fake-quantizers (`QuantResult.weight_overrides`,
  `act_qparams`), exactly the QDQ model `efrap quantize --method nearest` writes;
- a QDQ side: any QDQ model (a defended one), whose QuantizeLinear/DequantizeLinear
  nodes the simulation executes.

Gradients through rounding are straight-through (pipeline.qmath.round_ste): the
forward pass is the deployed arithmetic, the backward pass treats each rounding as the
identity and stops outside the grid. Every side's Relu may also pass a small gradient
below zero (`relu_slope`): a backward-pass surrogate, so that a search can reach units
that no clean image switches on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx
import torch
import torch.nn.functional as F

from pipeline.base import budget
from pipeline.base.errors import EfrapError, NotSupported
from pipeline.base.preprocess import Preprocess
from pipeline.base.progress import QUICK_PASS, Progress
from pipeline.prepare import prepare_model
from pipeline.qmath import QParams
from pipeline.quantized import QuantResult
from pipeline.scan.images import ImageSet, batch_for, grad_batch_for
from pipeline.torch_graph import TorchGraph


def torch_preprocess(pre: Preprocess, x: torch.Tensor) -> torch.Tensor:
    """`Preprocess.apply` in torch, differentiable: resize, scale, channel order, mean/std, layout.

    Args:
        pre: The model's preprocessing.
        x: N x C x H x W images in [0, 1].
    """
    if pre.resize is not None and tuple(x.shape[2:]) != pre.resize:
        x = F.interpolate(x, size=pre.resize, mode="bilinear", align_corners=False, antialias=True)
    if pre.input_scale != 1.0:
        x = x * pre.input_scale
    if pre.channel_order == "bgr":
        x = x.flip(1)
    mean = torch.tensor(pre.mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    x = (x - mean) / std
    if pre.layout == "nhwc":
        x = x.permute(0, 2, 3, 1)
    return x


class Side:
    """One model as a differentiable function of [0, 1] images: preprocessing, then its graph.

    Args:
        name: What it is ("fp", "nearest", "defended").
        graph: The graph in the PyTorch simulation.
        pre: The model's preprocessing.
        weights: Initializer overrides (the nearest deployment's dequantized weights).
        act_quant: Activation fake-quantizers (tensor -> QParams).
    """

    def __init__(self, name: str, graph: TorchGraph, pre: Preprocess,
                 weights: Mapping[str, torch.Tensor] | None = None,
                 act_quant: Mapping[str, QParams] | None = None) -> None:
        self.name = name
        self.graph = graph
        self.pre = pre
        self.weights = weights
        self.act_quant = act_quant
        self._footprints: dict[tuple[int, ...], dict[str, int]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N x classes) of images `x` in [0, 1]."""
        feeds = {self.graph.inputs[0]: torch_preprocess(self.pre, x)}
        out = self.graph.run(feeds, weights=self.weights, act_quant=self.act_quant)[self.graph.outputs[0]]
        return out.reshape(out.shape[0], -1)

    def footprint(self, image_shape: tuple[int, ...]) -> dict[str, int]:
        """Activation values per image of `image_shape` (C x H x W): "live" (most alive at
        once) and "total" (all of them), from one image through the graph (cached)."""
        if image_shape not in self._footprints:
            counts: dict[str, int] = {}
            with torch.no_grad():
                feeds = {self.graph.inputs[0]: torch_preprocess(self.pre, torch.zeros(1, *image_shape))}
                self.graph.run(feeds, weights=self.weights, act_quant=self.act_quant, footprint=counts)
            self._footprints[image_shape] = counts
        return self._footprints[image_shape]

    def logits_batch(self, image_shape: tuple[int, ...]) -> int:
        """Images per pass without gradients through this model (`batch_for`)."""
        return batch_for(image_shape, self.footprint(image_shape)["live"])

    def logits(self, images: torch.Tensor | ImageSet, batch_size: int | None = None) -> torch.Tensor:
        """Logits of many images, without gradients, in batches (default: `batch_for` their
        size and this model's activations)."""
        step = batch_size or self.logits_batch(tuple(images.shape[1:]))
        parts = []
        bar = Progress(f"scan: the {self.name} side's simulation on {len(images):,} images",
                       total=len(images), min_seconds=QUICK_PASS)
        with torch.no_grad():
            for i in range(0, len(images), step):
                budget.check()
                parts.append(self(images[i : i + step]))
                bar.update(len(parts[-1]))
        bar.close()
        return torch.cat(parts)


def batches(sides: Sequence[Side], image_shape: tuple[int, ...]) -> tuple[int, int]:
    """(images per pass without gradients, images per forward-and-backward pass) for images
    of `image_shape` through `sides`: passes without gradients run one side at a time, a
    search step keeps every side's activations for its backward pass."""
    prints = [side.footprint(image_shape) for side in sides]
    return (batch_for(image_shape, max(p["live"] for p in prints)),
            grad_batch_for(image_shape, sum(p["total"] for p in prints)))


def _graph(model: onnx.ModelProto, source: str, relu_slope: float) -> TorchGraph:
    try:
        return TorchGraph(model, relu_slope=relu_slope)
    except NotSupported as exc:
        raise EfrapError(f"{source}: the scan differentiates through the PyTorch simulation, "
                         f"which cannot run this model: {exc}") from None


def fp_side(prepared: onnx.ModelProto, pre: Preprocess, source: str = "model",
            relu_slope: float = 0.0) -> Side:
    """The FP model (a graph from pipeline.prepare.prepare_model)."""
    return Side("fp", _graph(prepared, source, relu_slope), pre)


def nearest_side(fp: Side, result: QuantResult) -> Side:
    """The nearest deployment: the FP side's graph with `result`'s integers and activation grids."""
    return Side("nearest", fp.graph, fp.pre, result.weight_overrides(), result.act_qparams)


def qdq_side(name: str, qdq: onnx.ModelProto, pre: Preprocess, source: str,
             relu_slope: float = 0.0) -> Side:
    """A QDQ model (e.g. a defended one) run as written: its Q/DQ nodes round, straight-through."""
    return Side(name, _graph(prepare_model(qdq, source), source, relu_slope), pre)
