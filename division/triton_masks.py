"""Fused Triton kernels for the exact codecs (division/exact.py): the 1-bit masks of ReLU, dropout
and bool tensors, and max-pooling's window offsets (at the end of this module).

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
from .triton_launch import INT32_LIMIT, CachedLaunch, aligned, cdiv, dense_layout, runs_here

_BYTES = 1024  # output bytes (8 elements each) per program
_WARPS = 4


@triton.jit
def _byte_tile(BYTES: tl.constexpr, INT64: tl.constexpr):
    """This program's tile [BYTES, 8]: stored bytes b, bit lanes j, element indices 8 b + j."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    b = pid * BYTES + tl.arange(0, BYTES)
    j = tl.arange(0, 8)
    return b, j, b[:, None] * 8 + j[None, :]


@triton.jit(do_not_specialize=["n"])
def _pack_kernel(x_ptr, bits_ptr, n, NONZERO: tl.constexpr, BYTES: tl.constexpr, INT64: tl.constexpr,
                 EVEN: tl.constexpr):
    b, j, idx = _byte_tile(BYTES, INT64)
    # EVEN: n is a multiple of the tile, so no bounds mask: a mask of unknown alignment would split
    # the loads and stores into single elements
    if EVEN:
        x = tl.load(x_ptr + idx)
    else:
        x = tl.load(x_ptr + idx, mask=idx < n, other=0)
    if NONZERO:
        bit = x != 0
    else:
        bit = x > 0
    # element 8b + j goes to bit j of byte b, as packing.pack_bits lays codes out
    byte = tl.sum(bit.to(tl.int32) << j[None, :], axis=1).to(tl.uint8)
    if EVEN:
        tl.store(bits_ptr + b, byte)
    else:
        tl.store(bits_ptr + b, byte, mask=b * 8 < n)


@triton.jit(do_not_specialize=["n"])
def _unpack_kernel(bits_ptr, out_ptr, scale_ptr, n, HAS_SCALE: tl.constexpr, BYTES: tl.constexpr,
                   INT64: tl.constexpr, EVEN: tl.constexpr):
    # Tile [BYTES, 8]: each row is one stored byte and the 8 elements it covers, contiguous in the
    # output, so a thread loads its byte once and stores 8 elements at once (no mask when EVEN).
    b, j, idx = _byte_tile(BYTES, INT64)
    if EVEN:
        byte = tl.load(bits_ptr + b).to(tl.int32)
    else:
        byte = tl.load(bits_ptr + b, mask=b * 8 < n, other=0).to(tl.int32)
    bit = (byte[:, None] >> j[None, :]) & 1
    # through fp32 (exact for 0, 1 and a 16-bit scale; Triton's interpreter mis-casts int -> bf16)
    val = bit.to(tl.float32)
    if HAS_SCALE:
        val = val * tl.load(scale_ptr).to(tl.float32)  # 0 or the scale, as the reference's mask * scale
    if EVEN:
        tl.store(out_ptr + idx, val.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + idx, val.to(out_ptr.dtype.element_ty), mask=idx < n)


_PACK = CachedLaunch(_pack_kernel)
_UNPACK = CachedLaunch(_unpack_kernel)


def applies(x: torch.Tensor) -> bool:
    return runs_here(x) and dense_layout(x) is not None


def _launch_args(n: int) -> tuple[tuple[int], bool, bool]:
    """(grid, 64-bit indices, n a whole number of tiles)."""
    return (cdiv(n, 8 * _BYTES),), n >= INT32_LIMIT, n % (8 * _BYTES) == 0


def pack(x: torch.Tensor, nonzero: bool, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``x > 0`` (or ``x != 0`` with ``nonzero``) at one bit per element, in storage order, into
    ``out`` if given; None if the kernel does not apply."""
    if not applies(x):
        return None
    n = x.numel()
    bits = torch.empty(packed_nbytes(n, 1), dtype=torch.uint8, device=x.device) if out is None else out
    if n:
        if x.dtype == torch.bool:
            x = x.view(torch.uint8)  # same bytes; Triton loads bool pointers as 1-bit integers
        grid, int64, even = _launch_args(n)
        _PACK.launch((x.dtype, aligned(x), nonzero, int64, even, x.device.index), grid, (x, bits, n),
                     dict(NONZERO=nonzero, BYTES=_BYTES, INT64=int64, EVEN=even), _WARPS)
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
        grid, int64, even = _launch_args(n)
        _UNPACK.launch((dtype, aligned(bits), has_scale, int64, even, bits.device.index), grid,
                       (bits, target, scale if has_scale else bits, n),
                       dict(HAS_SCALE=has_scale, BYTES=_BYTES, INT64=int64, EVEN=even), _WARPS)
    return out


# ---------------------------------------------------------------------- max-pool window offsets
# MaxPoolIndexCodec (exact.py): an argmax index into the input plane <-> its position inside the
# pooling window (uint8), in one pass each way. Element i of the storage (NCHW or NHWC order) sits
# at output position (ho, wo); its window starts at (ho * SH - PH, wo * SW - PW).

@triton.jit
def _window_start(i, C, HO: tl.constexpr, WO: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                  PH: tl.constexpr, PW: tl.constexpr, CL: tl.constexpr):
    if CL:
        pos = i // C            # NHWC: channels vary fastest
    else:
        pos = i
    wo = pos % WO
    ho = (pos // WO) % HO
    return ho * SH - PH, wo * SW - PW


@triton.jit(do_not_specialize=["n", "C"])
def _offset_kernel(src_ptr, dst_ptr, n, C, WIN: tl.constexpr, HO: tl.constexpr, WO: tl.constexpr,
                   KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
                   PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, CL: tl.constexpr,
                   BLOCK: tl.constexpr, INT64: tl.constexpr, DECODE: tl.constexpr):
    """Encode: int64 index -> uint8 offset in the window; DECODE: the way back."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    hs, ws = _window_start(i, C, HO, WO, SH, SW, PH, PW, CL)
    if DECODE:
        off = tl.load(src_ptr + i, mask=inside, other=0).to(tl.int32)
        dh = off // KW
        dw = off - dh * KW
        flat = (hs + dh * DH).to(tl.int64) * WIN + (ws + dw * DW)
        tl.store(dst_ptr + i, flat, mask=inside)
    else:
        flat = tl.load(src_ptr + i, mask=inside, other=0)
        row = flat // WIN
        col = flat - row * WIN
        # row - hs and col - ws are >= 0 inside the window: truncating division is the floor
        off = ((row - hs) // DH) * KW + (col - ws) // DW
        tl.store(dst_ptr + i, off.to(tl.uint8), mask=inside)


_OFFSETS = CachedLaunch(_offset_kernel)
_OFFSET_BLOCK = 2048


def _offset_constexprs(geometry: tuple, shape, channels_last: bool, int64: bool, decode: bool) -> dict:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), win = geometry
    return dict(WIN=win, HO=int(shape[-2]), WO=int(shape[-1]), KW=kw, SH=sh, SW=sw, PH=ph, PW=pw,
                DH=dh, DW=dw, CL=channels_last, BLOCK=_OFFSET_BLOCK, INT64=int64, DECODE=decode)


def encode_offsets(indices: torch.Tensor, geometry: tuple) -> Optional[torch.Tensor]:
    """Max-pool argmax ``indices`` (int64, 4-D) as uint8 window offsets in the same memory format;
    ``geometry`` = (kernel, stride, padding, dilation, input width). None if the kernel does not apply."""
    return _offsets_launch(indices, torch.uint8, geometry, decode=False)


def decode_offsets(offsets: torch.Tensor, geometry: tuple) -> Optional[torch.Tensor]:
    """Inverse of ``encode_offsets``: the int64 argmax indices, in the offsets' memory format."""
    return _offsets_launch(offsets, torch.int64, geometry, decode=True)


def _offsets_launch(src: torch.Tensor, out_dtype: torch.dtype, geometry: tuple,
                    decode: bool) -> Optional[torch.Tensor]:
    cl = dense_layout(src) if src.dim() == 4 and runs_here(src) else None
    if cl is None:
        return None
    out = torch.empty_like(src, dtype=out_dtype)  # keeps the memory format
    n = src.numel()
    if n:
        int64 = n >= INT32_LIMIT
        key = (decode, geometry, tuple(src.shape[-2:]), cl, int64, aligned(src), src.device.index)
        _OFFSETS.launch(key, (cdiv(n, _OFFSET_BLOCK),), (src, out, n, src.shape[1]),
                        lambda: _offset_constexprs(geometry, src.shape, cl, int64, decode), 4)
    return out
