"""Encodes on a side stream: compression overlaps the forward pass's own kernels.

Compression is memory-bound and a ResNet's forward pass is mostly compute-bound convolutions, so
an encode that runs on a second, low-priority CUDA stream can use the memory bandwidth a
convolution leaves idle instead of adding its time to the step.

Ordering, per encode of a tensor ``t``:
- the side stream first waits for everything the main stream has queued (``t`` is written);
- ``t`` is kept alive here until the main stream has waited for that encode's completion. Only
  then can the caching allocator hand ``t``'s memory to a later kernel of the main stream, so no
  kernel overwrites an input an encode is still reading. (``Tensor.record_stream`` would do this
  too, but a tensor freed with a recorded stream during a CUDA-graph capture is not reused until
  the capture ends: the graph would keep every activation.)
- At most ``lag`` encodes are in flight: the main stream waits for the oldest beyond that, which
  bounds the extra memory to the inputs of ``lag`` encodes.
- ``join()`` (end of the forward pass) makes the main stream wait for every encode, so backward
  reads finished codes. Stored tensors are allocated on the side stream; the next encode that
  could reuse their memory there first waits for the main stream, so backward's reads come first.

The same fork / join edges are what a CUDA-graph capture records, so captured steps overlap too.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch


def side_stream(streams: dict[int, torch.cuda.Stream], device: torch.device,
                low_priority: bool) -> torch.cuda.Stream:
    """The side stream of ``device`` in ``streams``, created on first use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = streams.get(index)
    if stream is None:
        low, _ = torch.cuda.Stream.priority_range()  # numerically largest = lowest priority
        stream = streams[index] = torch.cuda.Stream(device=index, priority=low if low_priority else 0)
    return stream


class SideStreamEncoder:
    """Run encodes on one low-priority side stream per device, at most ``lag`` in flight."""

    def __init__(self, lag: int = 4):
        if lag < 1:
            raise ValueError(f"lag must be at least 1, got {lag}")
        self.lag = int(lag)
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._in_flight: deque = deque()  # (done event, main stream, input kept alive)

    def run(self, encode: Callable[[torch.Tensor], object], t: torch.Tensor):
        """``encode(t)`` on the side stream of ``t``'s device (inline for a CPU tensor)."""
        if not t.is_cuda:
            return encode(t)
        main = torch.cuda.current_stream(t.device)
        side = side_stream(self._streams, t.device, low_priority=True)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            packed = encode(t)
        done = torch.cuda.Event()
        done.record(side)
        self._in_flight.append((done, main, t))
        while len(self._in_flight) > self.lag:
            done, waiting, _ = self._in_flight.popleft()
            waiting.wait_event(done)
        return packed

    def join(self) -> None:
        """The main streams wait for every encode in flight; their inputs are released."""
        while self._in_flight:
            done, waiting, _ = self._in_flight.popleft()
            waiting.wait_event(done)
