"""Read a database written by ``data/folder2lmdb.py`` as an ImageFolder-like dataset.

LMDB refuses to open one environment twice in a process, and a handle inherited through fork must
not be used. So environments are shared per process through ``shared_environment``: opened lazily,
read-only and without the lock file, by the first reader in each process (each DataLoader worker
opens its own; the copy a forked worker inherits is closed first, which does not affect the
parent). The dataset object itself holds no handle, so it pickles for spawned workers as well.
Call ``release_environment`` before rewriting a database that this process has read.
"""
from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path
from typing import Callable, Optional, Union

import lmdb
from PIL import Image
from torch.utils.data import Dataset

from .folder2lmdb import (FORMAT, KEY_CLASSES, KEY_FORMAT, KEY_LABELS, KEY_LEN, KEY_PROGRESS, KEY_SOURCE,
                          LMDBRecordError, decode_labels, decode_record, record_key)

_environments: dict[str, tuple[int, lmdb.Environment]] = {}  # resolved path -> (owner pid, handle)
_environments_lock = threading.Lock()


def shared_environment(path: Union[str, Path]) -> lmdb.Environment:
    """This process's read-only handle on the database at ``path``."""
    key = str(Path(path).resolve())
    with _environments_lock:
        entry = _environments.get(key)
        if entry is not None and entry[0] == os.getpid():
            return entry[1]
        if entry is not None:
            entry[1].close()  # inherited through fork: release this process's copy before reopening
        env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False, subdir=True)
        _environments[key] = (os.getpid(), env)
        return env


def release_environment(path: Union[str, Path]) -> None:
    """Close this process's handle on ``path`` (if any), e.g. before the database is rewritten."""
    with _environments_lock:
        entry = _environments.pop(str(Path(path).resolve()), None)
    if entry is not None and entry[0] == os.getpid():
        entry[1].close()


class LMDBImageDataset(Dataset):
    """Records of a complete folder2lmdb database: (transform(PIL RGB image), label)."""

    def __init__(self, path: Union[str, Path], transform: Optional[Callable] = None,
                 target_transform: Optional[Callable] = None):
        self.path = Path(path)
        self.transform = transform
        self.target_transform = target_transform
        if not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"no LMDB database at {self.path.resolve()}; write it with "
                                    f"python data/folder2lmdb.py -f FOLDER -s {self.path.stem}")
        with shared_environment(self.path).begin() as txn:
            meta = {key: txn.get(key) for key in (KEY_FORMAT, KEY_SOURCE, KEY_LEN, KEY_PROGRESS, KEY_CLASSES, KEY_LABELS)}
        if meta[KEY_FORMAT] != FORMAT:
            release_environment(self.path)
            raise RuntimeError(f"{self.path.resolve()} was not written by data/folder2lmdb.py "
                               f"(format {meta[KEY_FORMAT]!r}, expected {FORMAT!r})")
        if meta[KEY_LEN] is None:
            release_environment(self.path)  # the user will now run the writer on it
            progress, source = meta[KEY_PROGRESS], meta[KEY_SOURCE]
            done = f" ({progress.decode()} records so far)" if progress is not None else ""
            folder = source.decode() if source is not None else "FOLDER"
            raise RuntimeError(f"{self.path.resolve()} is an unfinished conversion{done}: re-run python "
                               f"data/folder2lmdb.py -f {folder} -s {self.path.stem} -o {self.path.parent} "
                               f"to complete it")
        self._length = int(meta[KEY_LEN])
        self.classes: list[str] = json.loads(meta[KEY_CLASSES])
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.targets: list[int] = decode_labels(meta[KEY_LABELS])

    def __len__(self) -> int:
        return self._length

    def read_record(self, index: int) -> tuple[bytes, int]:
        """The stored image file bytes and the label of record ``index``."""
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} records in {self.path}")
        key = record_key(index)
        with shared_environment(self.path).begin() as txn:
            value = txn.get(key)
        if value is None:
            raise LMDBRecordError(f"record {key.decode()!r} is missing from {self.path}")
        label, payload = decode_record(value, key, self.path)
        return payload, label

    def load_image(self, index: int) -> tuple[Image.Image, int]:
        payload, label = self.read_record(index)
        try:
            with Image.open(io.BytesIO(payload)) as image:
                return image.convert("RGB"), label
        except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for undecodable data
            raise LMDBRecordError(f"record {record_key(index).decode()!r} in {self.path} does not decode "
                                  f"as an image: {error}") from error

    def __getitem__(self, index: int):
        image, label = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label
