"""Fused Triton kernels for the exact 1-bit masks of ReLU, dropout and bool tensors (division/exact.py).

One launch each way instead of a chain of PyTorch ops: pack reads the tensor once and writes one
bit per element (``x > 0`` for ReLU, ``x != 0`` for dropout noise and bool masks); unpack reads the
bits and writes 0 / 1 (times dropout's scale) in the output dtype. Both walk the tensor's storage
in memory order, so a channels_last tensor needs no reordering copy; the stored bits are the ones
``division.packing.pack_mask`` makes from the same storage order (the reference path in exact.py).

``pack`` / ``unpack`` return None where the kernels do not apply (not on CUDA, or a layout that is
neither contiguous nor channels_last): the caller then takes the PyTorch path. Under Triton's
interpreter (TRITON_INTERPRET=1 before this module is imported) they also run on CPU tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .packing import packed_nbytes
from .triton_launch import INT32_LIMIT, CachedLaunch, aligned, dense_layout, runs_here

_BYTES = 1024  # output bytes (8 elements each) per program
_WARPS = 4


@triton.jit(do_not_specialize=["n"])
def _pack_kernel(x_ptr, bits_ptr, n, NONZERO: tl.constexpr, BYTES: tl.constexpr, INT64: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    b = pid * BYTES + tl.arange(0, BYTES)
    j = tl.arange(0, 8)
    idx = b[:, None] * 8 + j[None, :]
    x = tl.load(x_ptr + idx, mask=idx < n, other=0)
    if NONZERO:
        bit = x != 0
    else:
        bit = x > 0
    # element 8b + j goes to bit j of byte b, as packing.pack_bits lays codes out
    byte = tl.sum(bit.to(tl.int32) << j[None, :], axis=1)
    tl.store(bits_ptr + b, byte.to(tl.uint8), mask=b * 8 < n)


@triton.jit(do_not_specialize=["n"])
def _unpack_kernel(bits_ptr, out_ptr, scale_ptr, n, HAS_SCALE: tl.constexpr, BYTES: tl.constexpr,
                   INT64: tl.constexpr):
    # One lane per output element (a 1-D tile, so the stores are wide and contiguous); the 8 lanes
    # of a byte load the same byte, from cache after the first.
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    idx = pid * (BYTES * 8) + tl.arange(0, BYTES * 8)
    inside = idx < n
    byte = tl.load(bits_ptr + idx // 8, mask=inside, other=0).to(tl.int32)
    bit = (byte >> (idx % 8).to(tl.int32)) & 1
    # through fp32 (exact for 0, 1 and a 16-bit scale; Triton's interpreter mis-casts int -> bf16)
    val = bit.to(tl.float32)
    if HAS_SCALE:
        val = val * tl.load(scale_ptr).to(tl.float32)  # 0 or the scale, as the reference's mask * scale
    tl.store(out_ptr + idx, val.to(out_ptr.dtype.element_ty), mask=inside)


_PACK = CachedLaunch(_pack_kernel)
_UNPACK = CachedLaunch(_unpack_kernel)


def applies(x: torch.Tensor) -> bool:
    return runs_here(x) and dense_layout(x) is not None


def _launch_args(n: int) -> tuple[tuple[int], bool]:
    return (triton.cdiv(n, 8 * _BYTES),), n >= INT32_LIMIT


def pack(x: torch.Tensor, nonzero: bool) -> Optional[torch.Tensor]:
    """``x > 0`` (or ``x != 0`` with ``nonzero``) at one bit per element, in storage order;
    None if the kernel does not apply."""
    if not applies(x):
        return None
    n = x.numel()
    bits = torch.empty(packed_nbytes(n, 1), dtype=torch.uint8, device=x.device)
    if n:
        if x.dtype == torch.bool:
            x = x.view(torch.uint8)  # same bytes; Triton loads bool pointers as 1-bit integers
        grid, int64 = _launch_args(n)
        _PACK.launch((x.dtype, aligned(x), nonzero, int64, x.device.index), grid, (x, bits, n),
                     dict(NONZERO=nonzero, BYTES=_BYTES, INT64=int64), _WARPS)
    return bits


def unpack(bits: torch.Tensor, shape: torch.Size, dtype: torch.dtype, channels_last: bool,
           scale: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The mask as 0 / 1 (times ``scale``) in ``dtype`` and the stored memory format;
    None if the kernel does not apply."""
    if not runs_here(bits) or not bits.is_contiguous():
        return None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(shape, dtype=dtype, device=bits.device, memory_format=fmt)
    n = out.numel()
    if n:
        target = out.view(torch.uint8) if dtype == torch.bool else out
        has_scale = scale is not None
        grid, int64 = _launch_args(n)
        _UNPACK.launch((dtype, aligned(bits), has_scale, int64, bits.device.index), grid,
                       (bits, target, scale if has_scale else bits, n),
                       dict(HAS_SCALE=has_scale, BYTES=_BYTES, INT64=int64), _WARPS)
    return out
