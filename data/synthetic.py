"""A synthetic, class-structured image set for smoke tests and the CPU default: no files at all.

Each class owns a fixed random prototype: a smooth (low-frequency) colour pattern plus a faint
class colour cast. A sample is its class prototype seen through a random window (a shift of up to
image_size / 8 pixels), with random contrast, overlaid with a random smooth distractor pattern and
per-pixel noise. The distractor keeps the task from being solved by averaging pixels, so accuracy
keeps improving over several epochs instead of saturating at once. Measured with ResNet-20 on the
default 2048 / 512 images (chance: 10%): one epoch at batch 64 (SGD, lr 0.05) reaches about 80%
validation accuracy; at batch 128 and lr 0.1 (16 steps, too few for BatchNorm's running statistics
to settle) about 30% after one epoch and over 90% after three.
Everything is drawn from one seeded CPU generator, so a seed gives the same images on any machine.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from .augment import crop_at

_PATTERN_GRID = 4  # prototype detail: a 4x4 grid of random colours, smoothly interpolated
_COLOUR_CAST = 0.3  # spread of the per-class colour offset, relative to the pattern's
_DISTRACTOR = 0.6  # strength of the per-sample smooth pattern that is unrelated to the class
_PIXEL_NOISE = 0.5
_CHUNK_ELEMENTS = 1 << 25  # floats per generation chunk: bounds the temporary memory (128 MiB)


class SyntheticImages(Dataset):
    """uint8 images held in memory; ``transform`` receives a float (3, H, W) tensor in [0, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str],
                 transform: Optional[Callable] = None):
        self.images = images
        self.labels = labels
        self.targets = labels.tolist()
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        image = self.images[index].float() / 255.0
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def _upsample(grid: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)


def smooth_patterns(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 3, size, size) random low-frequency colour patterns with roughly unit spread."""
    return _upsample(torch.randn(count, 3, _PATTERN_GRID, _PATTERN_GRID, generator=generator), size)


class ClassPrototypes:
    """Per class: a coarse colour grid (its smooth pattern, once upsampled) and a colour cast.
    Kept coarse and upsampled per chunk of samples, so 1000 classes at 224 pixels cost nothing."""

    def __init__(self, num_classes: int, generator: torch.Generator):
        self.grids = torch.randn(num_classes, 3, _PATTERN_GRID, _PATTERN_GRID, generator=generator)
        self.casts = _COLOUR_CAST * torch.randn(num_classes, 3, 1, 1, generator=generator)

    def render(self, labels: torch.Tensor, size: int) -> torch.Tensor:
        """(len(labels), 3, size, size): each label's prototype."""
        return _upsample(self.grids[labels], size) + self.casts[labels]


def generate_samples(prototypes: ClassPrototypes, labels: torch.Tensor, image_size: int, max_shift: int,
                     generator: torch.Generator) -> torch.Tensor:
    """uint8 (N, 3, image_size, image_size): prototypes shifted by up to ``max_shift`` pixels,
    contrast-jittered, under a random distractor pattern and pixel noise."""
    canvas = image_size + 2 * max_shift
    chunk = max(1, _CHUNK_ELEMENTS // (3 * canvas * canvas))
    out = torch.empty(labels.numel(), 3, image_size, image_size, dtype=torch.uint8)
    for start in range(0, labels.numel(), chunk):
        chunk_labels = labels[start:start + chunk]
        n = chunk_labels.numel()
        top = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
        images = crop_at(prototypes.render(chunk_labels, canvas), top, left, image_size, image_size)
        contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=generator)
        distractor = smooth_patterns(n, image_size, generator)
        noise = torch.randn(images.shape, generator=generator)
        # pixels = 0.5 + 0.2 * (contrast * prototype + distractor + noise), in place: big images are big
        pixels = images.mul_(contrast).add_(distractor, alpha=_DISTRACTOR).add_(noise, alpha=_PIXEL_NOISE)
        pixels.mul_(0.2).add_(0.5).clamp_(0, 1).mul_(255).round_()
        out[start:start + n] = pixels  # the cast to uint8 happens in the copy
    return out


def balanced_labels(count: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Every class equally often (up to one), in random order."""
    labels = torch.arange(count) % num_classes
    return labels[torch.randperm(count, generator=generator)]


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units, a chunk at a time (no float copy
    of the whole set)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(256):
        values = chunk.double().div_(255)
        total += values.sum((0, 2, 3))
        squares += values.square_().sum((0, 2, 3))
    count = images.numel() // images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def build_synthetic(num_classes: int = 10, image_size: int = 32, train_size: int = 2048,
                    val_size: int = 512, seed: int = 0) -> tuple[SyntheticImages, SyntheticImages]:
    """Train and validation sets drawn from the same class prototypes with independent samples."""
    if num_classes < 2 or image_size < 8 or train_size < 1 or val_size < 1:
        raise ValueError("synthetic data needs num_classes >= 2, image_size >= 8, train_size, val_size >= 1; "
                         f"got {num_classes}, {image_size}, {train_size}, {val_size}")
    generator = torch.Generator().manual_seed(seed)
    max_shift = max(1, image_size // 8)
    prototypes = ClassPrototypes(num_classes, generator)
    splits = []
    for size in (train_size, val_size):
        labels = balanced_labels(size, num_classes, generator)
        splits.append((generate_samples(prototypes, labels, image_size, max_shift, generator), labels))
    # Normalise with the training set's own statistics, as one would for a real data set.
    mean, std = channel_stats(splits[0][0])
    transform = T.Normalize(mean, std)
    classes = [f"class_{i}" for i in range(num_classes)]
    train, val = (SyntheticImages(images, labels, classes, transform) for images, labels in splits)
    return train, val
