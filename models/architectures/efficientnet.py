"""EfficientNet-B0 (Tan & Le, 2019) with fewer repeats per stage and CIFAR-style strides.

MBConv blocks keep the published ops: 1x1 expansion, depthwise kxk, squeeze-excitation
(SiLU then Sigmoid), 1x1 projection, SiLU everywhere and a residual where shapes allow.
Stochastic depth is left out: it is the identity at inference, which is all an
exported graph sees.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# (expansion, kernel, stride, channels, repeats) of B0's seven stages. The paper repeats them
# (1, 2, 2, 3, 3, 4, 1) times; fewer repeats keep an epoch on a CPU short. The stem has stride 1
# (paper: 2) and the sixth stage too (paper: 2), so 32x32 inputs are downsampled three times, to 4x4.
_CFG = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 1), (6, 5, 2, 40, 2), (6, 3, 2, 80, 2), (6, 5, 1, 112, 2),
        (6, 5, 1, 192, 1), (6, 3, 1, 320, 1)]


def _divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10% below `value`."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.SiLU())
    return layers


class SqueezeExcite(nn.Module):
    """Channel gate sized from the block's input width (a quarter of it), as in EfficientNet."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation."""

    def __init__(self, cin: int, cout: int, expansion: int, k: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += _conv_bn(cin, hidden, 1)
        layers += _conv_bn(hidden, hidden, k, stride, groups=hidden)
        layers.append(SqueezeExcite(hidden, max(1, cin // 4)))
        layers += _conv_bn(hidden, cout, 1, act=False)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class EfficientNetB0(nn.Module):
    """EfficientNet-B0 stages at reduced depth for small images."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 image_size: int = 32) -> None:
        super().__init__()
        cin = _divisible(32 * width)
        layers: list[nn.Module] = _conv_bn(in_channels, cin, 3, 1)
        for t, k, s, c, n in _CFG:
            cout = _divisible(c * width)
            for i in range(n):
                layers.append(MBConv(cin, cout, t, k, s if i == 0 else 1))
                cin = cout
        last = _divisible(1280 * width)
        layers += _conv_bn(cin, last, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))
