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
import struct
import threading
from pathlib import Path
from typing import Callable, Optional, Union

import lmdb
from PIL import Image
from torch.utils.data import Dataset

from .errors import CorruptDataError
from .folder2lmdb import (FORMAT, KEY_CLASSES, KEY_FORMAT, KEY_LABELS, KEY_LEN, KEY_PROGRESS, KEY_SOURCE,
                          LMDBRecordError, decode_labels, decode_record, record_key)

_environments: dict[str, tuple[int, lmdb.Environment]] = {}  # resolved path -> (owner pid, handle)
_environments_lock = threading.Lock()


# LMDB's meta pages (pages 0 and 1, 64-bit layout): a 16-byte page header, then MDB_meta: magic,
# version, address, map size, two 48-byte MDB_db (the first one's md_pad holds the page size),
# the last used page number and the transaction id. The newer of the two meta pages is current.
_META_MAGIC = 0xBEEFC0DE
_META_PAGE_SIZE_AT, _META_LAST_PAGE_AT, _META_MAGIC_AT = 40, 136, 16


def check_database_file(path: Union[str, Path]) -> None:
    """Raise ``CorruptDataError`` when ``path``/data.mdb is shorter than its own meta pages say.

    LMDB maps the file into memory and trusts it: reading a page past the end of a truncated file
    kills the process with SIGBUS, with no message. The file is therefore read with plain reads
    (no mapping) first: both meta pages must be there, and the file must reach the last page the
    newer of them uses.
    """
    data = Path(path) / "data.mdb"
    size = data.stat().st_size
    with open(data, "rb") as handle:
        head = handle.read(2 * 65536)
    metas = []
    for offset in _meta_offsets(head):
        magic, = struct.unpack_from("<I", head, offset + _META_MAGIC_AT)
        if magic != _META_MAGIC:
            continue
        page_size, = struct.unpack_from("<I", head, offset + _META_PAGE_SIZE_AT)
        last_page, txn = struct.unpack_from("<QQ", head, offset + _META_LAST_PAGE_AT)
        metas.append((txn, last_page, page_size))
    if not metas:
        raise CorruptDataError(f"{data.resolve()} is not an LMDB data file, or its header is damaged "
                               f"({size} bytes); re-write it with python data/folder2lmdb.py --overwrite")
    _, last_page, page_size = max(metas)
    needed = (last_page + 1) * page_size
    if size < needed:
        raise CorruptDataError(f"{data.resolve()} is truncated: {size} bytes, but the database uses {needed} "
                               f"(pages 0-{last_page} of {page_size} bytes); copy it again or re-write it with "
                               f"python data/folder2lmdb.py --overwrite")


def _meta_offsets(head: bytes) -> list[int]:
    """Offsets of the two meta pages: 0, and one page further (the page size, read from page 0)."""
    offsets = [0] if len(head) >= _META_LAST_PAGE_AT + 16 else []
    if offsets:
        page_size, = struct.unpack_from("<I", head, _META_PAGE_SIZE_AT)
        if 512 <= page_size <= 65536 and len(head) >= page_size + _META_LAST_PAGE_AT + 16:
            offsets.append(page_size)
    return offsets


def shared_environment(path: Union[str, Path]) -> lmdb.Environment:
    """This process's read-only handle on the database at ``path``, checked against truncation."""
    key = str(Path(path).resolve())
    with _environments_lock:
        entry = _environments.get(key)
        if entry is not None and entry[0] == os.getpid():
            return entry[1]
        if entry is not None:
            entry[1].close()  # inherited through fork: release this process's copy before reopening
        check_database_file(key)
        try:
            env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False, subdir=True)
        except lmdb.Error as error:
            raise CorruptDataError(f"cannot open the LMDB database {key}: {error}") from error
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
        try:
            with shared_environment(self.path).begin() as txn:
                meta = {key: txn.get(key) for key in (KEY_FORMAT, KEY_SOURCE, KEY_LEN, KEY_PROGRESS, KEY_CLASSES, KEY_LABELS)}
        except lmdb.Error as error:  # MDB_CORRUPTED and kin do not say which file
            release_environment(self.path)
            raise CorruptDataError(f"the LMDB database {self.path.resolve()} is damaged ({error}); "
                                   f"re-write it with python data/folder2lmdb.py --overwrite") from error
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
        try:
            with shared_environment(self.path).begin() as txn:
                value = txn.get(key)
        except lmdb.Error as error:  # MDB_CORRUPTED and kin do not say which file
            raise LMDBRecordError(f"record {key.decode()!r} of {self.path.resolve()} cannot be read: the "
                                  f"database is damaged ({error}); re-write it with python "
                                  f"data/folder2lmdb.py --overwrite") from error
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
