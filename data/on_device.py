"""A loader for small image sets that lives entirely on the training device.

``DeviceLoader.from_dataset`` decodes a dataset once into a uint8 (N, 3, H, W) tensor and its
labels on the device; every epoch then shuffles, crops, flips and normalises whole batches with
tensor ops, so no worker processes, host-to-device copies or per-image Python run during training.
CIFAR-10 takes 150 MB as uint8.

The augmentation is not configured separately: it is read off the dataset's own torchvision
transform (RandomCrop padding, RandomHorizontalFlip probability, Normalize statistics), so the
on-device path applies the same recipe as the DataLoader path. A transform with any other step
(RandomResizedCrop, ColorJitter, ...) raises ``UnsupportedTransform``.
Batches are float32 (the trainer's autocast casts them further), optionally channels_last.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from .augment import random_crop, random_horizontal_flip
from .synthetic import SyntheticImages

Device = Union[str, torch.device]


class UnsupportedTransform(ValueError):
    """The dataset's transform has a step the device loader cannot reproduce."""


@dataclass(frozen=True)
class Augmentation:
    """What the device loader does to each batch: crop, then flip, then normalise."""

    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    crop_padding: int = 0  # zero-pad, then crop back to the original size at a random offset
    flip_p: float = 0.0  # probability of a horizontal flip


_NEUTRAL_STEPS = (T.ToTensor, T.PILToTensor, T.ConvertImageDtype)


def _uniform_padding(padding) -> int:
    values = [padding] if isinstance(padding, int) else list(padding)
    if len(set(values)) != 1:
        raise UnsupportedTransform(f"RandomCrop padding {padding!r} is not the same on every side")
    return int(values[0])


def augmentation_from_transform(transform, image_size: Optional[Sequence[int]] = None) -> Augmentation:
    """Read crop / flip / normalisation off a torchvision transform for images of (H, W)
    ``image_size`` (None: not known yet; the crop size is then not checked)."""
    steps = transform.transforms if isinstance(transform, T.Compose) else ([] if transform is None else [transform])
    found: dict = {}
    for step in steps:
        if isinstance(step, (T.RandomCrop, T.RandomHorizontalFlip)) and "mean" in found:
            raise UnsupportedTransform(f"{step!r} comes after Normalize; the device loader normalises last")
        if isinstance(step, T.RandomCrop):
            wrong_size = image_size is not None and tuple(step.size) != tuple(image_size)
            if wrong_size or step.padding_mode != "constant" or step.fill != 0:
                raise UnsupportedTransform(f"{step!r}: only a zero-padded crop back to the image size "
                                           f"{image_size} runs on the device")
            found["crop_padding"] = _uniform_padding(step.padding or 0)
        elif isinstance(step, T.RandomHorizontalFlip):
            found["flip_p"] = float(step.p)
        elif isinstance(step, T.Normalize):
            found["mean"], found["std"] = tuple(map(float, step.mean)), tuple(map(float, step.std))
        elif not isinstance(step, _NEUTRAL_STEPS):
            raise UnsupportedTransform(f"the device loader cannot reproduce {step!r}")
    return Augmentation(**found)


# -------------------------------------------------------------------------------------- decoding
def _base_and_indices(dataset: Dataset) -> tuple[Dataset, Optional[list[int]]]:
    """Unwrap (nested) Subsets to the underlying dataset and the indices into it."""
    indices = None
    while isinstance(dataset, Subset):
        step = list(dataset.indices)
        indices = step if indices is None else [step[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def dataset_transform(dataset: Dataset):
    base, _ = _base_and_indices(dataset)
    if not hasattr(base, "transform"):
        raise UnsupportedTransform(f"{type(base).__name__} has no transform attribute to read the recipe from")
    return base.transform


def _in_memory_uint8(dataset: Dataset) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Data sets that already hold uint8 arrays: no decoding needed."""
    if isinstance(dataset, SyntheticImages):
        return dataset.images, dataset.labels
    if isinstance(dataset, tv_datasets.CIFAR10):  # CIFAR100 derives from it
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(dataset.targets)
    return None


def _stack_equal_sizes(batch):
    images, labels = zip(*batch)
    if len({image.shape for image in images}) != 1:
        raise ValueError("images of different sizes cannot live in one device tensor; "
                         "use the DataLoader path (on_device=false)")
    return torch.stack(images), torch.tensor(labels)


def decode_uint8(dataset: Dataset, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, 3, H, W), int64 (N,)) on the CPU: the dataset's images before any transform."""
    base, indices = _base_and_indices(dataset)
    held = _in_memory_uint8(base)
    if held is not None:
        images, labels = held
        if indices is not None:
            index = torch.tensor(indices, dtype=torch.long)
            images, labels = images[index], labels[index]
        return images, labels.long()
    if not hasattr(base, "transform"):
        raise UnsupportedTransform(f"cannot decode {type(base).__name__}: it has no transform to replace")
    raw = copy.copy(base)  # a shallow copy: the caller's dataset keeps its transform
    raw.transform = T.PILToTensor()
    if indices is not None:
        raw = Subset(raw, indices)
    loader = DataLoader(raw, batch_size=512, num_workers=num_workers, collate_fn=_stack_equal_sizes)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels).long()


# ---------------------------------------------------------------------------------------- loader
class DeviceLoader:
    """Batches of (float32 images, int64 labels) from uint8 images held on ``device``.

    shuffle: a new permutation each epoch (training); otherwise the stored order (evaluation).
    augmentation: crop / flip / normalisation applied to each batch on the device.
    seed: fixes the whole sequence of epochs: permutations, crops and flips.
    rank, world_size: this process's share of each epoch under data parallelism. Every rank draws the
        same permutation (from ``order_seed``, default ``seed``; ``order_generator``) and takes every
        world_size-th sample of it from ``rank``; crops and flips come from ``seed`` (``generator``), so
        give each rank its own. A shuffling (training) loader pads the permutation by wrapping around,
        so every rank yields the same number of batches; an evaluation loader gives each sample to
        exactly one rank. With one process, one generator draws everything, as ``seed`` alone says.
    ``len()`` is the number of batches per epoch; ``dataset`` is the source dataset, if known.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 augmentation: Augmentation = Augmentation(), device: Device = "cpu", shuffle: bool = False,
                 drop_last: bool = False, channels_last: bool = False, seed: int = 0,
                 dataset: Optional[Dataset] = None, rank: int = 0, world_size: int = 1,
                 order_seed: Optional[int] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.long)
        self.batch_size = batch_size
        self.augmentation = augmentation
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.dataset = dataset
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.order_generator = self.generator if world_size == 1 else \
            torch.Generator(device=self.device).manual_seed(seed if order_seed is None else order_seed)
        channels = images.shape[1]
        mean = torch.tensor(augmentation.mean, dtype=torch.float32, device=self.device).view(1, channels, 1, 1)
        std = torch.tensor(augmentation.std, dtype=torch.float32, device=self.device).view(1, channels, 1, 1)
        # (x / 255 - mean) / std as one multiply and one subtract per batch
        self._scale = 1.0 / (255.0 * std)
        self._shift = mean / std

    @classmethod
    def from_dataset(cls, dataset: Dataset, batch_size: int, *, device: Device = "cpu", train: bool = True,
                     drop_last: bool = False, channels_last: bool = False, seed: int = 0,
                     num_workers: int = 0, rank: int = 0, world_size: int = 1,
                     order_seed: Optional[int] = None) -> "DeviceLoader":
        """Decode ``dataset`` once (using ``num_workers`` processes) and reproduce its transform on
        the device; ``train`` shuffles each epoch (the augmentation comes from the transform itself)."""
        transform = dataset_transform(dataset)
        augmentation_from_transform(transform)  # refuse an unsupported recipe before decoding anything
        images, labels = decode_uint8(dataset, num_workers)
        augmentation = augmentation_from_transform(transform, tuple(images.shape[-2:]))
        return cls(images, labels, batch_size, augmentation=augmentation, device=device, shuffle=train,
                   drop_last=drop_last if train else False, channels_last=channels_last, seed=seed,
                   dataset=dataset, rank=rank, world_size=world_size, order_seed=order_seed)

    @property
    def num_samples(self) -> int:
        """The samples this rank yields per epoch (all of them in one process)."""
        total = self.images.shape[0]
        if self.shuffle:
            return -(-total // self.world_size)
        return len(range(self.rank, total, self.world_size))

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        total = self.images.shape[0]
        if self.shuffle:
            order = torch.randperm(total, generator=self.order_generator, device=self.device)
            padded = self.num_samples * self.world_size
            order = order.repeat(-(-padded // total))[:padded]
        else:
            order = torch.arange(total, device=self.device)
        order = order[self.rank::self.world_size]
        for batch in range(len(self)):
            index = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            yield self._prepare(self.images[index]), self.labels[index]

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        aug = self.augmentation
        if aug.crop_padding:
            images = random_crop(images, aug.crop_padding, self.generator)
        if aug.flip_p:
            images = random_horizontal_flip(images, self.generator, aug.flip_p)
        out = images.float().mul_(self._scale).sub_(self._shift)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out
