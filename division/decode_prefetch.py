"""Decodes ahead of backward on a side stream: decompression overlaps the backward pass's kernels.

Backward reads saved activations in about the reverse of the order forward saved them, and each
layer's backward waits for the decode of its input. The compressor links every activation-codec
``Packed`` to the one saved before it (``PREVIOUS``). When backward unpacks a Packed, the
prefetcher starts the decodes of the ``ahead`` Packeds saved before it on a side CUDA stream: they
run while this layer's backward kernels run, and the next unpacks find them done. Starting them
further ahead gave nothing on ResNet-50 (docs/kernels.md, run 9: 2 and 3 ahead were 0.15-0.2 ms
slower than 1): a decode is bound by memory bandwidth, which the backward's own kernels use too.

Ordering, per prefetched Packed ``p``:
- the side stream first waits for everything the main stream has queued. The decode's output is
  allocated on the side stream, and memory the main stream freed may still be read by kernels it
  has queued; the same wait also orders the next prefetch after the consumers of this one's output.
- The decoded tensor and its completion event are kept in ``p.meta``; the codec's decode takes
  them (``take``): the main stream waits for the event, then reads the tensor.
- ``join()``, queued to run at the end of the backward pass, makes the main stream wait for any
  decode that was not taken and drops it, so a CUDA-graph capture ends with no side-stream work
  outside the graph's join edges.
At most ``ahead`` prefetched decodes are alive at a time: peak memory rises by at most that many
decoded activations.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from .codec import Packed
from .encode_stream import side_stream
from .exact import readers

PREVIOUS = "previous_saved"  # meta: weak reference to the activation-codec Packed saved before this one
_UNPACKED = "unpacked"       # meta: unpacks so far
_READY = "prefetched"        # meta: (decoded tensor, completion event, main stream)


def prefetched(packed: Packed) -> bool:
    """Is a decode of ``packed`` prefetched (``take`` would return it)?"""
    return _READY in packed.meta


def take(packed: Packed) -> Optional[torch.Tensor]:
    """The decode prefetched for ``packed`` (the current stream waits for it), or None."""
    ready = packed.meta.pop(_READY, None)
    if ready is None:
        return None
    decoded, done, _ = ready
    torch.cuda.current_stream(decoded.device).wait_event(done)
    return decoded


class DecodePrefetcher:
    """Prefetch the decode of the previously saved activation on a side stream per device."""

    def __init__(self, ahead: int = 1):
        if ahead < 1:
            raise ValueError(f"ahead must be at least 1, got {ahead}")
        self.ahead = int(ahead)
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._pending: list[weakref.ref] = []
        self._join_queued = False
        self.launched = 0  # decodes started ahead so far

    def after_unpack(self, packed: Packed) -> None:
        """``packed`` was just unpacked: start the decodes of the ``ahead`` Packeds saved before
        it, nearest first, that still have unpacks to come and are not decoding yet, while fewer
        than ``ahead`` prefetches are waiting."""
        meta = packed.meta
        meta[_UNPACKED] = meta.get(_UNPACKED, 0) + 1
        prev = packed
        for _ in range(self.ahead):
            ref = prev.meta.get(PREVIOUS)
            prev = ref() if ref is not None else None
            if prev is None:
                return
            if _READY not in prev.meta and prev.meta.get(_UNPACKED, 0) < readers(prev) \
                    and not self._start(prev):
                return

    def _start(self, prev: Packed) -> bool:
        """Start ``prev``'s decode ahead; False if no more can start now."""
        self._pending = [r for r in self._pending if r() is not None and _READY in r().meta]
        if len(self._pending) >= self.ahead or not self._queue_join() or not self._launch(prev):
            return False
        self._pending.append(weakref.ref(prev))
        self.launched += 1
        return True

    def _launch(self, prev: Packed) -> bool:
        """Queue ``prev``'s decode on the side stream (False, and nothing queued, off CUDA)."""
        device = next(iter(prev.tensors.values())).device
        if device.type != "cuda":
            return False
        main = torch.cuda.current_stream(device)
        side = side_stream(self._streams, device, low_priority=False)  # its output is needed soon
        side.wait_stream(main)
        with torch.cuda.stream(side):
            decoded = prev.codec.decode_ahead(prev)
        done = torch.cuda.Event()
        done.record(side)
        prev.meta[_READY] = (decoded, done, main)
        return True

    def _queue_join(self) -> bool:
        """Queue ``join`` to run when this backward pass ends; False outside a backward pass."""
        if not self._join_queued:
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self.join)
            except RuntimeError:  # not inside backward: nothing would join the stream
                return False
            self._join_queued = True
        return True

    def join(self) -> None:
        """The main streams wait for every prefetched decode not taken; those are dropped."""
        for ref in self._pending:
            packed = ref()
            ready = packed.meta.pop(_READY, None) if packed is not None else None
            if ready is not None:
                _, done, main = ready
                main.wait_event(done)
        self._pending = []
        self._join_queued = False
