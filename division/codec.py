"""The codec interface: how one saved activation is turned into stored bytes and back.

Every compression method (DIVISION and the baselines) is an ``ActivationCodec``. The autograd
machinery in :mod:`division.compressor` calls ``encode`` right after a layer's forward saves a
tensor and ``decode`` right before that layer's backward reads it. A codec knows nothing about
modules, hooks or the ledger, so a fused GPU kernel can replace one without touching the rest.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class SaveContext:
    """Where a tensor is being saved: the module that saves it and the role of the tensor.

    ``layer`` is the module's qualified name in the model (``layer1.0.conv1``); ``kind`` is the
    module family (``conv``, ``bn``, ``linear``, ...). Codecs that keep per-layer state (ACGC's
    bit widths) key it by ``layer``; stateless codecs ignore the context.
    """

    layer: str = ""
    kind: str = ""


@dataclass
class Packed:
    """What a codec keeps for backward: the tensors that hold storage, plus plain metadata.

    ``tensors`` are the only objects that occupy memory, so ``nbytes`` (their storage) is the exact
    cost of this saved activation; ``meta`` holds shapes, dtypes and scalars.
    """

    codec: "ActivationCodec"
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def unpack(self) -> torch.Tensor:
        return self.codec.decode(self)


class ActivationCodec(ABC):
    """Base class: lossy or exact storage of one saved tensor.

    Subclasses implement ``encode`` and ``decode``. ``decode(encode(x))`` must return a tensor of
    x's shape, dtype and device (and memory format, for 4-D channels_last inputs).
    """

    name = "codec"

    @abstractmethod
    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        """Compress ``x`` into the tensors kept for backward."""

    @abstractmethod
    def decode(self, packed: Packed) -> torch.Tensor:
        """Rebuild the activation from what ``encode`` kept."""

    @abstractmethod
    def closed_form_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes ``encode`` keeps for a tensor of this shape and dtype (the ledger is checked on it)."""

    def describe(self) -> dict[str, Any]:
        """The knobs that define this codec, for result records."""
        return {"codec": self.name}


class RawCodec(ActivationCodec):
    """Keeps the tensor as it is: plain autograd's behaviour, and the fallback for tiny tensors."""

    name = "raw"

    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        # detach(): the same storage, without the autograd edge. Keeping an op's own output with
        # its grad_fn would make a reference cycle through the C++ graph that Python's collector
        # cannot see; if backward never runs (an OOM mid-forward), that memory would never be freed.
        return Packed(self, {"x": x.detach()})

    def decode(self, packed: Packed) -> torch.Tensor:
        return packed.tensors["x"]

    def closed_form_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return math.prod(shape) * dtype.itemsize
