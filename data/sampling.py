"""A fixed batch drawn from a data set, for measurements that must see the same images every time."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset


def sample_batch(dataset: Dataset, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` items spread evenly over ``dataset`` (class-sorted sets: over the classes), stacked."""
    count = min(count, len(dataset))
    index = torch.linspace(0, len(dataset) - 1, count).long().tolist()
    images, labels = zip(*(dataset[i] for i in index))
    return torch.stack(images), torch.tensor(labels)
