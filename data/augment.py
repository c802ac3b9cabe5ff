"""Batched image operations on (N, C, H, W) tensors (uint8 or float), on whatever device they live on.

They draw their randomness from an explicit ``torch.Generator`` (on the tensors' device) so that a
seed fixes every crop and flip.
"""
from __future__ import annotations

import torch


def crop_at(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop image i at rows top[i]:top[i]+height and columns left[i]:left[i]+width, all at once."""
    n, c = images.shape[:2]
    device = images.device
    rows = top.view(n, 1) + torch.arange(height, device=device)  # (N, height)
    cols = left.view(n, 1) + torch.arange(width, device=device)  # (N, width)
    return images[
        torch.arange(n, device=device).view(n, 1, 1, 1),
        torch.arange(c, device=device).view(1, c, 1, 1),
        rows.view(n, 1, height, 1),
        cols.view(n, 1, 1, width),
    ]


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` on every side, then take a random crop of the original size
    (what torchvision's ``RandomCrop(size, padding)`` does to each image)."""
    if padding == 0:
        return images
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=images.device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=images.device)
    return crop_at(padded, top, left, h, w)


def random_horizontal_flip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)

