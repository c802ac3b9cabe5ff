"""A few hundred training steps of a small CNN with DIVISION track plain training's loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import division
from data import build_datasets, sample_batch

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BATCH = 240, 32


def small_cnn() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def loss_curve(method: str, images: torch.Tensor, labels: torch.Tensor, steps: int = STEPS, **knobs) -> list[float]:
    torch.manual_seed(0)
    model = small_cnn()
    division.build_method(method, **knobs).attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        index = torch.randint(0, len(images), (BATCH,), generator=order)
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def windows(curve: list[float], size: int = 40) -> list[float]:
    return [sum(curve[i:i + size]) / size for i in range(0, len(curve), size)]


def tracks(curve: list[float], reference: list[float]) -> bool:
    """Every 40-step window's mean loss within 20% (+0.01) of the reference's."""
    return all(abs(c - r) <= 0.2 * r + 0.01 for c, r in zip(windows(curve), windows(reference)))


def test_division_tracks_plain_training():
    train, _, _ = build_datasets("synthetic", num_classes=10, image_size=16, train_size=1024, val_size=16)
    images, labels = sample_batch(train, len(train))
    plain = loss_curve("none", images, labels)
    assert windows(plain)[-1] < 0.1 * windows(plain)[0], "the reference run must learn"
    # Measured (B=8, Q=2): window means 1.237 0.200 0.064 0.042 0.034 0.020 against plain's
    # 1.245 0.204 0.064 0.035 0.032 0.022.
    assert tracks(loss_curve("division", images, labels, block_size=8, bits=2, backend="torch"), plain)
    # The comparison can tell: keeping only the block means (no HFC) trains visibly worse
    # (measured 1.868 1.392 1.116 0.875 0.743 0.646). Its first two windows are enough to show it
    # (``tracks`` compares the windows both curves have: fewer windows, a stricter "does not track").
    assert not tracks(loss_curve("division", images, labels, steps=80, block_size=8, keep_hfc=False,
                                 backend="torch"), plain)
