"""Durable checkpoints and RNG state capture, so that a resumed run replays exactly.

A checkpoint is written to ``.checkpoint.pt.<pid>.tmp`` next to it, flushed to disk (fsync), renamed
over ``checkpoint.pt`` and the rename itself made durable (fsync of the folder): after a kill or a
power loss the file is the old checkpoint or the new one, whole. A process killed while writing
leaves its temporary file behind; ``remove_stale_temp_files`` deletes those of processes that no
longer run when the next job starts in that folder.

Checkpoints load with ``torch.load(weights_only=True)``: they hold only tensors, numbers, strings and
containers of them (NumPy's RNG state is stored as a tensor), so loading one cannot run code.
"""
from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

_TEMP_FILE = re.compile(r"^\..+\.(\d+)\.tmp$")  # record.atomic_write's and save_checkpoint's: .<name>.<pid>.tmp


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    except ImportError:
        pass
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, cached = state["numpy"]
        if isinstance(keys, torch.Tensor):
            keys = keys.numpy()
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def durable_write(path: Path, write_to: Callable[[Path], Any]) -> None:
    """``write_to(tmp)``, fsync it, rename it to ``path``, fsync the folder; the temporary file is
    removed if anything fails, so that only a kill can leave one behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_to(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows): the rename is what it is
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete ``.<name>.<pid>.tmp`` files in ``folder`` left by processes that no longer run."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP_FILE.match(entry.name)
        if match and entry.is_file() and not _pid_alive(int(match.group(1))):
            try:
                size = entry.stat().st_size
                entry.unlink()
            except OSError:
                continue
            removed.append(entry)
            log.info("removed %s (%d bytes), left by a process that was stopped while writing", entry, size)
    return removed


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Durably and atomically: a run killed while saving keeps its previous checkpoint whole."""
    durable_write(Path(path), lambda tmp: torch.save(state, tmp))


def _numpy_globals() -> list:
    """What a checkpoint written before NumPy's state was stored as a tensor needs to load safely."""
    try:
        import numpy as np
    except ImportError:
        return []
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load on the CPU (RNG states must stay CPU tensors); load_state_dict moves weights to the model.

    ``weights_only=True``: only tensors, numbers, strings and containers are unpickled.
    """
    with torch.serialization.safe_globals(_numpy_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)
