"""Data sets and loaders.

- ``build_datasets(name, **kwargs) -> (train_ds, val_ds, info)``: synthetic, cifar10, cifar100,
  imagefolder, lmdb, imagenet (see ``data.builders``).
- ``build_loaders(train_ds, val_ds, batch_size, num_workers, device, on_device, seed, ...)``:
  DataLoaders, or ``DeviceLoader``s that keep small image sets on the GPU (see ``data.loaders``).
- ``sample_batch(dataset, count)``: a fixed batch spread over a data set (for measurements).
- ``data/folder2lmdb.py``: converts an ImageFolder split into the LMDB format that
  ``data.lmdb_dataset.LMDBImageDataset`` reads (both import the lmdb package; nothing else here does).
"""
from .builders import DATASET_NAMES, build_datasets
from .loaders import build_loaders
from .on_device import DeviceLoader, UnsupportedTransform
from .sampling import sample_batch

__all__ = ["DATASET_NAMES", "build_datasets", "build_loaders", "DeviceLoader", "UnsupportedTransform", "sample_batch"]
