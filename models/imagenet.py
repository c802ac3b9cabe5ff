"""ImageNet-size (224x224) models, taken from torchvision with random weights.

``weights=None`` everywhere: nothing is ever downloaded. torchvision's ResNets use ``nn.ReLU``
modules (one instance per block, called more than once); its DenseNet applies a functional ReLU
once before the classifier, which module hooks therefore do not see.
"""
from __future__ import annotations

from torch import nn
from torchvision import models as tv_models


def resnet50(num_classes: int = 1000) -> nn.Module:
    return tv_models.resnet50(weights=None, num_classes=num_classes)


def densenet161(num_classes: int = 1000) -> nn.Module:
    return tv_models.densenet161(weights=None, num_classes=num_classes)


def wrn50_2(num_classes: int = 1000) -> nn.Module:
    return tv_models.wide_resnet50_2(weights=None, num_classes=num_classes)
