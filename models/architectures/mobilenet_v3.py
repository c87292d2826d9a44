"""MobileNet-V3-Small (Howard et al., 2019) with CIFAR-style strides.

The distinctive ops are kept: inverted residuals with depthwise convs,
squeeze-excitation gated by Hardsigmoid, Hardswish in the later blocks and the
Linear -> Hardswish -> Dropout -> Linear classifier.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# (kernel, expanded, out, squeeze-excite, hardswish, stride): Table 2 of the paper, with the stem's
# and the first block's strides set to 1 so that 32x32 inputs keep a 4x4 map at the end.
_CFG = [
    (3, 16, 16, True, False, 1),
    (3, 72, 24, False, False, 2),
    (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2),
    (5, 240, 40, True, True, 1),
    (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1),
    (5, 144, 48, True, True, 1),
    (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1),
    (5, 576, 96, True, True, 1),
]


def _divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10% below `value`."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             act: type[nn.Module] | None = nn.ReLU) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return layers


class SqueezeExcite(nn.Module):
    """Channel gate: global average, 1x1 reduce, ReLU, 1x1 expand, Hardsigmoid, multiply."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeeze = _divisible(channels / 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """Expand (1x1, skipped when it would not widen), depthwise kxk, optional SE, project (1x1)."""

    def __init__(self, cin: int, hidden: int, cout: int, k: int, se: bool, hswish: bool,
                 stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        layers: list[nn.Module] = []
        if hidden != cin:
            layers += _conv_bn(cin, hidden, 1, act=act)
        layers += _conv_bn(hidden, hidden, k, stride, groups=hidden, act=act)
        if se:
            layers.append(SqueezeExcite(hidden))
        layers += _conv_bn(hidden, cout, 1, act=None)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV3Small(nn.Module):
    """MobileNet-V3-Small for small images (about 1.5 M parameters at width 1 with 10 classes)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 image_size: int = 32) -> None:
        super().__init__()
        cin = _divisible(16 * width)
        layers: list[nn.Module] = _conv_bn(in_channels, cin, 3, 1, act=nn.Hardswish)
        for k, exp, out, se, hswish, stride in _CFG:
            cout = _divisible(out * width)
            layers.append(InvertedResidual(cin, _divisible(exp * width), cout, k, se, hswish, stride))
            cin = cout
        last = _divisible(576 * width)
        layers += _conv_bn(cin, last, 1, act=nn.Hardswish)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = _divisible(1024 * width)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(last, hidden), nn.Hardswish(), nn.Dropout(0.2),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))
