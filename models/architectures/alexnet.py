"""AlexNet adapted to small images (3x3 kernels, three poolings, a small classifier)."""

from __future__ import annotations

import torch.nn as nn


class AlexNet(nn.Module):
    """Five conv layers and three fully connected layers, scaled by `width`."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 image_size: int = 32) -> None:
        super().__init__()
        c = [max(8, round(v * width)) for v in (64, 192, 384, 256, 256)]
        hidden = max(16, round(1024 * width))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c[0], 3, 1, 1), nn.BatchNorm2d(c[0]), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c[0], c[1], 3, 1, 1), nn.BatchNorm2d(c[1]), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c[1], c[2], 3, 1, 1), nn.BatchNorm2d(c[2]), nn.ReLU(inplace=True),
            nn.Conv2d(c[2], c[3], 3, 1, 1), nn.BatchNorm2d(c[3]), nn.ReLU(inplace=True),
            nn.Conv2d(c[3], c[4], 3, 1, 1), nn.BatchNorm2d(c[4]), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c[4] * side * side, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
