"""Architectures, by name. Each takes in_channels, num_classes, width and image_size."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from models.architectures.alexnet import AlexNet
from models.architectures.mobilenet_v2 import MobileNetV2
from models.architectures.resnet import ResNet18
from models.architectures.small_cnn import SmallCNN
from models.architectures.vgg import VGG16
from pipeline.errors import EfrapError

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": ResNet18,
    "vgg16": VGG16,
    "mobilenet_v2": MobileNetV2,
    "alexnet": AlexNet,
}


def build_model(arch: str, in_channels: int = 1, num_classes: int = 10, width: float = 1.0,
                image_size: int = 28) -> nn.Module:
    """Build an architecture by name.

    Raises:
        EfrapError: unknown name or invalid width.
    """
    if arch not in ARCHITECTURES:
        raise EfrapError(f"unknown architecture '{arch}': choose from {', '.join(ARCHITECTURES)}")
    if width <= 0:
        raise EfrapError(f"width must be positive, got {width}")
    return ARCHITECTURES[arch](in_channels=in_channels, num_classes=num_classes, width=width,
                               image_size=image_size)
