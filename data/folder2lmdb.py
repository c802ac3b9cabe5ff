"""Convert an ImageFolder split (FOLDER/SPLIT/<class>/<image>) into one LMDB database, and define
the record format that ``data.lmdb_dataset.LMDBImageDataset`` reads back.

Usage::

    python data/folder2lmdb.py -f FOLDER -s SPLIT [SPLIT ...] [-o OUT] [--map-size 200G] [--overwrite]

writes OUT/SPLIT.lmdb (OUT defaults to FOLDER). Files are enumerated, sorted and labelled exactly
as ``torchvision.datasets.ImageFolder`` does, so index i and its label match ImageFolder's.

Database layout (an LMDB environment directory, keys and values are bytes):

- image records: key ``b"%08d" % index`` (index 0 .. N-1, so keys sort in index order); value =
  a 16-byte little-endian header ``struct.pack("<4sIiI", b"DIVR", payload_length, label,
  crc32(payload))`` followed by the payload: the image file's bytes exactly as they are on disk (no
  re-encoding, so no quality loss and no size growth). The length and the CRC-32 make a truncated or
  damaged value detectable before the image decoder sees it.
- ``b"__format__"``: ``b"division-lmdb-1"``.
- ``b"__source__"``: the absolute path of the data set folder it was converted from (UTF-8), so
  that a reader can print the exact command that completes an unfinished conversion.
- ``b"__classes__"``: JSON list of the class names; label i is ``classes[i]``.
- ``b"__manifest__"``: hex SHA-256 of the sorted "relative/path<TAB>label" lines of the source
  split; a resumed conversion checks it so that it never mixes two different file lists.
- ``b"__progress__"``: ASCII decimal count of the records committed so far; present only while the
  conversion is unfinished.
- ``b"__labels__"``: every label as little-endian int32, in index order; written at the end.
- ``b"__len__"``: ASCII decimal N. Written last, in the same transaction that removes
  ``__progress__``: a database is complete if and only if it has ``__len__``.

Resuming: records are committed in chunks (``--commit-every``), each chunk in one transaction that
also advances ``__progress__``; an interrupted run (crash, kill, full disk) therefore leaves only
whole chunks behind, and a re-run continues after the last committed one. A complete database is
left alone unless ``--overwrite`` is given.

This module imports nothing from the rest of the repository so that it runs as a plain script.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import struct
import sys
import zlib
from pathlib import Path
from typing import Optional, Union

import lmdb
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from tqdm import tqdm

log = logging.getLogger(__name__)

FORMAT = b"division-lmdb-1"
KEY_FORMAT = b"__format__"
KEY_SOURCE = b"__source__"
KEY_CLASSES = b"__classes__"
KEY_MANIFEST = b"__manifest__"
KEY_PROGRESS = b"__progress__"
KEY_LABELS = b"__labels__"
KEY_LEN = b"__len__"

_MAGIC = b"DIVR"
_HEADER = struct.Struct("<4sIiI")  # magic, payload length, label, crc32 of the payload
_LMDB_FILES = ("data.mdb", "lock.mdb")
_MIB = 1 << 20


class LMDBRecordError(RuntimeError):
    """A record that is missing, truncated or damaged; the message names the key and the database."""


# ------------------------------------------------------------------------------------ record format
def record_key(index: int) -> bytes:
    return b"%08d" % index


def encode_record(label: int, payload: bytes) -> bytes:
    return _HEADER.pack(_MAGIC, len(payload), label, zlib.crc32(payload)) + payload


def decode_record(value: bytes, key: bytes, db_path: Union[str, Path]) -> tuple[int, bytes]:
    """(label, image bytes) of one record; raises ``LMDBRecordError`` if it is not intact."""
    def damaged(why: str) -> LMDBRecordError:
        return LMDBRecordError(f"corrupt record {key.decode()!r} in {db_path}: {why}")

    if len(value) < _HEADER.size:
        raise damaged(f"only {len(value)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, length, label, crc = _HEADER.unpack_from(value)
    if magic != _MAGIC:
        raise damaged(f"bad magic {magic!r}")
    payload = bytes(value[_HEADER.size:])
    if len(payload) != length:
        raise damaged(f"truncated: {len(payload)} image bytes stored, header says {length}")
    if zlib.crc32(payload) != crc:
        raise damaged("image bytes fail their CRC-32 check")
    return label, payload


def encode_labels(labels: list[int]) -> bytes:
    return struct.pack(f"<{len(labels)}i", *labels)


def decode_labels(value: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(value) // 4}i", value))


# ---------------------------------------------------------------------------------------- converter
def list_split(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (path, label) pairs, in ImageFolder's order."""
    classes, class_to_idx = find_classes(split_dir)
    samples = make_dataset(split_dir, class_to_idx, extensions=IMG_EXTENSIONS)
    return classes, samples


def manifest_digest(split_dir: Path, samples: list[tuple[str, int]]) -> bytes:
    digest = hashlib.sha256()
    for path, label in samples:
        digest.update(f"{Path(path).relative_to(split_dir).as_posix()}\t{label}\n".encode())
    return digest.hexdigest().encode()


def default_map_size(samples: list[tuple[str, int]]) -> int:
    """Room for every file, plus a page of LMDB overhead per record, plus slack. The map is only
    an upper bound: on Linux the file grows with the data."""
    total = sum(Path(path).stat().st_size for path, _ in samples)
    return int(total * 1.1) + len(samples) * 4096 + 64 * _MIB


def parse_size(text: str) -> int:
    """'1099511627776', '500M', '64G' or '1T' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _remove_database(db_path: Path) -> None:
    """Delete an LMDB directory, refusing anything that does not look like one."""
    unexpected = [p.name for p in db_path.iterdir() if p.name not in _LMDB_FILES]
    if unexpected:
        raise RuntimeError(f"refusing to delete {db_path}: it holds files LMDB did not write: {unexpected}")
    shutil.rmtree(db_path)


def _read_state(env: lmdb.Environment) -> dict:
    with env.begin() as txn:
        return {key: txn.get(key) for key in (KEY_LEN, KEY_PROGRESS, KEY_MANIFEST)}


def convert_split(folder: Union[str, Path], split: str, out: Optional[Union[str, Path]] = None, *,
                  map_size: Optional[int] = None, overwrite: bool = False, commit_every: int = 1000,
                  stop_after: Optional[int] = None, progress: bool = True) -> Path:
    """Write ``out/split.lmdb`` from the ImageFolder tree ``folder/split``; return its path.

    Resumes an unfinished database; leaves a complete one alone unless ``overwrite``.
    ``stop_after``: stop (unfinished, resumable) once that many records are stored; it exists to
    test resuming and to spread a long conversion over several sessions.
    """
    split_dir = Path(folder) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no split folder {split_dir.resolve()}: expected {Path(folder).resolve()}/"
                                f"{split}/<class>/<image> (pass the data set folder with -f and the split with -s)")
    db_path = Path(out if out is not None else folder) / f"{split}.lmdb"
    classes, samples = list_split(split_dir)
    if not samples:
        raise FileNotFoundError(f"no images under {split_dir.resolve()}")
    manifest = manifest_digest(split_dir, samples)

    if db_path.exists() and overwrite:
        log.info("removing %s (--overwrite)", db_path)
        _remove_database(db_path)

    db_path.parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(db_path), map_size=map_size or default_map_size(samples), subdir=True,
                    meminit=False, map_async=False)
    try:
        state = _read_state(env)
        if state[KEY_LEN] is not None:
            if state[KEY_MANIFEST] != manifest:
                log.warning("%s is complete but was made from a different file list than %s; "
                            "pass --overwrite to rebuild it", db_path, split_dir)
            log.info("%s is already complete (%s records); left as it is", db_path, state[KEY_LEN].decode())
            return db_path
        done = 0
        if state[KEY_PROGRESS] is not None:
            if state[KEY_MANIFEST] != manifest:
                raise RuntimeError(f"{db_path} is an unfinished conversion of a different file list than "
                                   f"{split_dir}; pass --overwrite to start it again")
            done = int(state[KEY_PROGRESS])
            log.info("resuming %s after %d of %d records", db_path, done, len(samples))
        else:
            with env.begin(write=True) as txn:
                txn.put(KEY_FORMAT, FORMAT)
                txn.put(KEY_SOURCE, str(Path(folder).resolve()).encode())
                txn.put(KEY_CLASSES, json.dumps(classes).encode())
                txn.put(KEY_MANIFEST, manifest)
                txn.put(KEY_PROGRESS, b"0")

        end = len(samples) if stop_after is None else min(len(samples), stop_after)
        _write_records(env, samples, done, end, commit_every, db_path, progress)
        if end < len(samples):
            log.info("stopped after %d of %d records; re-run to continue", end, len(samples))
            return db_path
        with env.begin(write=True) as txn:
            txn.put(KEY_LABELS, encode_labels([label for _, label in samples]))
            txn.put(KEY_LEN, str(len(samples)).encode())
            txn.delete(KEY_PROGRESS)
        env.sync(True)
        log.info("wrote %s: %d records, %d classes", db_path, len(samples), len(classes))
        return db_path
    finally:
        env.close()


def _write_records(env: lmdb.Environment, samples: list[tuple[str, int]], start: int, end: int,
                   commit_every: int, db_path: Path, progress: bool) -> None:
    with tqdm(total=len(samples), initial=start, desc=db_path.name, unit="img", disable=not progress) as bar:
        for chunk_start in range(start, end, commit_every):
            chunk_end = min(chunk_start + commit_every, end)
            try:
                # One transaction per chunk: its records and the progress mark land together or not at all.
                with env.begin(write=True) as txn:
                    for index in range(chunk_start, chunk_end):
                        path, label = samples[index]
                        txn.put(record_key(index), encode_record(label, _read_file(path)))
                    txn.put(KEY_PROGRESS, str(chunk_end).encode())
            except lmdb.MapFullError as error:
                raise RuntimeError(f"{db_path} is full after {chunk_start} records; re-run with a larger "
                                   f"--map-size (the conversion resumes where it stopped)") from error
            bar.update(chunk_end - chunk_start)


# --------------------------------------------------------------------------------------------- CLI
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-f", "--folder", required=True, help="data set folder holding the split folders")
    parser.add_argument("-s", "--split", required=True, nargs="+", help="split folder name(s), e.g. train val")
    parser.add_argument("-o", "--out", default=None, help="where SPLIT.lmdb goes (default: FOLDER)")
    parser.add_argument("--map-size", type=parse_size, default=None,
                        help="LMDB map size, e.g. 200G (default: from the file sizes)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild a complete database")
    parser.add_argument("--commit-every", type=int, default=1000, help="records per transaction")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop (resumably) once this many records are stored")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for split in args.split:
            convert_split(args.folder, split, args.out, map_size=args.map_size, overwrite=args.overwrite,
                          commit_every=args.commit_every, stop_after=args.stop_after)
    except (FileNotFoundError, RuntimeError) as error:  # a message for the user, not a traceback
        log.error("folder2lmdb: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
