"""Small numeric helpers shared by the baseline codecs: directed bf16 rounding and per-channel views.

The codecs keep their per-channel or per-group parameters in 16 bits. Rounding a step size *up* (and
a minimum *down*) when it is stored, and quantizing with the stored value, keeps every grid covering
the range it was computed for, so the error bounds stated in the codecs hold for what is stored.
"""
from __future__ import annotations

import torch

from ..dual_precision import bf16_directed

# Smallest step any codec uses: keeps constant (e.g. all-zero) channels or groups away from 0 / 0.
TINY = torch.finfo(torch.float32).tiny


def bf16_up(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``x`` to the nearest bfloat16 that is >= x (inputs must be finite)."""
    return bf16_directed(x, "up")


def bf16_down(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``x`` to the nearest bfloat16 that is <= x."""
    return bf16_directed(x, "down")


def as_channels(x: torch.Tensor) -> torch.Tensor:
    """``x`` with channels along dim 1 (dim 0 is the batch); tensors of fewer than 2 dims become
    one channel, shape (1, 1, numel). Callers reshape back with the original shape."""
    return x.reshape(1, 1, -1) if x.dim() < 2 else x


def channel_layout(x: torch.Tensor) -> tuple[int, tuple[int, ...], list[int]]:
    """(channel count, dims to reduce, broadcast shape) for an ``as_channels`` tensor.

    Reducing over these dims and reshaping to the broadcast shape works for any memory format, so
    channels_last inputs are never copied.
    """
    channels = x.shape[1]
    return channels, (0,) + tuple(range(2, x.dim())), [1, channels] + [1] * (x.dim() - 2)


def channel_count(shape: tuple[int, ...]) -> int:
    return shape[1] if len(shape) >= 2 else 1
