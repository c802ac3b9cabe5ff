"""The two standard augmentation recipes and the normalisation statistics they use.

- "cifar": RandomCrop(size, padding=4) + RandomHorizontalFlip for training; evaluation only
  converts and normalises. Images are expected at the model's size already (CIFAR is 32x32); a
  Resize is prepended only when the caller says the stored size differs.
- "imagenet": RandomResizedCrop(size) + RandomHorizontalFlip for training; Resize(size * 256/224)
  + CenterCrop(size) for evaluation.

``data.on_device`` reproduces the "cifar" training recipe with tensor ops, reading its parameters
from these very objects, so the two paths cannot drift apart.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torchvision import transforms as T

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TRANSFORM_KINDS = ("cifar", "imagenet")

# Images no larger than this get the CIFAR recipe when the caller does not choose one.
SMALL_IMAGE_LIMIT = 64


def cifar_transforms(train: bool, image_size: int = 32, mean: Sequence[float] = CIFAR10_MEAN,
                     std: Sequence[float] = CIFAR10_STD, stored_size: Optional[int] = None) -> T.Compose:
    steps = []
    if stored_size is not None and stored_size != image_size:
        steps.append(T.Resize((image_size, image_size)))
    if train:
        steps += [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip()]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def imagenet_transforms(train: bool, image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    if train:
        steps = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def default_transform_kind(image_size: int) -> str:
    return "cifar" if image_size <= SMALL_IMAGE_LIMIT else "imagenet"


def build_transforms(kind: str, train: bool, image_size: int, stored_size: Optional[int] = None) -> T.Compose:
    """The ``kind`` recipe ("cifar" or "imagenet") for the training or the evaluation split."""
    if kind == "cifar":
        return cifar_transforms(train, image_size, stored_size=stored_size)
    if kind == "imagenet":
        return imagenet_transforms(train, image_size)
    raise ValueError(f"unknown transforms {kind!r}; choose one of: {', '.join(TRANSFORM_KINDS)}")
