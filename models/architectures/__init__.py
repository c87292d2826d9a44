"""Architectures, by name. Each takes in_channels, num_classes, width and image_size."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from models.architectures.alexnet import AlexNet
from models.architectures.convnext import ConvNeXt
from models.architectures.efficientnet import EfficientNetB0
from models.architectures.mobilenet_v2 import MobileNetV2
from models.architectures.mobilenet_v3 import MobileNetV3Small
from models.architectures.regnet import RegNetY
from models.architectures.resnet import ResNet18, ResNet50
from models.architectures.shufflenet_v2 import ShuffleNetV2
from models.architectures.small_cnn import SmallCNN
from models.architectures.squeezenet import SqueezeNet
from models.architectures.vgg import VGG16
from models.architectures.vit import ViTTiny
from pipeline.base.errors import EfrapError

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "vgg16": VGG16,
    "mobilenet_v2": MobileNetV2,
    "alexnet": AlexNet,
    "mobilenet_v3_small": MobileNetV3Small,
    "efficientnet_b0": EfficientNetB0,
    "shufflenet_v2": ShuffleNetV2,
    "regnet": RegNetY,
    "squeezenet": SqueezeNet,
    "vit_tiny": ViTTiny,
    "convnext_tiny": ConvNeXt,
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
