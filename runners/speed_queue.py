"""``speed.queue``: speed runs started together compile at once and are timed one at a time.

A compiled ResNet-50 run spends minutes in ``torch.compile`` (Dynamo's tracing is single-threaded
host work) and seconds in its timed steps. Runs started side by side on one GPU, each with
``speed.queue=DIR speed.queue_size=N``, compile and warm up concurrently; each then waits until all
N have finished warming up (so that no compilation competes for the host while a step is timed),
and times its steps holding an exclusive lock on ``DIR/lock`` (so that no two runs share the GPU
while timed). While it waits, a run holds no cached GPU memory beyond its live tensors (and CUDA
graph pools); it takes one untimed step after the wait to allocate again. Without ``speed.queue`` a
run is timed as soon as it has warmed up.

A run that fails before it is warm (a compile error) leaves the queue (``leaving_on_failure``): the
others count it and go on. One that never arrives for another reason (killed) must not hold the
others forever: after ``speed.queue_timeout`` seconds of waiting the others are timed anyway, with
a warning naming how many runs arrived. Nothing in the record depends on the queue: the timed steps are the same steps.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


@contextlib.contextmanager
def timing_turn(cfg) -> Iterator[bool]:
    """Held around a run's timed steps: a no-op without ``speed.queue`` (yields False); with it,
    gives the allocator's cached GPU memory back while waiting (so that the waiting runs leave room
    for the timed one), waits for the other runs of the queue to be warm and then for the queue's
    lock, and yields True: the caller runs one untimed step first, to allocate again what it gave back."""
    folder = cfg.speed.get("queue")
    if not folder:
        yield False
        return
    folder = Path(str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    wait_for_all(folder, int(cfg.speed.get("queue_size") or 1), float(cfg.speed.get("queue_timeout") or 1800))
    with open(folder / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the run dies
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def leaving_on_failure(cfg) -> Iterator[None]:
    """Around a queued run's build, compile and warm-up: if they raise before the run is warm, it
    marks itself gone, so that the runs beside it do not wait for it until the queue's timeout."""
    try:
        yield
    except BaseException:
        queue = cfg.speed.get("queue")
        folder = Path(str(queue)) if queue else None
        if folder is not None and not _mark(folder, "warm").exists():
            folder.mkdir(parents=True, exist_ok=True)
            _mark(folder, "gone").touch()
        raise


def _mark(folder: Path, state: str) -> Path:
    """This run's file in the queue's folder: ``warm`` (ready to be timed) or ``gone`` (failed before)."""
    return folder / f"{state}-{os.getpid()}-{threading.get_ident()}"


def wait_for_all(folder: Path, size: int, timeout_s: float) -> int:
    """Marks this process warm in ``folder`` and waits until ``size`` processes are warm or gone (or
    the timeout passes); returns how many were."""
    _mark(folder, "warm").touch()
    deadline = time.monotonic() + timeout_s
    while True:
        arrived = len(list(folder.glob("warm-*"))) + len(list(folder.glob("gone-*")))
        if arrived >= size:
            return arrived
        if time.monotonic() >= deadline:
            log.warning("speed.queue %s: %d of %d runs warmed up within %.0f s; timing without the rest",
                        folder, arrived, size, timeout_s)
            return arrived
        time.sleep(POLL_SECONDS)
