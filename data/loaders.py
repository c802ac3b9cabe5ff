"""``build_loaders``: the training and validation loaders for a pair of datasets.

Small image sets on a GPU go through ``DeviceLoader`` (decoded once, augmented on the device);
everything else through a torch ``DataLoader``. Both yield (float32 images, int64 labels); the
DataLoader's batches are still on the CPU (pinned on CUDA, so the trainer can copy them with
``non_blocking=True``), the DeviceLoader's are already on the device.

Under data parallelism (``rank``, ``world_size``) each process loads its own shard. Every rank shuffles
the training set with the same permutation, a function of (seed, epoch), and takes every world_size-th
sample of it, so the union of the ranks' batches is the batch a single process would draw with
``batch_size x world_size``; each validation sample goes to exactly one rank.
"""
from __future__ import annotations

import hashlib
import random
from typing import Union

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .on_device import DeviceLoader, UnsupportedTransform, augmentation_from_transform, dataset_transform

# "auto" puts a training set on the device up to this many images of at most this side.
AUTO_MAX_IMAGES = 100_000
AUTO_MAX_SIDE = 64


def _as_choice(on_device: Union[str, bool]) -> Union[str, bool]:
    """True / False / "auto"; strings as a config file might spell them are accepted too."""
    if isinstance(on_device, bool):
        return on_device
    text = str(on_device).strip().lower()
    if text in ("auto", "true", "false"):
        return {"true": True, "false": False}.get(text, "auto")
    raise ValueError(f"dataset.on_device={on_device!r} is not allowed: use true, false or auto")


def fits_on_device(dataset: Dataset) -> bool:
    """Small enough, small images, and a transform the device loader can reproduce."""
    if len(dataset) > AUTO_MAX_IMAGES:
        return False
    image = dataset[0][0]
    if not isinstance(image, torch.Tensor) or max(image.shape[-2:]) > AUTO_MAX_SIDE:
        return False
    try:
        augmentation_from_transform(dataset_transform(dataset), image.shape[-2:])
    except UnsupportedTransform:
        return False
    return True


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: a hash of (seed, epoch, index), so neighbours differ."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for each index of ``sampler``: the worker that loads a sample learns
    which epoch it belongs to, even a persistent worker started epochs ago."""

    def __init__(self, sampler: Sampler[int]):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededSamples(Dataset):
    """``dataset[index]`` with its random transforms drawn from ``sample_seed(seed, epoch, index)``.

    The augmentation of a sample is then a function of (seed, epoch, index) alone: not of which
    worker loads it, of how many workers there are, or of what a worker loaded before. A run resumed
    mid-way with fresh workers therefore sees exactly the images of an uninterrupted run. The
    process's own random state is left as it was (torchvision's transforms draw from torch's global
    generator and Python's ``random``; both are forked around the call).
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        seed = sample_seed(self.seed, epoch, index)
        saved = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)  # the CPU generator alone (torch.manual_seed: 200 us)
                random.seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(saved)

    def __getattr__(self, name):  # classes, targets, transform ... of the wrapped data set
        if name in ("dataset", "seed") or name.startswith("__"):  # not while unpickling; no dunders
            raise AttributeError(name)
        return getattr(self.dataset, name)


class EvalShard(Sampler[int]):
    """Indices rank, rank + world_size, ...: every sample on exactly one rank, none repeated (unlike
    DistributedSampler, which pads), so that sums over ranks count each validation sample once."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(train_ds: Dataset, val_ds: Dataset, batch_size: int, num_workers: int = 0,
                  device: Union[str, torch.device] = "cpu", on_device: Union[str, bool] = "auto",
                  seed: int = 0, *, val_batch_size: Union[int, None] = None, drop_last: bool = False,
                  channels_last: bool = False, rank: int = 0, world_size: int = 1):
    """(train_loader, val_loader).

    on_device: True -> DeviceLoaders; False -> DataLoaders; "auto" -> DeviceLoaders when ``device``
        is CUDA and the training set has at most 100k images of at most 64 pixels a side.
    num_workers: DataLoader workers (kept alive between epochs), or the decoding processes of the
        one-time decode for DeviceLoaders.
    seed: fixes the training order and the augmentation (DataLoaders: each sample's from
        (seed + rank, epoch, index); DeviceLoaders: one generator per epoch).
    drop_last: drop the last incomplete training batch. channels_last: DeviceLoaders only.
    rank, world_size: this process's shard (see above); augmentation is drawn from ``seed + rank``.
        The training order is then reshuffled by the trainer each epoch: ``set_epoch`` on the
        DataLoader's sampler, a reseed of the DeviceLoader's ``order_generator``.
    """
    device = torch.device(device)
    choice = _as_choice(on_device)
    if choice == "auto":
        choice = device.type == "cuda" and fits_on_device(train_ds)
    val_batch_size = val_batch_size or batch_size
    if choice:
        common = dict(device=device, channels_last=channels_last, seed=seed + rank, order_seed=seed,
                      num_workers=num_workers, rank=rank, world_size=world_size)
        return (DeviceLoader.from_dataset(train_ds, batch_size, train=True, drop_last=drop_last, **common),
                DeviceLoader.from_dataset(val_ds, val_batch_size, train=False, **common))

    common = dict(num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
    # The sampler draws epoch e's permutation from seed * 1000 + e (as the DeviceLoader's order on the
    # CPU), for one process as for many; it pads the permutation so all ranks take as many steps.
    sampler = DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed * 1000)
    # Each sample's augmentation is drawn from (seed + rank, epoch, index) (SeededSamples), so it does
    # not depend on the workers' own random state, which a resumed run could not restore.
    train_loader = DataLoader(SeededSamples(train_ds, seed + rank), batch_size, sampler=EpochSampler(sampler),
                              drop_last=drop_last, generator=torch.Generator().manual_seed(seed + rank), **common)
    val_loader = DataLoader(val_ds, val_batch_size, sampler=EvalShard(len(val_ds), rank, world_size), **common)
    return train_loader, val_loader
