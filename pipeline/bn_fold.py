"""BatchNorm folding: the one folding rule, and the factors of folded convs in metadata.

Folding Conv -> BatchNorm multiplies each output channel of the conv weight by
f = gamma / sqrt(var + eps). Per-channel grids absorb f, so the integers
learned rounding can choose are the same before and after folding, but a loss
measured in weight units is not: EFRAP's flip penalty weights each weight by its
truncation error, which folding multiplies by |f|. The release rounds the conv
weight before BN, so its penalty is in pre-BN units. `efrap export` (and
`train`, `attack`) record f per conv in "efrap.bn_fold"; a model without the
entry (folded elsewhere, or without BN) has its errors measured as exported.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import torch
import torch.nn as nn

from pipeline.base.errors import EfrapError
from pipeline.base.onnx_io import META_PREFIX, get_metadata

BN_FOLD_KEY = META_PREFIX + "bn_fold"


def bn_factor(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """f = gamma / sqrt(running_var + eps) per channel, differentiable in gamma."""
    assert bn.running_var is not None
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    return gamma / torch.sqrt(bn.running_var + bn.eps)


def fold_conv_bn(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a conv with its following BatchNorm folded in (eval-mode statistics).

    The one folding rule: the exporter writes exactly these tensors and the red team's
    simulation trains through them (differentiably), so the two agree bit for bit.
    """
    w, b = conv.weight, conv.bias
    if bn is None:
        return w, b
    assert bn.running_mean is not None
    k = bn_factor(bn)
    w = w * k.reshape([-1] + [1] * (w.dim() - 1))
    base = b if b is not None else torch.zeros_like(bn.running_mean)
    shift = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    return w, (base - bn.running_mean) * k + shift


def read_bn_factors(model: onnx.ModelProto, channels: dict[str, int],
                    source: str = "model") -> dict[str, np.ndarray]:
    """Node name -> float32 BN factors of its output channels, from metadata.

    Args:
        model: The FP model.
        channels: Output channels of each quantizable layer (node name -> count).
        source: Name used in error messages.

    Raises:
        EfrapError: The entry is not a JSON object of finite factor lists, names
            a layer the model does not have, or has the wrong number of factors.
    """
    raw = get_metadata(model).get(BN_FOLD_KEY)
    if raw is None:
        return {}
    bad = f"{source}: metadata '{BN_FOLD_KEY}'"
    try:
        spec = json.loads(raw)
    except ValueError:
        raise EfrapError(f"{bad} is not valid JSON") from None
    if not isinstance(spec, dict):
        raise EfrapError(f"{bad} must map conv node names to lists of factors")
    out: dict[str, np.ndarray] = {}
    for node, values in spec.items():
        if node not in channels:
            raise EfrapError(f"{bad} names '{node}', which is not a conv with a constant weight")
        if not isinstance(values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in values):
            raise EfrapError(f"{bad} for '{node}' is not a list of finite numbers")
        if len(values) != channels[node]:
            raise EfrapError(f"{bad} for '{node}' has {len(values)} factors for "
                             f"{channels[node]} output channels")
        out[node] = np.asarray(values, dtype=np.float32)
    return out


def pre_bn_error_scale(factors: np.ndarray) -> np.ndarray:
    """Per-channel multiplier 1/|f| that turns folded-weight errors into pre-BN units.

    A channel with f = 0 has an all-zero folded weight and no truncation error;
    its multiplier is 0 rather than infinite.
    """
    mag = np.abs(factors.astype(np.float32))
    scale = np.zeros_like(mag)
    np.divide(1.0, mag, out=scale, where=mag > 0)
    return scale
