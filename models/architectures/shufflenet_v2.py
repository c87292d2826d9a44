"""ShuffleNet-V2 1.0x (Ma et al., 2018) with a CIFAR-style stem (stride 1, no max-pool).

Each unit splits the channels in two (torch.chunk), transforms one half with
1x1 -> depthwise 3x3 -> 1x1, concatenates, and shuffles the channels with
reshape -> transpose -> reshape; downsampling units feed both branches the
whole input instead of splitting it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# Output channels of stages 2-4 and their repeats at 1.0x; the first unit of each stage has stride 2.
_STAGES = [(116, 4), (232, 8), (464, 4)]


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return layers


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` equal groups: (g, c/g) -> (c/g, g)."""
    # Explicit sizes rather than unflatten: a static export then holds just Reshape, Transpose, Reshape.
    b, c, h, w = x.size(0), x.size(1), x.size(2), x.size(3)
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """One ShuffleNet-V2 unit; stride 2 downsamples and doubles the channels."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        # A stride-1 unit transforms half of its input; a stride-2 unit transforms all of it twice.
        source = cin if stride == 2 else cin // 2
        self.branch1 = nn.Sequential()
        if stride == 2:
            self.branch1 = nn.Sequential(*_conv_bn(cin, cin, 3, 2, groups=cin, act=False),
                                         *_conv_bn(cin, half, 1))
        self.branch2 = nn.Sequential(*_conv_bn(source, half, 1),
                                     *_conv_bn(half, half, 3, stride, groups=half, act=False),
                                     *_conv_bn(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            halves = x.chunk(2, dim=1)
            out = torch.cat([halves[0], self.branch2(halves[1])], dim=1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNet-V2 for small images; `width` scales the stage widths (1.0 is the paper's 1.0x)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 image_size: int = 32) -> None:
        super().__init__()
        cin = max(8, round(24 * width))
        layers: list[nn.Module] = _conv_bn(in_channels, cin, 3, 1)
        for channels, repeats in _STAGES:
            cout = max(8, 2 * round(channels * width / 2))  # even, so that the halves match
            for i in range(repeats):
                layers.append(ShuffleUnit(cin, cout, 2 if i == 0 else 1))
                cin = cout
        last = max(16, round(1024 * width))
        layers += _conv_bn(cin, last, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))
