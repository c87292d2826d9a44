"""SqueezeNet 1.1 (Iandola et al., 2016) with a stride-1 stem for small images.

Fire modules squeeze with a 1x1 conv and expand with parallel 1x1 and 3x3 convs
whose outputs are concatenated. There is no BatchNorm and no fully connected
layer: a 1x1 conv gives one map per class and global average pooling the logits.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# (squeeze, expand) channels of SqueezeNet 1.1's eight fire modules; "M" is a 3x3/2 max-pool.
_CFG: list[tuple[int, int] | str] = ["M", (16, 64), (16, 64), "M", (32, 128), (32, 128), "M",
                                     (48, 192), (48, 192), (64, 256), (64, 256)]


class Fire(nn.Module):
    """Squeeze (1x1), then expand with 1x1 and 3x3 convs side by side, concatenated."""

    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3 = nn.Conv2d(squeeze, expand, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.relu(self.squeeze(x))
        return torch.cat([self.relu(self.expand1(s)), self.relu(self.expand3(s))], dim=1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1 for small images; the paper's stride-2 stem is stride 1 here."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 image_size: int = 32) -> None:
        super().__init__()
        cin = max(8, round(64 * width))
        layers: list[nn.Module] = [nn.Conv2d(in_channels, cin, 3, padding=1), nn.ReLU(inplace=True)]
        for v in _CFG:
            if v == "M":
                # ceil_mode as in the original: 32 -> 16 -> 8 -> 4 (flooring would give 15 -> 7 -> 3).
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
                continue
            squeeze, expand = (max(4, round(c * width)) for c in v)
            layers.append(Fire(cin, squeeze, expand))
            cin = 2 * expand
        self.features = nn.Sequential(*layers)
        final = nn.Conv2d(cin, num_classes, 1)
        # The published classifier keeps a ReLU on the class maps before pooling.
        self.classifier = nn.Sequential(nn.Dropout(0.5), final, nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final:
                    # Small class maps at the start, so the ReLU does not silence most of them.
                    nn.init.normal_(m.weight, 0.0, 0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
