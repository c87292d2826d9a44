"""A small RegNetY (Radosavovic et al., 2020): RegNetY-200MF's widths at reduced depth.

Y blocks are residual bottlenecks (ratio 1): 1x1 conv, 3x3 group conv with a fixed
group width, squeeze-excitation, 1x1 conv, then the shortcut (1x1 conv with stride
when the shape changes) and ReLU. The stem and the first stage keep stride 1 so
that 32x32 inputs end on a 4x4 map.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# RegNetY-200MF: stage widths, group width 8, SE ratio 0.25 of the block's input width.
# Its depths are (1, 1, 4, 7); two blocks in the last stages are enough for 32x32 inputs.
_WIDTHS = (24, 56, 152, 368)
_DEPTHS = (1, 1, 2, 2)
_GROUP_WIDTH = 8
_SE_RATIO = 0.25


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return layers


class SqueezeExcite(nn.Module):
    """Channel gate: global average, 1x1 reduce, ReLU, 1x1 expand, Sigmoid, multiply."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class YBlock(nn.Module):
    """Residual bottleneck with a group conv (groups of `_GROUP_WIDTH` channels) and SE."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            *_conv_bn(cin, cout, 1),
            *_conv_bn(cout, cout, 3, stride, groups=cout // _GROUP_WIDTH),
            SqueezeExcite(cout, max(1, round(cin * _SE_RATIO))),
            *_conv_bn(cout, cout, 1, act=False),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride, act=False))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.block(x) + self.shortcut(x))


class RegNetY(nn.Module):
    """RegNetY-200MF-like network for small images (widths scaled by `width`)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 image_size: int = 32) -> None:
        super().__init__()
        cin = max(8, round(32 * width))
        layers: list[nn.Module] = _conv_bn(in_channels, cin, 3, 1)
        for i, (w, depth) in enumerate(zip(_WIDTHS, _DEPTHS, strict=True)):
            # Multiples of the group width, so that every group conv has whole groups.
            cout = max(_GROUP_WIDTH, round(w * width / _GROUP_WIDTH) * _GROUP_WIDTH)
            for j in range(depth):
                layers.append(YBlock(cin, cout, 2 if j == 0 and i > 0 else 1))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))
