"""Model zoo: ``build_model(name, num_classes)`` for the CIFAR (32x32) and ImageNet (224x224) models.

``MODEL_INFO[name]`` says which input the model was designed for: its family ("cifar" or
"imagenet") and its image size.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .cifar_densenet import densenet121
from .cifar_resnet import resnet18, resnet20
from .imagenet import densenet161, resnet50, wrn50_2
from .preact_resnet import resnet164
from .vit import vit_cifar

_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": resnet20,
    "resnet18": resnet18,
    "resnet164": resnet164,
    "densenet121": densenet121,
    "vit_cifar": vit_cifar,
    "resnet50": resnet50,
    "densenet161": densenet161,
    "wrn50_2": wrn50_2,
}

_CIFAR = {"family": "cifar", "image_size": 32}
_IMAGENET = {"family": "imagenet", "image_size": 224}

MODEL_INFO: dict[str, dict] = {
    "resnet20": dict(_CIFAR),
    "resnet18": dict(_CIFAR),
    "resnet164": dict(_CIFAR),
    "densenet121": dict(_CIFAR),
    "vit_cifar": dict(_CIFAR),
    "resnet50": dict(_IMAGENET),
    "densenet161": dict(_IMAGENET),
    "wrn50_2": dict(_IMAGENET),
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model ``name`` with a ``num_classes``-way linear head."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return builder(num_classes)


__all__ = ["build_model", "MODEL_NAMES", "MODEL_INFO"]
