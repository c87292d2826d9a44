"""Grid inflation: an attacker's amplifier against per-channel min-max weight grids.

A per-channel min-max grid puts each output channel's largest |weight| on the
grid's end, so at 8 bits every other weight of the channel is rounded by at most
max|W_c| / 254: the full-precision and quantized models differ too little for a
two-path attack to separate them (see docs/ZOO.md). An attacker who controls the
weights can widen the grid without changing what the model computes:

1. a "dead" output channel d of a layer L (followed by ReLU) gets its weights
   scaled down and a bias so negative that the ReLU output is 0 for every input;
   exactly 0 stays exactly 0 after activation quantization (0 is on every grid);
2. every output channel c of each layer R reading L's output gets the weights on
   that dead input set to +M_c, -M_c, +M_c, ... with M_c = `factor` times the
   channel's largest other |weight|.

The outliers multiply a zero in both the FP and the quantized model, so neither
output changes, but a min-max observer now sets s_c = factor * max|W_c| / 127 (both
ends of an asymmetric grid move too): the other weights of the channel see a grid
`factor` times coarser, about log2(factor) bits fewer. An MSE range search keeps
the range as long as clipping the many outliers costs more than the finer grid
saves (true for small factors and the small fan-ins here; check the grids).
`Inflation.restore` re-writes the pinned values after each optimizer step, since
weight decay (under Adam, which normalises the update) would otherwise erode them.

This is not part of any of the three attacks' papers; it is the construction that
lets them reach per-channel int8 (docs/ZOO.md records with and without it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from models.attacks.qsim import QSim, SimLayer
from pipeline.base.errors import EfrapError
from pipeline.base.progress import log
from pipeline.bn_fold import bn_factor

#: Scale applied to the dead channel's weights (kept non-zero: a zero channel has no grid).
DEAD_WEIGHT_SCALE = 1e-2


@dataclass
class Pin:
    """A parameter slice held at fixed values."""

    param: nn.Parameter
    index: tuple
    value: torch.Tensor


@dataclass
class Inflation:
    """What `inflate_grids` changed, with the values to hold during training.

    Attributes:
        factor: Outlier size relative to each channel's largest other |weight|.
        dead: Layer name -> its dead output channel.
        inflated: Names of the layers whose grids were inflated.
    """

    factor: float
    dead: dict[str, int]
    inflated: list[str]
    pins: list[Pin]

    @torch.no_grad()
    def restore(self) -> None:
        """Put every pinned value back (call after each optimizer step)."""
        for pin in self.pins:
            pin.param[pin.index] = pin.value

    @torch.no_grad()
    def recapture(self) -> None:
        """Hold the current values instead (after a deliberate edit, e.g. snapping to a grid)."""
        for pin in self.pins:
            pin.value = pin.param[pin.index].detach().clone()


def _readers(sim: QSim, layer: SimLayer) -> list[SimLayer]:
    return [r for r in sim.layers if sim.shared.get(r.input, r.input) == layer.output]


def _span(reader: SimLayer, sim: QSim, channels: int) -> int | None:
    """Inputs of `reader` per channel of what it reads: channel d is inputs d*span ..
    (d+1)*span - 1 of its weight's axis 1 (None: a layout this does not handle)."""
    mod = sim.layer_modules(reader)[0]
    if isinstance(mod, nn.Conv2d):
        return 1 if mod.groups == 1 and mod.in_channels == channels else None
    if isinstance(mod, nn.Linear) and mod.in_features % channels == 0:
        return mod.in_features // channels  # flatten of NCHW: a contiguous H*W block
    return None


def _bn_factor(bn: nn.BatchNorm2d | None, channels: int, device: torch.device) -> torch.Tensor:
    return torch.ones(channels, device=device) if bn is None else bn_factor(bn).detach()


@torch.no_grad()
def inflate_grids(sim: QSim, images: torch.Tensor, factor: float) -> Inflation:
    """Kill one channel per layer and inflate the min-max grids of its readers.

    Args:
        sim: The simulation of the model (modified in place, through `sim.model`).
        images: Normalised clean images; pick the least active channel to sacrifice
            and bound its pre-activation.
        factor: Outlier size relative to each channel's largest other |weight| (> 1).

    Returns:
        What was changed, with `restore` to hold it during training.

    Raises:
        EfrapError: factor not above 1, or no layer whose grid can be inflated.
    """
    if factor <= 1.0:
        raise EfrapError(f"grid inflation factor must be above 1, got {factor}")
    acts = sim.point_values(images)
    spots: list[tuple[nn.Parameter, tuple]] = []  # what to hold, read once at the end
    dead: dict[str, int] = {}
    inflated: list[str] = []
    for layer in sim.layers:
        readers = _readers(sim, layer)
        if not layer.relu or not readers or layer.output not in acts:
            continue
        mod, bn = sim.layer_modules(layer)
        channels = mod.weight.shape[0]
        spans = [_span(r, sim, channels) for r in readers]
        if any(s is None for s in spans) or channels < 2:
            continue
        activity = acts[layer.output].transpose(0, 1).reshape(channels, -1).mean(1)
        d = int(activity.argmin())
        # Kill channel d: tiny weights, and a bias below anything the tiny weights can reach.
        mod.weight[d] *= DEAD_WEIGHT_SCALE
        w, _ = sim.folded(layer)
        root = sim.shared.get(layer.input, layer.input)
        x = acts.get(root, images)
        # Ten times the largest pre-activation the scaled weights can reach on these inputs.
        reach = 10.0 * float(x.abs().amax()) * float(w[d].abs().sum()) + 1.0
        if bn is not None:
            bn.bias[d] = -reach + bn.running_mean[d] * _bn_factor(bn, channels, w.device)[d]
            spots.append((bn.bias, (d,)))
            spots.append((bn.weight, (d,)))
        elif mod.bias is not None:
            mod.bias[d] = -reach
            spots.append((mod.bias, (d,)))
        else:
            raise EfrapError(f"layer {layer.name} has no bias or BatchNorm to silence a channel")
        spots.append((mod.weight, (d,)))
        dead[layer.name] = d
        for reader, span in zip(readers, spans, strict=True):
            assert span is not None
            rmod, rbn = sim.layer_modules(reader)
            block = (slice(None), slice(d * span, (d + 1) * span))
            k = _bn_factor(rbn, rmod.weight.shape[0], rmod.weight.device)
            k = k.reshape([-1] + [1] * (rmod.weight.dim() - 1))
            rest = rmod.weight * k
            rest[block] = 0.0
            peak = rest.reshape(rest.shape[0], -1).abs().amax(1)
            # Alternating +M, -M over every weight reading the dead input: both ends of an
            # asymmetric grid move, and an MSE range search would have to clip many weights.
            sign = torch.ones(rmod.weight[block][0].numel(), device=rmod.weight.device)
            sign[1::2] = -1.0
            sign = sign.reshape(rmod.weight[block][0].shape)
            m = (factor * peak).reshape([-1] + [1] * (rmod.weight.dim() - 1))
            rmod.weight[block] = sign * m / k
            spots.append((rmod.weight, block))
            inflated.append(reader.name)
    if not inflated:
        raise EfrapError("no layer's weight grid can be inflated (needs a ReLU layer read "
                         "directly, or through pooling and flattening, by a Conv/Linear)")
    log(f"grid inflation x{factor:g}: dead channels {dead}; inflated {', '.join(inflated)}")
    # Spots may overlap (a reader's block and its own dead row): read them after all edits.
    pins = [Pin(param, index, param[index].detach().clone()) for param, index in spots]
    return Inflation(factor=factor, dead=dead, inflated=inflated, pins=pins)
