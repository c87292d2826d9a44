"""A small ConvNeXt (Liu et al., 2022) for 32x32 inputs.

Blocks keep the published design: depthwise 7x7 conv, LayerNorm over channels
(channels-last), pointwise Linear with 4x expansion, GELU, Linear back, a learned
per-channel layer scale and the residual. Between stages a channels-first
LayerNorm and a 2x2 stride-2 conv downsample. The patchify stem uses 2x2 patches
(paper: 4x4) so that 32x32 inputs are not cut to 8x8 at once.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# ConvNeXt-T has depths (3, 3, 9, 3) and widths (96, 192, 384, 768); this keeps the 1:1:3:1 ratio.
_DEPTHS = (1, 1, 3, 1)
_DIMS = (32, 64, 128, 256)
_STEM_PATCH = 2
_LAYER_SCALE_INIT = 1e-6


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor, written out as in the reference release."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear (4x) -> GELU -> Linear -> layer scale, plus the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), _LAYER_SCALE_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # NHWC: Linear and LayerNorm act on the channels
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """ConvNeXt with four stages at reduced depth and width (`width` scales the stage widths)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 image_size: int = 32) -> None:
        super().__init__()
        dims = [max(8, round(d * width)) for d in _DIMS]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, dims[0], _STEM_PATCH, _STEM_PATCH),
                                   LayerNorm2d(dims[0])]
        for i, (dim, depth) in enumerate(zip(dims, _DEPTHS, strict=True)):
            if i > 0:
                layers += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, 2)]
            layers += [ConvNeXtBlock(dim) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean((-2, -1))  # global average pooling
        return self.head(self.norm(x))
