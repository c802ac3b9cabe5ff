"""CUDA allocator readings and out-of-memory clean-up, shared by the memory and speed runners.

Every figure is read from PyTorch's caching allocator (``memory_allocated`` and friends) relative
to what the process already held when the measurement started, so that a sweep running several
jobs in one process never charges one job for another's leftovers.
"""
from __future__ import annotations

import gc
import traceback
from typing import Iterable, Optional

import torch

from division import Packed


def tensor_bytes(*tensors: Optional[torch.Tensor]) -> int:
    """The bytes of the tensors' own elements (exact, device independent; ``None`` counts 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def module_bytes(module: torch.nn.Module) -> int:
    """Parameters plus buffers of a module, in bytes of their elements."""
    return tensor_bytes(*module.parameters(), *module.buffers())


def release_memory(device: Optional[torch.device] = None) -> None:
    """Collect garbage (models and hooks form reference cycles) and give cached CUDA blocks back."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _exception_chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def free_after_oom(exc: BaseException, device: Optional[torch.device] = None) -> None:
    """Drop what an out-of-memory exception keeps alive, then release the memory.

    A traceback holds every frame it passed through, and with them the model, the batch and the
    autograd graph of the step that failed. Clearing those frames' locals (the exception itself
    keeps its message and type) lets the memory go now rather than whenever the exception dies,
    so the next job of a sweep, or the next probe of a batch search, starts from an empty GPU.
    """
    for link in _exception_chain(exc):
        traceback.clear_frames(link.__traceback__)  # frames still running are skipped
    gc.collect()
    _drop_orphaned_saves()
    release_memory(device)


def _drop_orphaned_saves() -> None:
    """Empty the saved activations of autograd graphs that lost every owner in a failed step.

    A pack hook that keeps a tensor as it is (``RawCodec``) closes a cycle when that tensor is the
    output of the op saving it (ReLU, sigmoid, softmax): output -> grad_fn -> saved ``Packed`` ->
    output. The cycle runs through autograd's C++ graph, which Python's collector cannot see, and
    only backward breaks it; after a forward that ran out of memory, backward never comes and the
    whole graph would stay allocated for the life of the process. Called once the failed step's
    frames are cleared and collected, every ``Packed`` still alive belongs to such a graph (a job
    runs one model at a time), so emptying them frees the graph.
    """
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance falls back to __class__, which some lazy module
        # proxies in the heap answer with a deprecation warning.
        if issubclass(type(obj), Packed):
            obj.tensors.clear()


class CudaMeter:
    """Allocator figures on one CUDA device, relative to what was allocated when it was created."""

    def __init__(self, device: torch.device):
        self.device = device
        release_memory(device)
        self.base_allocated = torch.cuda.memory_allocated(device)
        self.base_reserved = torch.cuda.memory_reserved(device)

    def allocated(self) -> int:
        """Bytes held by live tensors now (allocator-rounded, 512-byte granularity)."""
        return torch.cuda.memory_allocated(self.device) - self.base_allocated

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_allocated(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.base_allocated

    def peak_reserved(self) -> int:
        """Peak of what the caching allocator took from the driver: live tensors plus its cache."""
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_reserved(self.device) - self.base_reserved
