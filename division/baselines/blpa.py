"""BLPA-like storage: K-bit codes on a per-channel, zero-aligned uniform grid (method ``blpa``).

Chakrabarti & Moseley (NeurIPS 2019) store activations at K = 4 or 8 bits on a uniform grid that
spans about +-3 standard deviations of each channel, taking the mean and standard deviation from
the following BatchNorm. Here the statistics are computed from the activation itself, per channel
(dim 1; the batch and spatial dims are pooled), because a saved-tensor hook only sees the tensor
being saved, not the layer that will read it next. For a BatchNorm input they are exactly that
BatchNorm's batch statistics; for a conv input they are the statistics of the conv's input.

Grid, per channel c with mean m and std s:
- range [lo, hi] = [m - 3s, m + 3s], widened to contain 0 (so 0 is always representable);
- 2^K bins of width w = (hi - lo) / (2^K - 1), stored in bf16 rounded up;
- bin centres (k - z) * w for k = 0 .. 2^K - 1: the integer zero point z puts a centre exactly on 0
  ("zero-aligned": 0 stays 0 and no value changes sign), z = ceil(-lo / w - 1/2) so that the bins
  cover [lo, hi] whole (the extra bin width of w over hi - lo absorbs z's rounding);
- code = clamp(round(x / w) + z, 0, 2^K - 1): deterministic rounding to the nearest bin centre;
  values beyond the outer bins saturate at the outermost centre.
Error: at most w / 2 for values inside [lo, hi]; values further out are clamped to the outermost
centres, which lie within w / 2 of lo and hi plus the bf16 round-up of w accumulated over the
grid, (2^K - 1) * (w_s - w) <= (2^K - 1) * 2^-8 * w: a few percent of a bin at 4 bits, at most one
bin (1/128 of the range) at 8 bits.

Stored: the codes bit-packed (K bits each), w (bf16) and z (int16) per channel:
ceil(numel * K / 8) + 4 * C bytes. ReLU masks and max-pool indices stay exact (``CodecMethod``).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..codec import ActivationCodec, Packed, SaveContext
from ..exact import _is_channels_last, _restore_format
from ..methods import CodecMethod, TrainingMethod
from ..packing import SUPPORTED_BITS, pack_bits, packed_nbytes, unpack_bits
from ._numerics import TINY, as_channels, bf16_up, channel_count, channel_layout


class BLPACodec(ActivationCodec):
    """Per-channel zero-aligned K-bit grid over mean +- ``range_std`` standard deviations."""

    name = "blpa"

    def __init__(self, bits: int = 4, range_std: float = 3.0):
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"method.bits={bits!r} is not allowed for blpa: use one of {SUPPORTED_BITS}")
        if not range_std > 0:
            raise ValueError(f"range_std must be positive, got {range_std}")
        self.bits = int(bits)
        self.range_std = float(range_std)

    def describe(self) -> dict[str, Any]:
        return {"codec": self.name, "bits": self.bits, "block_size": None}

    def grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored grid of ``x`` (an ``as_channels`` tensor): bin width (bf16) and zero point
        (int16), one per channel."""
        _, reduce_dims, _ = channel_layout(x)
        var, mean = torch.var_mean(x.float(), dim=reduce_dims, unbiased=False)
        spread = self.range_std * var.sqrt()
        lo = (mean - spread).clamp(max=0.0)
        hi = (mean + spread).clamp(min=0.0)
        levels = 2 ** self.bits
        width = bf16_up(((hi - lo) / (levels - 1)).clamp(min=TINY))
        zero = torch.ceil(-lo / width.float() - 0.5).clamp(0, levels - 1)
        return width, zero.to(torch.int16)

    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        if x.numel() == 0:
            return Packed(self, {"raw": x.detach()})  # empty: nothing to quantize, no bytes
        meta = {"shape": x.shape, "dtype": x.dtype, "channels_last": _is_channels_last(x)}
        xc = as_channels(x)
        width, zero = self.grid(xc)
        _, _, bshape = channel_layout(xc)
        codes = torch.round(xc.float() / width.float().view(bshape)) + zero.float().view(bshape)
        codes = codes.clamp_(0, 2 ** self.bits - 1)
        return Packed(self, {"codes": pack_bits(codes, self.bits), "width": width, "zero": zero}, meta)

    def decode(self, packed: Packed) -> torch.Tensor:
        t, meta = packed.tensors, packed.meta
        if "raw" in t:
            return t["raw"]
        shape = meta["shape"]
        numel = math.prod(shape)
        view_shape = tuple(shape) if len(shape) >= 2 else (1, 1, numel)
        bshape = [1, view_shape[1]] + [1] * (len(view_shape) - 2)
        codes = unpack_bits(t["codes"], self.bits, numel).view(view_shape).float()
        x = (codes - t["zero"].float().view(bshape)) * t["width"].float().view(bshape)
        return _restore_format(x.reshape(shape).to(meta["dtype"]), meta["channels_last"])

    def closed_form_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        numel = math.prod(shape)
        if numel == 0:
            return 0
        return packed_nbytes(numel, self.bits) + 4 * channel_count(tuple(shape))


def build_blpa(bits: int = 4, range_std: float = 3.0, **_) -> TrainingMethod:
    return CodecMethod("blpa", BLPACodec(bits=bits, range_std=range_std))
