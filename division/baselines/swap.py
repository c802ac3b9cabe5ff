"""Offloading saved activations to host memory (method ``swap``).

Every tensor autograd saves during the step goes to the host through
``torch.autograd.graph.save_on_cpu`` (pinned host memory on a CUDA machine, so the copies back can
overlap with compute) and returns to the device when backward needs it. Nothing is compressed: the
saved activations are simply not resident on the device between forward and backward. As with
``save_on_cpu`` itself, every saved tensor is copied, weights included. Its pinned path brings each
tensor back contiguous (strides are not kept), so backward may pick other kernels: on an H200 the
gradients matched plain autograd's within 1e-3 relative with cuDNN's default TF32 (4e-5 without
TF32), and exactly with ``pin_memory=False``.

Ledger. ``stored_bytes`` counts device-resident saved bytes, which are 0 for every entry (all of it
is offloaded); ``plain_bytes`` counts the bytes each saved tensor occupies, once per tensor as plain
autograd would keep it, i.e. the host bytes this method moves (codec ``host``). Weights are left out
of both, as everywhere in the ledger. The ledger therefore reports an unbounded device-side ratio;
host memory, PCIe traffic and time are the price, visible in the speed and allocator figures.
The ledger cannot run through the activation compressor here (its saved-tensor hooks would replace
``save_on_cpu``'s), so a ``SaveRecorder`` keeps it: rows come from a hook that wraps
``save_on_cpu``'s own pack hook, during the model's training forward only, as for the other methods.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ledger import ByteLedger
from ..methods import TrainingMethod
from ._recorder import SaveRecorder, is_model_memory


class _RecordedOffload(torch.autograd.graph.saved_tensors_hooks):
    """``save_on_cpu``'s hooks, plus a ledger row for every tensor the model's forward offloads."""

    def __init__(self, offload: torch.autograd.graph.save_on_cpu, recorder: SaveRecorder):
        offload_pack = offload.pack_hook

        def pack(t: torch.Tensor):
            if recorder.recording and not is_model_memory(t):
                recorder.record(t, codec="host", plain=recorder.plain.first(t), stored=False)
            return offload_pack(t)

        super().__init__(pack, offload.unpack_hook)


class SwapMethod(TrainingMethod):
    """Saved activations live in (pinned, on CUDA) host memory between forward and backward."""

    compile_safe = False  # its offload is a saved-tensor hook, which a compiled graph bypasses
    name = "swap"
    cuda_graph_safe = False  # copies to host memory: a graph cannot own pageable or pinned host buffers

    def __init__(self, pin_memory: Optional[bool] = None):
        super().__init__()
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)

    def attach(self, model: nn.Module, ledger: Optional[ByteLedger] = None) -> nn.Module:
        """The model is not touched; with a ledger, a ``SaveRecorder`` follows its training forward."""
        if ledger is not None:
            self.compressor = SaveRecorder(model, ledger)
        return model

    def step_context(self):
        offload = torch.autograd.graph.save_on_cpu(pin_memory=self.pin_memory)
        if self.compressor is None or self.compressor.ledger is None:
            return offload
        return _RecordedOffload(offload, self.compressor)


def build_swap(pin_memory: Optional[bool] = None, **_) -> TrainingMethod:
    return SwapMethod(pin_memory=pin_memory)
