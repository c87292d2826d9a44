"""A small CNN for 28x28 grey images: the demo's default, trains in minutes on a CPU."""

from __future__ import annotations

import torch
import torch.nn as nn


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv32, pool, conv64, pool, conv64, fc128, fc (channels scaled by `width`).

    Pooling right after the first conv keeps the cost near 6 M multiply-adds per
    28x28 image, so a few epochs fit in minutes on two CPU cores.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: float = 1.0,
                 image_size: int = 28) -> None:
        super().__init__()
        c1, c2 = max(4, round(32 * width)), max(8, round(64 * width))
        hidden = max(16, round(128 * width))
        self.features = nn.Sequential(
            *_block(in_channels, c1), nn.MaxPool2d(2),
            *_block(c1, c2), nn.MaxPool2d(2),
            *_block(c2, c2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * side * side, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
