"""DIVISION's codec with fused Triton kernels: the GPU fast path of ``dual_precision.DivisionCodec``.

``TritonDivisionCodec`` takes the reference's constructor and writes the reference's stored format
(``Packed.tensors`` = lfc / codes / mn / step, same meta), so either codec decodes the other's
``Packed``. Two kernels; a program owns ``G`` consecutive channels (planes) of one sample, reads x
in its own memory format (NCHW, or NHWC where G neighbouring channels are contiguous) and writes
codes in NCHW order, or, for channels_last maps whose planes are whole bytes, in NHWC order: byte
b of plane (n, c) (its codes of elements b * PB .. b * PB + PB - 1 in NCHW order) at
(n * H * W / PB + b) * C + c, so G channels store G contiguous bytes (``meta["codes_order"] =
"nhwc"``; the reference decodes both orders).

Split planes: where N * C / G programs leave the GPU with few warps per SM (large NHWC planes), a
plane group is split into chunks of block rows (one program each, the chunks of a group neighbours
on a 1-D grid). The encode then takes two launches: phase 1 runs pass 1 on its chunk and writes the
chunk's HFC (min, max); phase 2 reduces the chunks' ranges (exactly the one-launch range), writes
mn / step from chunk 0 and runs pass 2 on its chunk. The decode needs no range and just walks its
chunk.

encode
    pass 1  reads x once and produces the LFC and each plane's HFC range:
            mode 1 (NCHW default): a row loop; tile [G, blocks, kw] = one image row, the kh rows of a
              block row unrolled and accumulated elementwise (sum, min, max of x), reduced over kw
              only; the HFC min / max of a block is fl(min x - lfc) / fl(max x - lfc), exact because
              subtraction is monotone. mode 0 (NHWC default): 4-D tiles [G, kh, blocks, kw].
            block mean = sum / count of valid elements (IEEE division), rounded to bf16 = the LFC;
            mn = min HFC rounded down to bf16, step = (max - mn) / (2^Q - 1) rounded up to bf16.
            Asked for x's ReLU mask (``relu_mask``, NHWC mode 0 with G of 8 to 64), it also stores
            ``x > 0`` as one G-bit word per pixel: the exact ReLU mask's bits, no second read of x.
    pass 2  re-reads x (this program read it moments ago: L2 hits), subtracts the stored LFC and mn,
            divides by step, adds u (stochastic) or 0.5 (nearest), clamps, packs PB = 8 // Q codes
            per byte and stores the bytes. Rows whose width and block width are multiples of PB
            walk block rows; other maps (7x7, 14x14 at Q=2) walk each plane in flat NCHW order,
            shifting a plane whose first code is not on a byte boundary and OR-ing the byte it
            shares with the previous plane after the loop (``MISALIGNED``), so no byte is written
            twice.
decode  4-D tiles [G, kh, blocks, kw] per block row: one LFC load per block, one byte load per
        element (cached), unpack -> ``lfc + (mn + code * step)`` -> cast -> store in the output's
        memory format (contiguous or channels_last). With a linked ReLU mask (``relu_zeros``,
        division/exact.py) it also reads the mask's bit of each element (NHWC programs of 8-64
        channels: the G bits of a pixel as one word) and writes 0 where it is clear, at least the
        smallest normal number where it is set.

The LFC is kept in the input's memory format (an (N, C, HB, WB) tensor, channels_last for a
channels_last input), so the G channels of one block are neighbours in NHWC tiles.

Arithmetic follows the reference operation by operation in fp32, so with ``rounding="nearest"`` the
fast path stores the reference's bytes (exactly when the block sums are exact in fp32, e.g. the
tests' inputs; otherwise a block mean may differ by one bf16 ulp and a few codes by one):
IEEE division for block means and (nearest) for the quantization ratio; round-to-nearest-even
bf16 done with integer ops under Triton's interpreter (whose cast truncates); and the step's
``(max - mn) / levels`` computed as PyTorch computes it on the same device (IEEE division on the
CPU, multiplication by the fp32 reciprocal on CUDA). With stochastic rounding the ratio is one fma
per element, ``fma(x, 1/step, -(lfc + mn)/step)`` (off by about 2^-24 |x| / step of a step; with
``TUNING["fma_quantize"] = False``, ``(x - lfc - mn) * (1/step)`` plus one fma correction).

Random numbers: one 32-bit hash per output byte of (seed, global byte index) (golden-ratio spread
+ seed, then Wellons' lowbias32), spread to the byte's PB code lanes by distinct odd multipliers;
the top 23 bits become a float in [0, 1) (``RNG_HASH``; each lane is exactly uniform; draws depend
only on the element's NCHW position, so a channels_last input encodes like its contiguous copy).
Draws follow the logical (NCHW) byte index also when codes are stored in NHWC order.
``RNG_PHILOX`` uses Triton's ``tl.rand`` (1.6x slower encode on an H200). The 31-bit seed of each
encode is drawn on the host (no device sync): from the codec's generator when it lives on the CPU,
else from a private host stream (Python's ``random.Random``) seeded with the codec generator's
``initial_seed()`` (or ``torch.initial_seed()`` when there is none), so ``torch.manual_seed(s)``
before building the codec makes runs reproducible. The draws differ from the reference's
``torch.rand``, so stochastic codes differ from the reference's (same law: unbiased, |error| < step).
A CUDA graph would replay a host seed frozen at capture; an encode captured in a graph therefore
also reads a per-device int32 counter (``graph_seed_counter``) that the graph itself advances right
before the kernel, and hashes the two: every replay draws new numbers.

Fallback to the reference (``super()``): CPU tensors (unless Triton's interpreter is active:
``TRITON_INTERPRET=1`` before this module is imported); inputs that are not fp32 / bf16 / fp16
4-D contiguous or channels_last maps, contiguous (N, F) features or contiguous volumes (the last
two are reshapes of their canonical maps, coded as maps; (N, L, D) sequences are transposes);
``keep_lfc=False``, ``keep_hfc=False``, ``simulate=True``; maps of one element or fewer elements
than codes per byte; block sizes that are neither a power of two nor cover the whole axis
(``block_size=6`` on a 14-wide map); and channel counts with no admissible
group size (C = 3 with 7x7 maps at Q = 2). A channels_last map narrower than
``TUNING["narrow_pixel_bytes"]`` per pixel (3-channel images) is coded from its contiguous copy
with the NCHW kernels and decoded back to channels_last (``plan_for``). Tunables: ``TUNING``
(docs/kernels.md).
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import triton
import triton.language as tl

from .codec import Packed, SaveContext
from .exact import apply_relu_mask, relu_mask_bits
from .dual_precision import (CODES_NCHW, CODES_NHWC, LAYOUT_FEATURES, LAYOUT_MAPS, LAYOUT_VOLUME,
                             DivisionCodec, Geometry, _memory_format)
from .packing import packed_nbytes
from .triton_launch import (INT32_LIMIT, CachedLaunch, aligned, dense_layout, interpreting,
                            runs_here)

RNG_HASH = 0
RNG_PHILOX = 1

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INTERPRET = interpreting()


# =================================================================================== the kernels
# Integer arguments other than the seed (C, CG) are specialised by Triton; every launch key below
# includes the plan, which fixes them.
@triton.jit
def _to_bf16(x, EXACT: tl.constexpr):
    """fp32 -> bf16, round to nearest even. The GPU cast does it; Triton's interpreter truncates,
    so under EXACT the rounding is done with integer ops first (the cast is then exact)."""
    if EXACT:
        b = x.to(tl.int32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        b = b & -65536
        x = b.to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def _cast_out(val, out_ptr, EXACT: tl.constexpr):
    if out_ptr.dtype.element_ty == tl.bfloat16:
        return _to_bf16(val, EXACT)
    else:
        return val.to(out_ptr.dtype.element_ty)


@triton.jit
def _bf16_directed(x, UP: tl.constexpr):
    """fp32 -> bf16 value rounded toward +inf (UP) or -inf, as fp32: the reference's bf16_directed."""
    b = x.to(tl.int32, bitcast=True)
    low = b & 0xFFFF
    trunc = b - low
    if UP:
        wrong = (low != 0) & (x > 0)
    else:
        wrong = (low != 0) & (x < 0)
    b = tl.where(wrong, trunc + 0x10000, trunc)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _quotient(a, b, rcp, EXACT: tl.constexpr):
    """a / b. EXACT: correctly rounded (``div_rn``, as torch's division; used for nearest rounding,
    whose codes must match the reference bit for bit). Otherwise (stochastic rounding, where one
    ulp is far below the noise) a * (1/b) refined by one fma correction: 3 FP32 instructions
    instead of div.rn's ~10, within about one ulp."""
    if EXACT:
        return tl.math.div_rn(a, b)
    else:
        q = a * rcp
        r = tl.fma(-q, b, a)
        return tl.fma(r, rcp, q)


@triton.jit
def _lane_uniform(seed, bctr, jl, PB: tl.constexpr, RNG: tl.constexpr):
    """U[0, 1) for code lane ``jl`` (0..PB-1) of byte ``bctr`` (uint32 global byte index).

    RNG 0: one 32-bit hash per byte (golden-ratio spread + seed, then Wellons' lowbias32), spread
    to the byte's lanes by distinct odd multipliers (each lane is exactly uniform: a bijection of
    the hash); the top 23 bits become the mantissa of a float in [1, 2). No int->float conversion.
    RNG 1: Triton's Philox ``tl.rand`` on the element index (slower, reference quality).
    """
    if RNG == 0:
        h = bctr * 0x9E3779B1 + seed.to(tl.uint32)
        h ^= h >> 16
        h *= 0x21F0AAAD
        h ^= h >> 15
        h *= 0x735A2D97
        h ^= h >> 15
        if PB > 1:
            h = h * (jl.to(tl.uint32) * 0xB0A3E85A + 1)
        return ((h >> 9) | 0x3F800000).to(tl.float32, bitcast=True) - 1.0
    else:
        return tl.rand(seed, (bctr * PB + jl.to(tl.uint32)).to(tl.int32, bitcast=True))


@triton.jit
def _code_float(code):
    """Small non-negative int32 -> fp32 without a conversion instruction (2^23 magic)."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _code_offset(bidx, n, eb, chan, C, HWB: tl.constexpr, CODES_CL: tl.constexpr):
    """Where the code byte of logical (NCHW-order) index ``bidx`` is stored: at ``bidx`` itself, or
    (CODES_CL) in (N, H * W / PB, C) order, where the G channels of one byte position are neighbours
    (whole-sector stores from NHWC tiles). ``eb`` (the byte's index within its plane, of HWB) and
    ``chan`` (channel) are shaped to broadcast to ``bidx``'s tile."""
    if CODES_CL:
        return (n * HWB + eb) * C + chan
    else:
        return bidx


@triton.jit
def _lfc_base(lfc_ptr, n, c0, p0, g, C, HBWB: tl.constexpr, CL: tl.constexpr):
    """(pointers to the LFC of the program's G planes [G, 1], stride of one block). The LFC is
    stored in the input's memory format: (N, HB, WB, C) for channels_last, so the G channels of one
    block are neighbours (one or two sectors per tile instead of one per channel)."""
    if CL:
        return lfc_ptr + n * (HBWB * C) + (c0 + g)[:, None], C
    else:
        return lfc_ptr + (p0 + g)[:, None] * HBWB, 1


@triton.jit
def _program(SPLIT: tl.constexpr):
    """(plane group, chunk) of this program on a 1-D grid of groups * SPLIT: the chunks of a group
    are adjacent, so programs that run together read neighbouring rows."""
    lin = tl.program_id(0)
    group = lin // SPLIT
    return group, lin - group * SPLIT


@triton.jit
def _relu_masked(val, mask_ptr, off, live, TINY: tl.constexpr):
    """The decoded output of a ReLU where its exact 1-bit mask (bit ``off`` of ``mask_ptr``: the
    mask's bits follow the output's storage order) says what the output was: 0 where it was 0, at
    least the smallest positive normal number (``TINY``) where it was positive."""
    bit = (tl.load(mask_ptr + (off >> 3), mask=live, other=0).to(tl.int32) >> (off & 7).to(tl.int32)) & 1
    return tl.where(bit != 0, tl.maximum(val, TINY), 0.0)


@triton.jit
def _mask_words(maskw_ptr, pix, group, CG, live):
    """NHWC masks read a word per pixel: the G bits of a program's G channels (channel c0 + g is
    bit g of word pix * C / G + c0 / G, little-endian, ``maskw_ptr`` typed with G bits)."""
    word = tl.load(maskw_ptr + pix * CG + group, mask=live, other=0)
    if word.dtype.primitive_bitwidth < 32:
        word = word.to(tl.int32)
    return word


@triton.jit
def _relu_masked_words(val, word, g, TINY: tl.constexpr):
    """``_relu_masked`` with the bits of channel ``g`` taken from the pixel's word."""
    bit = (word >> g.to(word.dtype)) & 1
    return tl.where(bit != 0, tl.maximum(val, TINY), 0.0)


@triton.jit
def _store_mask_words(maskw_ptr, xv, pix0, hb, wb, group, CG, H: tl.constexpr, W: tl.constexpr,
                      KH: tl.constexpr, KW: tl.constexpr, TKH: tl.constexpr, TKW: tl.constexpr,
                      G: tl.constexpr, FULL: tl.constexpr):
    """The ReLU mask of an NHWC tile [G, TKH, WBC, TKW] (one block row of G channels): ``xv > 0``
    as one G-bit word per pixel, the words ``_mask_words`` reads (channel c0 + g is bit g). Block
    columns past the map repeat the last block, so a few words are stored twice, with equal values."""
    if G > 32:
        bits = (xv > 0).to(tl.int64) << tl.arange(0, G).to(tl.int64)[:, None, None, None]
    else:
        bits = (xv > 0).to(tl.int32) << tl.arange(0, G)[:, None, None, None]
    word = tl.sum(bits, axis=0)                                   # disjoint bits: the sum is the OR
    ii = tl.arange(0, TKH)[:, None, None]
    jj = tl.arange(0, TKW)[None, None, :]
    hh = hb * KH + ii
    ww = wb[None, :, None] * KW + jj
    ptrs = maskw_ptr + (pix0 + hh * W + ww) * CG + group
    if FULL:
        tl.store(ptrs, word.to(maskw_ptr.dtype.element_ty))
    else:
        tl.store(ptrs, word.to(maskw_ptr.dtype.element_ty), mask=(ii < KH) & (hh < H) & (jj < KW) & (ww < W))


@triton.jit(do_not_specialize=["seed"])
def _encode_kernel(x_ptr, lfc_ptr, codes_ptr, mn_ptr, step_ptr, part_ptr, seed_ptr, maskw_ptr,
                   y_ptr, nstat_ptr, nmean_ptr, ncoef_ptr, seed, C, CG,
                   H: tl.constexpr, W: tl.constexpr, HW: tl.constexpr,
                   KH: tl.constexpr, KW: tl.constexpr, HB: tl.constexpr, WB: tl.constexpr,
                   TKH: tl.constexpr, TKW: tl.constexpr, WBC: tl.constexpr, NWC: tl.constexpr,
                   FULL_H: tl.constexpr, FULL_W: tl.constexpr,
                   G: tl.constexpr, E: tl.constexpr, EB: tl.constexpr, NK: tl.constexpr,
                   PB: tl.constexpr, Q: tl.constexpr, LEVELS: tl.constexpr,
                   STOCHASTIC: tl.constexpr, RNG: tl.constexpr, ROW: tl.constexpr,
                   MISALIGNED: tl.constexpr, CL: tl.constexpr, INT64: tl.constexpr,
                   EXACT: tl.constexpr, MODE: tl.constexpr, RCP_LEVELS: tl.constexpr,
                   SEED_PTR: tl.constexpr, PHASE: tl.constexpr, SPLIT: tl.constexpr,
                   SPLIT_P2: tl.constexpr, HBS: tl.constexpr, CODES_CL: tl.constexpr,
                   FMA_Q: tl.constexpr, PACK_MASK: tl.constexpr, NORM: tl.constexpr):
    """NORM: a training BatchNorm's forward rides along (division/triton_norm.py, split phases
    1 and 2 of NHWC mode 0): phase 1 also writes its chunk's per-channel (count, mean, M2) to
    ``nstat_ptr`` (rows n * SPLIT + s of [3, C]); phase 2 writes ``y = (x - mean) * scale + bias``
    (``nmean_ptr``, ``ncoef_ptr`` = [scale, bias] per channel) to ``y_ptr``, x's layout."""
    tl.static_assert(not NORM or (MODE == 0 and CL and not MISALIGNED and PHASE != 0))
    if SEED_PTR:
        # Under a CUDA graph: the host's seed is frozen into the graph, so mix in a device
        # counter that the replayed graph advances before every encode (see graph_seed_counter).
        seed = ((tl.load(seed_ptr).to(tl.uint32) * 0x85EBCA6B + seed.to(tl.uint32)) & 0x7FFFFFFF).to(tl.int32)
    pid, s = _program(SPLIT)                     # plane group, chunk of block rows (split planes)
    hb0 = s * HBS                                  # this program's block rows: hb0 .. hb0 + HBS - 1
    if INT64:
        pid = pid.to(tl.int64)
    n = pid // CG
    c0 = (pid - n * CG) * G
    p0 = pid * G                                   # first plane (n * C + c0) of this program
    g = tl.arange(0, G)
    if CL:   # NHWC memory: G neighbouring channels are contiguous, an element step is C
        x_off = n * (HW * C) + c0
        sE = C
    else:    # NCHW memory: each plane is contiguous
        x_off = p0 * HW
        sE = 1
    x_base = x_ptr + x_off
    wl = tl.arange(0, WBC)
    lfc_base, sL = _lfc_base(lfc_ptr, n, c0, p0, g, C, HB * WB, CL)   # [G, 1], block stride

    # ---------------------------------------------------------------- pass 1: LFC and HFC range
    if PHASE != 2:
        if MODE == 1:
            # Row loop: tile [G, WBC, TKW] = one image row of WBC blocks of G planes; the KH rows of a
            # block row are unrolled and accumulated elementwise (sum, min, max of x), then reduced
            # over TKW only. min / max of the HFC per block follow from min / max of x, because
            # fl(a - lf) is monotone in a: min(fl(x - lf)) == fl(min(x) - lf), bit for bit.
            g3 = g[:, None, None]
            j3 = tl.arange(0, TKW)[None, None, :]
            if CL:
                x_rows = x_base + g3
            else:
                x_rows = x_base + g3 * HW
            acc_lo = tl.full([G, WBC], float("inf"), tl.float32)
            acc_hi = tl.full([G, WBC], float("-inf"), tl.float32)
            for hbi in range(HBS):
                hb = hb0 + hbi
                rows = tl.minimum(H - hb * KH, KH)
                for wc in range(NWC):
                    wb = tl.minimum(wc * WBC + wl, WB - 1)
                    ww = wb[None, :, None] * KW + j3
                    if not FULL_W:
                        cm = (j3 < KW) & (ww < W) & (g3 < G)
                    ssum = tl.zeros([G, WBC, TKW], tl.float32)
                    lo = tl.full([G, WBC, TKW], float("inf"), tl.float32)
                    hi = tl.full([G, WBC, TKW], float("-inf"), tl.float32)
                    for i in tl.static_range(KH):
                        hh = hb * KH + i
                        ptrs = x_rows + (hh * W + ww) * sE
                        if FULL_H and FULL_W:
                            xv = tl.load(ptrs, eviction_policy="evict_last").to(tl.float32)
                            lo = tl.minimum(lo, xv)
                            hi = tl.maximum(hi, xv)
                        else:
                            if FULL_H:
                                m = cm
                            elif FULL_W:
                                m = (hh < H) & (g3 < G) & (j3 < TKW)
                            else:
                                m = cm & (hh < H)
                            xv = tl.load(ptrs, mask=m, other=0.0, eviction_policy="evict_last").to(tl.float32)
                            lo = tl.minimum(lo, tl.where(m, xv, float("inf")))
                            hi = tl.maximum(hi, tl.where(m, xv, float("-inf")))
                        ssum += xv
                    cnt = (rows * tl.minimum(W - wb * KW, KW)).to(tl.float32)
                    lf16 = _to_bf16(tl.math.div_rn(tl.sum(ssum, axis=2), cnt[None, :]), EXACT)
                    tl.store(lfc_base + (hb * WB + (wc * WBC + wl)[None, :]) * sL, lf16,
                             mask=(g[:, None] < G) & ((wc * WBC + wl) < WB)[None, :])
                    lf = lf16.to(tl.float32)
                    acc_lo = tl.minimum(acc_lo, tl.min(lo, axis=2) - lf)
                    acc_hi = tl.maximum(acc_hi, tl.max(hi, axis=2) - lf)
            mn_acc = tl.min(acc_lo, axis=1)
            mx_acc = tl.max(acc_hi, axis=1)
        else:
            # Tile [G, TKH, WBC, TKW]: G planes x one block row x WBC blocks. Block columns past WB repeat
            # the last block (same sums, same HFC), so they need no mask; partial blocks are masked.
            gi = g[:, None, None, None]
            ii = tl.arange(0, TKH)[None, :, None, None]
            jj = tl.arange(0, TKW)[None, None, None, :]
            if CL:
                x_planes = x_base + gi
            else:
                x_planes = x_base + gi * HW
            mn_acc = tl.full([G], float("inf"), tl.float32)
            mx_acc = tl.full([G], float("-inf"), tl.float32)
            if NORM:
                s_cnt = tl.zeros([G], tl.float32)
                s_mean = tl.zeros([G], tl.float32)
                s_m2 = tl.zeros([G], tl.float32)
            for hbi in range(HBS):
                hb = hb0 + hbi
                hh = hb * KH + ii
                rows = tl.minimum(H - hb * KH, KH)
                for wc in range(NWC):
                    wb = tl.minimum(wc * WBC + wl, WB - 1)
                    ww = wb[None, None, :, None] * KW + jj
                    ptrs = x_planes + (hh * W + ww) * sE
                    if FULL_H and FULL_W:
                        xv = tl.load(ptrs, eviction_policy="evict_last").to(tl.float32)
                    else:
                        m = (ii < KH) & (hh < H) & (jj < KW) & (ww < W)
                        xv = tl.load(ptrs, mask=m, other=0.0, eviction_policy="evict_last").to(tl.float32)
                    if PACK_MASK:
                        _store_mask_words(maskw_ptr, xv, n * HW, hb, wb, pid - n * CG, CG, H, W, KH, KW,
                                          TKH, TKW, G, FULL_H and FULL_W)
                    sums = tl.sum(tl.sum(xv, axis=3), axis=1)                  # [G, WBC]
                    cnt = (rows * tl.minimum(W - wb * KW, KW)).to(tl.float32)  # valid elements per block
                    lf16 = _to_bf16(tl.math.div_rn(sums, cnt[None, :]), EXACT)
                    tl.store(lfc_base + (hb * WB + (wc * WBC + wl)[None, :]) * sL, lf16,
                             mask=(g[:, None] < G) & ((wc * WBC + wl) < WB)[None, :])
                    # HFC range of each block from the range of x (exact: see mode 1), then over blocks
                    if FULL_H and FULL_W:
                        xlo = tl.min(tl.min(xv, axis=3), axis=1)
                        xhi = tl.max(tl.max(xv, axis=3), axis=1)
                    else:
                        xlo = tl.min(tl.min(tl.where(m, xv, float("inf")), axis=3), axis=1)
                        xhi = tl.max(tl.max(tl.where(m, xv, float("-inf")), axis=3), axis=1)
                    lf = lf16.to(tl.float32)
                    lo = tl.min(xlo - lf, axis=1)
                    hi = tl.max(xhi - lf, axis=1)
                    mn_acc = tl.minimum(mn_acc, lo)
                    mx_acc = tl.maximum(mx_acc, hi)
                    if NORM:
                        # The tile's count, mean and squared deviations (M2) per channel, merged
                        # into the chunk's by Chan et al.'s pairwise formula: no sum of squares,
                        # so no cancellation. Repeated block columns and masked elements are out.
                        col = (wc * WBC + wl) < WB
                        t_cnt = tl.sum(tl.where(col, cnt, 0.0), axis=0)
                        t_mean = tl.sum(tl.where(col[None, :], sums, 0.0), axis=1) / t_cnt
                        inside = col[None, None, :, None]
                        if not (FULL_H and FULL_W):
                            inside = inside & m
                        dx = tl.where(inside, xv - t_mean[:, None, None, None], 0.0)
                        t_m2 = tl.sum(tl.sum(tl.sum(dx * dx, axis=3), axis=2), axis=1)
                        both = s_cnt + t_cnt
                        frac = t_cnt / both
                        delta = t_mean - s_mean
                        s_mean = s_mean + delta * frac
                        s_m2 = s_m2 + t_m2 + delta * delta * (s_cnt * frac)
                        s_cnt = both

    if PHASE == 1:
        # Split plane, first kernel: this chunk's HFC range; the second kernel reduces them.
        part = part_ptr + ((p0 + g) * SPLIT + s) * 2
        tl.store(part, mn_acc)
        tl.store(part + 1, mx_acc)
        if NORM:
            stat = nstat_ptr + (n * SPLIT + s) * (3 * C) + c0 + g
            tl.store(stat, s_cnt)
            tl.store(stat + C, s_mean)
            tl.store(stat + 2 * C, s_m2)
    else:
        if PHASE == 2:
            # Split plane, second kernel: the plane's HFC range from every chunk's (min is exact,
            # so this is the fused kernel's range bit for bit).
            sp = tl.arange(0, SPLIT_P2)[None, :]
            part = part_ptr + ((p0 + g)[:, None] * SPLIT + sp) * 2
            mn_acc = tl.min(tl.load(part, mask=sp < SPLIT, other=float("inf")), axis=1)
            mx_acc = tl.max(tl.load(part + 1, mask=sp < SPLIT, other=float("-inf")), axis=1)
        mn_s = _bf16_directed(mn_acc, False)
        # The reference computes (max - mn) / levels with a Python-int divisor: IEEE division on the
        # CPU, but on CUDA PyTorch multiplies by the fp32 reciprocal (its CPU-scalar fast path), which
        # can land one fp32 ulp higher and then round up to the next bf16 step. Each path here matches
        # the reference on its own device (interpreter: CPU tensors; GPU: CUDA tensors).
        if EXACT:
            step_raw = tl.math.div_rn(mx_acc - mn_s, LEVELS * 1.0)
        else:
            step_raw = (mx_acc - mn_s) * RCP_LEVELS
        step_s = _bf16_directed(step_raw, True)
        tl.store(mn_ptr + p0 + g, mn_s.to(tl.bfloat16))
        tl.store(step_ptr + p0 + g, step_s.to(tl.bfloat16))
        safe = tl.where(step_s > 0, step_s, 1.0)       # constant map: every code is 0
        rcp = tl.math.div_rn(1.0, safe)
        tl.debug_barrier()  # the LFC stored above is read back below by other threads of this program
        if NORM:
            y_base = y_ptr + x_off
            n_mean = tl.load(nmean_ptr + c0 + g)
            n_scale = tl.load(ncoef_ptr + c0 + g)
            n_bias = tl.load(ncoef_ptr + C + c0 + g)

        # ------------------------------------------------------- pass 2: quantize and pack the HFC
        if ROW and MODE == 1:
            # Row loop, byte-aligned rows: tile [G, WBC, TKW // PB, PB] per image row.
            g4 = g[:, None, None, None]
            jb = tl.arange(0, TKW // PB)[None, None, :, None]
            jl = tl.arange(0, PB)[None, None, None, :]
            jb3 = tl.arange(0, TKW // PB)[None, None, :]
            if CL:
                x_rows4 = x_base + g4
            else:
                x_rows4 = x_base + g4 * HW
            mn4 = mn_s[:, None, None, None]
            st4 = safe[:, None, None, None]
            rc4 = rcp[:, None, None, None]
            code_rows = (p0 + g[:, None, None]) * (HW // PB)                  # [G, 1, 1]
            for hbi in range(HBS):
                hb = hb0 + hbi
                for wc in range(NWC):
                    wb = tl.minimum(wc * WBC + wl, WB - 1)
                    live = (g[:, None, None] < G) & ((wc * WBC + wl) < WB)[None, :, None]
                    ww = wb[None, :, None, None] * KW + jb * PB + jl
                    if not FULL_W:
                        cm = (jb * PB < KW) & (ww < W) & (g4 < G)
                        live = live & (jb3 * PB < KW) & (wb[None, :, None] * KW + jb3 * PB < W)
                    lf = tl.load(lfc_base + (hb * WB + wb[None, :]) * sL).to(tl.float32)[:, :, None, None]
                    for i in tl.static_range(KH):
                        hh = hb * KH + i
                        ptrs = x_rows4 + (hh * W + ww) * sE
                        if FULL_H and FULL_W:
                            xv = tl.load(ptrs, eviction_policy="evict_first").to(tl.float32)
                        else:
                            if FULL_W:
                                m = (hh < H) & (g4 < G) & (jl < PB)
                            elif FULL_H:
                                m = cm
                            else:
                                m = cm & (hh < H)
                            xv = tl.load(ptrs, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)
                        if FMA_Q:
                            v = tl.fma(xv, rc4, -((lf + mn4) * rc4))
                        else:
                            v = _quotient((xv - lf) - mn4, st4, rc4, EXACT or not STOCHASTIC)
                        bidx = code_rows + hh * (W // PB) + wb[None, :, None] * (KW // PB) + jb3
                        if STOCHASTIC:
                            if INT64:
                                bctr = bidx.to(tl.uint32)
                            else:
                                bctr = bidx.to(tl.uint32, bitcast=True)
                            v = v + _lane_uniform(seed, bctr[:, :, :, None], jl, PB, RNG)
                        else:
                            v = v + 0.5
                        code = tl.minimum(tl.maximum(v, 0.0), LEVELS * 1.0).to(tl.int32)
                        byte = tl.sum(code << (jl * Q), axis=3)                   # [G, WBC, TKW // PB]
                        if FULL_H:
                            keep = live
                        else:
                            keep = live & (hh < H)
                        sidx = _code_offset(bidx, n, hh * (W // PB) + wb[None, :, None] * (KW // PB) + jb3,
                                            (c0 + g)[:, None, None], C, HW // PB, CODES_CL)
                        tl.store(codes_ptr + sidx, byte.to(tl.uint8), mask=keep)
        elif ROW:
            # W and the block width are multiples of PB: a byte holds PB neighbours of one block row.
            # Tile [G, TKH, WBC, TKW // PB, PB], same walk as pass 1, LFC read per block.
            g5 = g[:, None, None, None, None]
            i5 = tl.arange(0, TKH)[None, :, None, None, None]
            jb = tl.arange(0, TKW // PB)[None, None, None, :, None]
            jl = tl.arange(0, PB)[None, None, None, None, :]
            if CL:
                x_planes5 = x_base + g5
            else:
                x_planes5 = x_base + g5 * HW
            mn5 = mn_s[:, None, None, None, None]
            st5 = safe[:, None, None, None, None]
            rc5 = rcp[:, None, None, None, None]
            code_planes = (p0 + g[:, None, None, None]) * (HW // PB)      # [G, 1, 1, 1] byte index
            i4 = tl.arange(0, TKH)[None, :, None, None]
            jb4 = tl.arange(0, TKW // PB)[None, None, None, :]
            for hbi in range(HBS):
                hb = hb0 + hbi
                hh = hb * KH + i5
                for wc in range(NWC):
                    wb = tl.minimum(wc * WBC + wl, WB - 1)
                    ww = wb[None, None, :, None, None] * KW + jb * PB + jl
                    el = (hh * W + ww) * sE
                    ptrs = x_planes5 + el
                    if FULL_H and FULL_W:
                        xv = tl.load(ptrs, eviction_policy="evict_first").to(tl.float32)
                    else:
                        m = (i5 < KH) & (hh < H) & (jb * PB < KW) & (ww < W)
                        xv = tl.load(ptrs, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)
                    if NORM:
                        # (repeated block columns store the same values twice)
                        yv = (xv - n_mean[:, None, None, None, None]) * n_scale[:, None, None, None, None] \
                            + n_bias[:, None, None, None, None]
                        if FULL_H and FULL_W:
                            tl.store(y_base + g5 + el, _cast_out(yv, y_ptr, EXACT))
                        else:
                            tl.store(y_base + g5 + el, _cast_out(yv, y_ptr, EXACT), mask=m)
                    lf = tl.load(lfc_base + (hb * WB + wb[None, :]) * sL).to(tl.float32)   # [G, WBC]
                    if FMA_Q:
                        off = -((lf + mn_s[:, None]) * rcp[:, None])                 # [G, WBC]
                        v = tl.fma(xv, rc5, off[:, None, :, None, None])
                    else:
                        a = (xv - lf[:, None, :, None, None]) - mn5
                        v = _quotient(a, st5, rc5, EXACT or not STOCHASTIC)
                    hh4 = hb * KH + i4
                    bidx = code_planes + hh4 * (W // PB) + wb[None, None, :, None] * (KW // PB) + jb4
                    if STOCHASTIC:
                        if INT64:
                            bctr = bidx.to(tl.uint32)
                        else:
                            bctr = bidx.to(tl.uint32, bitcast=True)
                        v = v + _lane_uniform(seed, bctr[:, :, :, :, None], jl, PB, RNG)
                    else:
                        v = v + 0.5
                    code = tl.minimum(tl.maximum(v, 0.0), LEVELS * 1.0).to(tl.int32)  # floor: v >= 0
                    byte = tl.sum(code << (jl * Q), axis=4)                         # [G, TKH, WBC, TKW//PB]
                    keep = (g[:, None, None, None] < G) & ((wc * WBC + wl) < WB)[None, None, :, None]
                    if not (FULL_H and FULL_W):
                        keep = keep & (i4 < KH) & (hh4 < H) & (jb4 * PB < KW) \
                            & (wb[None, None, :, None] * KW + jb4 * PB < W)
                    sidx = _code_offset(bidx, n, hh4 * (W // PB) + wb[None, None, :, None] * (KW // PB) + jb4,
                                        (c0 + g)[:, None, None, None], C, HW // PB, CODES_CL)
                    tl.store(codes_ptr + sidx, byte.to(tl.uint8), mask=keep)
        else:
            # Flat NCHW order per plane: tile [G, EB, PB] over columns; element e of plane g sits at
            # column e + s_g, s_g = (g * HW) % PB, so columns group into whole bytes of the output.
            g2 = g[:, None]
            g3 = g[:, None, None]
            eb2 = tl.arange(0, EB)[None, :]
            eb3 = tl.arange(0, EB)[None, :, None]
            j3 = tl.arange(0, PB)[None, None, :]
            if MISALIGNED:
                s2 = (g2 * HW) % PB
                s3 = s2[:, :, None]
                end2 = s2 + HW                         # one past the plane's last column
                row_bytes = (p0 * HW) // PB + (g2 * HW - s2) // PB
            else:
                end2 = HW
                row_bytes = (p0 * HW) // PB + g2 * (HW // PB)
            if CL:
                x_planes3 = x_base + g3
            else:
                x_planes3 = x_base + g3 * HW
            lfc_planes3 = lfc_base[:, :, None]
            mn3 = mn_s[:, None, None]
            st3 = safe[:, None, None]
            rc3 = rcp[:, None, None]
            head = tl.zeros([G], tl.int32)
            tail = tl.zeros([G], tl.int32)
            for k in range(NK):
                if MISALIGNED:
                    e = k * E + eb3 * PB + j3 - s3     # in-plane element of each column
                    ok = (e >= 0) & (e < HW)
                    e = tl.where(ok, e, 0)
                else:
                    e = k * E + eb3 * PB + j3
                    ok = (e < HW) & (g3 < G)
                xv = tl.load(x_planes3 + e * sE, mask=ok, other=0.0,
                             eviction_policy="evict_first").to(tl.float32)
                if NORM:
                    yv = (xv - n_mean[:, None, None]) * n_scale[:, None, None] + n_bias[:, None, None]
                    tl.store(y_base + g3 + e * sE, _cast_out(yv, y_ptr, EXACT), mask=ok)
                hh = e // W
                wc_ = e - hh * W
                lf = tl.load(lfc_planes3 + ((hh // KH) * WB + wc_ // KW) * sL, mask=ok, other=0.0).to(tl.float32)
                if FMA_Q:
                    v = tl.fma(xv, rc3, -((lf + mn3) * rc3))
                else:
                    v = _quotient((xv - lf) - mn3, st3, rc3, EXACT or not STOCHASTIC)
                bcol = k * EB + eb2
                if STOCHASTIC:
                    bidx = row_bytes + bcol
                    if INT64:
                        bctr = bidx.to(tl.uint32)
                    else:
                        bctr = bidx.to(tl.uint32, bitcast=True)
                    v = v + _lane_uniform(seed, bctr[:, :, None], j3, PB, RNG)
                else:
                    v = v + 0.5
                code = tl.minimum(tl.maximum(v, 0.0), LEVELS * 1.0).to(tl.int32)
                code = tl.where(ok, code, 0)
                byte = tl.sum(code << (j3 * Q), axis=2)    # [G, EB]
                wmask = (bcol + 1) * PB <= end2
                if MISALIGNED:
                    wmask = wmask & ((bcol > 0) | (s2 == 0))
                    head += tl.sum(tl.where(bcol == 0, byte, 0), axis=1)
                    tail += tl.sum(tl.where(bcol == end2 // PB, byte, 0), axis=1)
                # (CODES_CL implies whole-byte planes, so never MISALIGNED)
                sidx = _code_offset(row_bytes + bcol, n, bcol, c0 + g2, C, HW // PB, CODES_CL)
                tl.store(codes_ptr + sidx, byte.to(tl.uint8), mask=wmask)
            if MISALIGNED:
                # A byte shared by plane g - 1 (its tail) and plane g (its head): OR the two halves.
                prev = tl.sum(tl.where(g[:, None] == g[None, :] + 1, tail[None, :], 0), axis=1)
                sg = (g * HW) % PB
                first = codes_ptr + (p0 * HW) // PB + (g * HW - sg) // PB
                tl.store(first, (head | prev).to(tl.uint8), mask=sg != 0)


@triton.jit
def _decode_kernel(codes_ptr, lfc_ptr, mn_ptr, step_ptr, out_ptr, mask_ptr, C, CG,
                   H: tl.constexpr, W: tl.constexpr, HW: tl.constexpr,
                   KH: tl.constexpr, KW: tl.constexpr, HB: tl.constexpr, WB: tl.constexpr,
                   TKH: tl.constexpr, TKW: tl.constexpr, WBC: tl.constexpr, NWC: tl.constexpr,
                   FULL_H: tl.constexpr, FULL_W: tl.constexpr,
                   G: tl.constexpr, PB: tl.constexpr, Q: tl.constexpr, LEVELS: tl.constexpr,
                   ROW: tl.constexpr, CL: tl.constexpr, INT64: tl.constexpr, EXACT: tl.constexpr,
                   HBS: tl.constexpr, CODES_CL: tl.constexpr, MASK: tl.constexpr,
                   TINY: tl.constexpr):
    pid, s = _program(HB // HBS)
    hb0 = s * HBS                                  # this program's block rows: hb0 .. hb0 + HBS - 1
    if INT64:
        pid = pid.to(tl.int64)
    n = pid // CG
    c0 = (pid - n * CG) * G
    p0 = pid * G
    g = tl.arange(0, G)
    if CL:
        out_off = n * (HW * C) + c0                # element offsets in the output's storage
        sE = C
    else:
        out_off = p0 * HW
        sE = 1
    wl = tl.arange(0, WBC)
    lfc_base, sL = _lfc_base(lfc_ptr, n, c0, p0, g, C, HB * WB, CL)
    mn = tl.load(mn_ptr + p0 + g).to(tl.float32)
    step = tl.load(step_ptr + p0 + g).to(tl.float32)
    if ROW:
        # Tile [G, TKH, WBC, TKW // PB, PB]: one byte load per PB codes.
        g5 = g[:, None, None, None, None]
        i5 = tl.arange(0, TKH)[None, :, None, None, None]
        jb = tl.arange(0, TKW // PB)[None, None, None, :, None]
        jl = tl.arange(0, PB)[None, None, None, None, :]
        i4 = tl.arange(0, TKH)[None, :, None, None]
        jb4 = tl.arange(0, TKW // PB)[None, None, None, :]
        if CL:
            plane_off = out_off + g5                   # element offset of each plane's start
        else:
            plane_off = out_off + g5 * HW
        out_planes = out_ptr + plane_off
        mn5 = mn[:, None, None, None, None]
        st5 = step[:, None, None, None, None]
        code_planes = (p0 + g[:, None, None, None]) * (HW // PB)
        for hbi in range(HBS):
            hb = hb0 + hbi
            hh = hb * KH + i5
            hh4 = hb * KH + i4
            for wc in range(NWC):
                wb = tl.minimum(wc * WBC + wl, WB - 1)
                lf = tl.load(lfc_base + (hb * WB + wb[None, :]) * sL).to(tl.float32)
                bidx = code_planes + hh4 * (W // PB) + wb[None, None, :, None] * (KW // PB) + jb4
                live4 = (g[:, None, None, None] < G) & ((wc * WBC + wl) < WB)[None, None, :, None]
                if not (FULL_H and FULL_W):
                    live4 = live4 & (i4 < KH) & (hh4 < H) & (jb4 * PB < KW) \
                        & (wb[None, None, :, None] * KW + jb4 * PB < W)
                sidx = _code_offset(bidx, n, hh4 * (W // PB) + wb[None, None, :, None] * (KW // PB) + jb4,
                                    (c0 + g)[:, None, None, None], C, HW // PB, CODES_CL)
                byte = tl.load(codes_ptr + sidx, mask=live4, other=0).to(tl.int32)
                code = (byte[:, :, :, :, None] >> (jl * Q)) & LEVELS
                val = lf[:, None, :, None, None] + (mn5 + _code_float(code) * st5)
                ww = wb[None, None, :, None, None] * KW + jb * PB + jl
                live = live4[:, :, :, :, None] & (jl < PB)
                o = (hh * W + ww) * sE
                if MASK == 1:
                    val = _relu_masked(val, mask_ptr, plane_off + o, live, TINY)
                elif MASK == 2:
                    pix_live = ((wc * WBC + wl) < WB)[None, None, :, None, None]
                    if not (FULL_H and FULL_W):
                        pix_live = pix_live & (i5 < KH) & (hh < H) & (jb * PB < KW) & (ww < W)
                    word = _mask_words(mask_ptr, n * HW + hh * W + ww, pid - n * CG, CG, pix_live)
                    val = _relu_masked_words(val, word, g5, TINY)
                tl.store(out_planes + o, _cast_out(val, out_ptr, EXACT), mask=live)
    else:
        # Tile [G, TKH, WBC, TKW], one byte load per element (planes or rows not byte-aligned).
        gi = g[:, None, None, None]
        ii = tl.arange(0, TKH)[None, :, None, None]
        jj = tl.arange(0, TKW)[None, None, None, :]
        if CL:
            plane_off = out_off + gi
        else:
            plane_off = out_off + gi * HW
        out_planes = out_ptr + plane_off
        mn4 = mn[:, None, None, None]
        st4 = step[:, None, None, None]
        code_base = (p0 + gi) * HW
        for hbi in range(HBS):
            hb = hb0 + hbi
            hh = hb * KH + ii
            for wc in range(NWC):
                wb = tl.minimum(wc * WBC + wl, WB - 1)
                ww = wb[None, None, :, None] * KW + jj
                m = (ii < KH) & (hh < H) & (jj < KW) & (ww < W) \
                    & ((wc * WBC + wl) < WB)[None, None, :, None]
                e = hh * W + ww
                lf = tl.load(lfc_base + (hb * WB + wb[None, :]) * sL).to(tl.float32)
                ci = code_base + e
                # CODES_CL: planes are whole bytes, so the lane of element e is e % PB
                sidx = _code_offset(ci // PB, n, e // PB, c0 + gi, C, HW // PB, CODES_CL)
                byte = tl.load(codes_ptr + sidx, mask=m, other=0).to(tl.int32)
                code = (byte >> ((ci % PB) * Q).to(tl.int32)) & LEVELS
                val = lf[:, None, :, None] + (mn4 + _code_float(code) * st4)
                if MASK == 1:
                    val = _relu_masked(val, mask_ptr, plane_off + e * sE, m, TINY)
                elif MASK == 2:
                    val = _relu_masked_words(val, _mask_words(mask_ptr, n * HW + e, pid - n * CG, CG, m), gi, TINY)
                tl.store(out_planes + e * sE, _cast_out(val, out_ptr, EXACT), mask=m)


# ===================================================================================== planning
def _pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(frozen=True, eq=False)
class Plan:
    """Launch parameters of both kernels for one (shape, dtype, format, bits, block size).

    Compared and hashed by identity (``_plan`` makes one object per distinct input): a plan is
    part of every launch key, and hashing thirty fields per launch would cost more than the lookup.
    """

    n: int
    c: int
    h: int
    w: int
    kh: int
    kw: int
    hb: int
    wb: int
    tkh: int
    tkw: int
    wbc: int          # block columns per 4-D tile (decode, encode mode 0)
    nwc: int          # 4-D tiles per block row
    rwbc: int         # block columns per row tile (encode mode 1)
    rnwc: int         # row tiles per image row
    full_h: bool      # no partial block rows (no row masks)
    full_w: bool      # no partial block columns (no column masks)
    g: int            # planes (channels of one sample) per program
    e: int            # flat pass 2: columns per step
    nk: int           # flat pass 2: steps
    pb: int           # codes per byte
    bits: int
    row: bool         # byte-aligned rows: pass 2 walks rows (else flat NCHW order)
    misaligned: bool  # planes do not start on a byte boundary (flat pass 2)
    int64: bool
    channels_last: bool
    mode: int         # encode structure: 1 row loop, 0 4-D block-row tiles
    dec_row: bool     # decode one byte load per PB codes (5-D tile) instead of per element
    enc_warps: int
    dec_warps: int
    enc_hbs: int      # block rows per encode program; < hb: split planes, two kernels (phases 1, 2)
    dec_hbs: int      # block rows per decode program
    codes_cl: bool    # code bytes stored in (N, H * W / PB, C) order (channels_last input, whole-byte planes)
    fma_q: bool       # stochastic rounding: v = fma(x, 1/step, -(lfc + mn)/step), one instruction

    # Derived once per plan (every launch reads them); cached_property writes the instance dict,
    # which a frozen dataclass allows.
    @functools.cached_property
    def enc_split(self) -> int:
        return self.hb // self.enc_hbs

    @functools.cached_property
    def encode_grid(self) -> tuple[int]:
        return (self.n * self.c // self.g * self.enc_split,)

    @functools.cached_property
    def decode_grid(self) -> tuple[int]:
        return (self.n * self.c // self.g * (self.hb // self.dec_hbs),)

    @functools.cached_property
    def encode_phases(self) -> tuple[int, ...]:
        """(0,): one fused kernel; (1, 2): split planes, HFC range by chunk, then quantization."""
        return (0,) if self.enc_split == 1 else (1, 2)

    def _common(self) -> dict[str, Any]:
        return dict(H=self.h, W=self.w, HW=self.h * self.w, KH=self.kh, KW=self.kw, HB=self.hb,
                    WB=self.wb, TKH=self.tkh, TKW=self.tkw, FULL_H=self.full_h,
                    FULL_W=self.full_w, G=self.g, PB=self.pb, Q=self.bits,
                    LEVELS=2 ** self.bits - 1, CL=self.channels_last, INT64=self.int64,
                    EXACT=_INTERPRET, CODES_CL=self.codes_cl)

    def encode_constexprs(self, phase: int = 0) -> dict[str, Any]:
        wbc, nwc = (self.rwbc, self.rnwc) if self.mode == 1 else (self.wbc, self.nwc)
        rcp = float(np.float32(1.0) / np.float32(2 ** self.bits - 1))  # torch CUDA: 1.0f / levels
        return dict(self._common(), WBC=wbc, NWC=nwc, E=self.e, EB=self.e // self.pb, NK=self.nk,
                    ROW=self.row, MISALIGNED=self.misaligned, MODE=self.mode, RCP_LEVELS=rcp,
                    PHASE=phase, SPLIT=self.enc_split, SPLIT_P2=_pow2(self.enc_split),
                    HBS=self.enc_hbs)

    def decode_constexprs(self) -> dict[str, Any]:
        return dict(self._common(), WBC=self.wbc, NWC=self.nwc, ROW=self.dec_row, HBS=self.dec_hbs)


# Tunables. Defaults are the configurations measured best on an H200 (docs/kernels.md, runs 2 and 4):
# NCHW: row-loop encode (mode 1), group_bytes 16 KiB; NHWC: 4-D tile encode (mode 0) on one warp
# with 1024-element tiles, and the 5-D decode. ``None`` / 0 means "choose by layout and tile size".
# ``division.bench`` and ``scripts/tune_codec.py`` override entries to compare variants.
TUNING: dict[str, Any] = {
    "max_tile": None,          # elements of one 4-D tile (decode, encode mode 0); None: 2048 NCHW, 1024 NHWC
    "group_bytes": 16384,      # input bytes per program (G planes): pass 2 re-reads them from L2
    "min_programs_per_sm": 4,  # keep the grid at least this many programs per SM
    "cl_min_bytes": 64,        # channels_last: G * itemsize, contiguous bytes per pixel read
    "enc_warps": 0,            # 0: by layout and tile size
    "dec_warps": 0,
    "rng": RNG_HASH,
    "g": 0,                    # force a group size (0: choose)
    "force_int64": False,      # 64-bit index arithmetic even for small tensors (tests that path)
    "force_flat": False,       # pass 2 in flat NCHW order even where rows are byte-aligned
    "encode_mode": None,       # 1: row loop (elementwise accumulation), 0: 4-D block-row tiles; None: 1 NCHW, 0 NHWC
    "max_row_tile": 512,       # elements of one row tile (encode mode 1)
    "decode_row": None,        # decode: one byte load per PB codes (5-D tile); None: NHWC only (run 4)
    "fma_quantize": True,      # stochastic: (x - lfc - mn) / step as one fma per element; off by
                               # about 2^-24 * |x| / step of a step (5 instructions otherwise)
    "codes_nhwc": True,        # channels_last input, whole-byte planes: codes in (N, H*W/PB, C) order
    "split_warps_per_sm": 32,  # split planes into chunks of block rows until the grid has this
                               # many warps per SM (0: never split)
    "narrow_pixel_bytes": 16,  # channels_last maps with narrower pixels (C * itemsize bytes) are
                               # coded from a contiguous copy (0: never)
    "relu_mask_in_encode": True,  # an encode of a ReLU output packs its mask too (packs_relu_mask)
}


def _rows_per_program(hb: int, programs: int, warps: int, sms: int, want_warps_per_sm: int) -> int:
    """Block rows per program: all of them (no split) unless the grid is too small to keep the
    GPU's memory system busy; then the most rows (a divisor of hb, so chunks are equal) that give
    at least ``want_warps_per_sm`` warps per SM, or 1."""
    if want_warps_per_sm <= 0:
        return hb
    want = want_warps_per_sm * sms
    for rows in sorted((d for d in range(1, hb + 1) if hb % d == 0), reverse=True):
        if programs * (hb // rows) * warps >= want:
            return rows
    return 1


@functools.lru_cache(maxsize=512)
def _plan(n: int, c: int, h: int, w: int, kh: int, kw: int, bits: int, itemsize: int,
          channels_last: bool, sms: int, tuning_key: tuple) -> Optional[Plan]:
    tun = dict(tuning_key)
    hw = h * w
    pb = 8 // bits
    if hw <= 1 or hw < pb:
        return None
    hb, wb = -(-h // kh), -(-w // kw)
    if not ((_is_pow2(kh) or hb == 1) and (_is_pow2(kw) or wb == 1)):
        return None
    tkh, tkw = _pow2(kh), _pow2(kw)
    full_h = h % kh == 0 and tkh == kh
    full_w = w % kw == 0 and tkw == kw
    row = w % pb == 0 and kw % pb == 0 and not tun["force_flat"]
    max_tile = tun["max_tile"] or (1024 if channels_last else 2048)
    block_tile = tkh * tkw
    aligned = [gs for gs in (128, 64, 32, 16, 8, 4, 2, 1) if c % gs == 0 and (gs * hw) % pb == 0]
    if not aligned:
        return None
    cands = [gs for gs in aligned if gs * block_tile <= max_tile] or aligned[-1:]
    if tun["g"]:
        cands = [gs for gs in aligned if gs == tun["g"]] or cands
    planes = n * c
    min_prog = tun["min_programs_per_sm"] * sms
    fits = [gs for gs in cands if gs * hw * itemsize <= tun["group_bytes"]] or [cands[-1]]
    gsel = next((gs for gs in fits if planes // gs >= min_prog), fits[-1])
    # NHWC-ordered codes need whole-byte planes (byte e // PB of a plane holds its elements
    # e .. e + PB - 1 in NCHW order, so 14x14 maps at Q = 2 qualify, 7x7 do not).
    codes_cl = bool(tun["codes_nhwc"]) and channels_last and hw % pb == 0
    if channels_last and gsel * itemsize < tun["cl_min_bytes"]:
        # NHWC reads move G * itemsize contiguous bytes per pixel (and NHWC-ordered codes G bytes
        # per store): prefer whole 32-byte sectors, with NHWC codes even past the tile size.
        wider = [gs for gs in (aligned if codes_cl else cands) if gs > gsel and planes // gs >= sms]
        good = [gs for gs in wider if gs * itemsize >= tun["cl_min_bytes"]]
        if good or wider:
            gsel = min(good) if good else max(wider)
    twb = _pow2(wb)
    wbc = max(1, min(twb, max_tile // (gsel * block_tile)))
    wbc = 1 << (wbc.bit_length() - 1)
    nwc = -(-wb // wbc)
    rwbc = max(1, min(twb, tun["max_row_tile"] // (gsel * tkw)))
    rwbc = 1 << (rwbc.bit_length() - 1)
    rnwc = -(-wb // rwbc)
    misaligned = hw % pb != 0
    span = hw + (pb - 1 if misaligned else 0)
    # Flat pass 2 (rows not byte-aligned): columns per step E, a power of two minimising a cost
    # model of the loop, nk * (max(tile, 1024) + 256): padding costs work, tiny steps overhead.
    options = []
    e = pb
    while True:
        nk = -(-span // e)
        options.append((nk * (max(gsel * e, 1024) + 256), -e, nk))
        if e >= span or e * 2 > max(max_tile // gsel, pb):
            break
        e *= 2
    _, e, nk = min(options)
    e = -e
    int64 = planes * hw >= INT32_LIMIT or bool(tun["force_int64"])
    mode = int(tun["encode_mode"]) if tun["encode_mode"] is not None else (0 if channels_last else 1)
    tile = gsel * tkh * wbc * tkw
    warps = 8 if tile >= 4096 else 4 if tile >= 1024 else 2
    if mode == 1:
        row_tile = gsel * rwbc * tkw
        enc_warps = 4 if row_tile >= 1024 else 2 if row_tile >= 256 else 1
        if not row:
            enc_warps = max(enc_warps, 8 if gsel * e >= 4096 else 4 if gsel * e >= 1024 else 2)
    elif channels_last:
        enc_warps = 1  # NHWC: pass 1 / pass 2 transpose through shared memory; one warp syncs cheaply
    else:
        flat_warps = 8 if gsel * e >= 4096 else 4 if gsel * e >= 1024 else 2
        enc_warps = warps if row else max(warps, flat_warps)
    enc_warps = tun["enc_warps"] or enc_warps
    dec_warps = tun["dec_warps"] or warps
    dec_row = channels_last if tun["decode_row"] is None else bool(tun["decode_row"])
    # A program owns whole planes because the quantization range is per plane. Large NHWC planes
    # then leave a grid of a few warps per SM; splitting a plane into chunks of block rows costs a
    # second launch (the range of every chunk first, then the quantization) and buys parallelism.
    # Only byte-aligned rows split: the flat pass 2 walks a whole plane. Decode splits freely.
    groups = planes // gsel
    enc_hbs = _rows_per_program(hb, groups, enc_warps, sms, tun["split_warps_per_sm"]) if row else hb
    dec_hbs = _rows_per_program(hb, groups, dec_warps, sms, tun["split_warps_per_sm"])
    return Plan(n, c, h, w, kh, kw, hb, wb, tkh, tkw, wbc, nwc, rwbc, rnwc, full_h, full_w, gsel, e,
                nk, pb, bits, row, misaligned, int64, channels_last, mode, dec_row and row,
                enc_warps, dec_warps, enc_hbs, dec_hbs, codes_cl, bool(tun["fma_quantize"]))


def _lfc_format(plan: Plan) -> torch.memory_format:
    """The LFC's memory format in the kernels: the input's (see ``_lfc_base``)."""
    return torch.channels_last if plan.channels_last else torch.contiguous_format


@dataclass
class FusedNorm:
    """A training BatchNorm's forward run by an encode's two launches (``_encode_kernel``'s NORM):
    phase 1 writes each chunk's per-channel (count, mean, M2) to ``stats`` ((N * chunks, 3, C)
    fp32); ``reduce()``, launched between the phases, turns them into ``mean`` and ``coef``
    ((2, C) fp32: scale = weight * invstd, bias); phase 2 writes ``y`` (x's shape and layout)."""

    y: torch.Tensor
    stats: torch.Tensor
    mean: torch.Tensor
    coef: torch.Tensor
    reduce: Callable[[], None]


_MASK_WORDS = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


def _mask_argument(bits: Optional[torch.Tensor], plan: Plan) -> tuple[int, Optional[torch.Tensor]]:
    """(the decode's MASK mode, the mask as the kernel reads it): 0 without a mask; 2 for NHWC
    programs of 8 to 64 channels, which read the G bits of a pixel as one word; else 1, a byte
    per element."""
    if bits is None:
        return 0, None
    if plan.channels_last and plan.g in _MASK_WORDS:
        return 2, bits.view(_MASK_WORDS[plan.g])
    return 1, bits


_ENCODE = CachedLaunch(_encode_kernel)
_DECODE = CachedLaunch(_decode_kernel)


_GRAPH_SEEDS: dict[int, torch.Tensor] = {}


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def prepare_graph_capture(device: torch.device) -> None:
    """Make the device counter that encodes captured in a CUDA graph mix into their seed.

    Must run before the capture: a counter created inside it would be zero-filled again by every
    replay instead of once.
    """
    index = _device_index(torch.device(device))
    if index not in _GRAPH_SEEDS:
        _GRAPH_SEEDS[index] = torch.zeros((), dtype=torch.int32, device=torch.device("cuda", index))


def graph_seed_counter(device: torch.device) -> torch.Tensor:
    """The counter of ``device`` (``prepare_graph_capture`` made it); advanced by each captured encode."""
    try:
        return _GRAPH_SEEDS[_device_index(device)]
    except KeyError:
        raise RuntimeError("a DIVISION encode is being captured in a CUDA graph without a seed counter: "
                           "call division.prepare_cuda_graph(device) before the capture") from None


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ====================================================================================== codec
class TritonDivisionCodec(DivisionCodec):
    """``DivisionCodec`` whose encode / decode run fused Triton kernels on CUDA 4-D inputs.

    Same constructor and stored format as the reference; see the module docstring for what runs
    where and what falls back. ``rng`` picks the in-kernel random numbers (RNG_HASH or RNG_PHILOX);
    None takes ``TUNING["rng"]``.
    """

    def __init__(self, block_size: int = 8, bits: int = 2, rounding: str = "stochastic",
                 keep_lfc: bool = True, keep_hfc: bool = True, simulate: bool = False,
                 generator: Optional[torch.Generator] = None, rng: Optional[int] = None,
                 relu_zeros: bool = True):
        super().__init__(block_size=block_size, bits=bits, rounding=rounding, keep_lfc=keep_lfc,
                         keep_hfc=keep_hfc, simulate=simulate, generator=generator,
                         relu_zeros=relu_zeros)
        if rng not in (None, RNG_HASH, RNG_PHILOX):
            raise ValueError(f"rng must be None, RNG_HASH or RNG_PHILOX, got {rng!r}")
        self.rng = rng
        self._seed_key: Optional[int] = None
        self._seed_gen: Optional[random.Random] = None
        self._plans: dict[tuple, Optional[Plan]] = {}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backend": "triton"}

    def __repr__(self) -> str:
        return "Triton" + super().__repr__()

    # ------------------------------------------------------------------------------- planning
    def plan_for(self, shape, dtype: torch.dtype, channels_last: bool, device) -> Optional[Plan]:
        """The launch plan for a 4-D input of this shape, or None if it takes the reference path.

        Remembered per (shape, dtype, format, device, tunables): a training step asks for the same
        few dozen plans hundreds of times.

        A channels_last map whose pixels are narrower than ``TUNING["narrow_pixel_bytes"]`` (C
        times the item size) gets the NCHW plan (``plan.channels_last`` is False): it is coded
        from a contiguous copy and decoded back to channels_last. The 3-channel images a first
        convolution saves are such maps: their NHWC programs read 2 bytes 6 bytes apart, which
        cost more than the two copies (an H200, (128, 3, 224, 224) bf16: 93 + 243 us NHWC against
        93 + 42 us NCHW, docs/kernels.md run 8).
        """
        key = (tuple(shape), dtype, channels_last, str(device), tuple(TUNING.values()))
        try:
            return self._plans[key]
        except KeyError:
            plan = self._make_plan(shape, dtype, channels_last, device)
            if plan is not None and plan.channels_last \
                    and shape[1] * dtype.itemsize < TUNING["narrow_pixel_bytes"]:
                plan = self._make_plan(shape, dtype, False, device) or plan
            self._plans[key] = plan
            return plan

    def _make_plan(self, shape, dtype: torch.dtype, channels_last: bool, device) -> Optional[Plan]:
        if len(shape) != 4 or dtype not in _FAST_DTYPES:
            return None
        geom = self.geometry(shape, dtype)
        if geom.layout != LAYOUT_MAPS:
            return None
        dev = torch.device(device)
        sms = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device()) \
            if dev.type == "cuda" else 1
        return _plan(geom.n, geom.c, geom.h, geom.w, geom.kh, geom.kw, self.bits, dtype.itemsize,
                     bool(channels_last), sms, tuple(sorted(TUNING.items())))

    def _fast(self) -> bool:
        return self.keep_lfc and self.keep_hfc and not self.simulate

    def draw_seed(self) -> int:
        """A 31-bit seed for one encode, drawn on the host (no device synchronisation).

        From the codec's generator when it lives on the CPU; otherwise from a private host stream
        seeded with the generator's ``initial_seed()`` (or ``torch.initial_seed()``): Python's
        Mersenne Twister, where ``torch.randint(...).item()`` took about 10 us per encode under
        cProfile in a ResNet-50 step (``scripts/profile_step.py``).
        """
        gen = self.generator
        if gen is not None and gen.device.type == "cpu":
            return int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen).item())
        key = gen.initial_seed() if gen is not None else torch.initial_seed()
        if self._seed_gen is None or self._seed_key != key:
            self._seed_gen = random.Random(key)
            self._seed_key = key
        return self._seed_gen.getrandbits(31)

    # ------------------------------------------------------------------------- encode / decode
    def _plan_of(self, x: torch.Tensor) -> tuple[Optional[Plan], Optional[torch.Tensor], bool]:
        """(plan, x as maps, channels_last); plan None: the reference path."""
        plan = maps = None
        cl = False
        if self._fast() and isinstance(x, torch.Tensor) and runs_here(x):
            maps, cl = self._as_maps(x)
            if maps is not None:
                plan = self.plan_for(maps.shape, x.dtype, cl, x.device)
        return plan, maps, cl

    def packs_relu_mask(self, x: torch.Tensor) -> bool:
        """Can ``encode(x, relu_mask=...)`` write x's ReLU mask (``x > 0``, one bit per element in
        storage order, the exact ReLU mask's bits) while it reads x? For channels_last maps coded
        by NHWC programs of 8 to 64 channels, which store one G-bit word per pixel; the mask's own
        pack would read all of x once more."""
        if not TUNING["relu_mask_in_encode"]:
            return False
        plan, _, _ = self._plan_of(x)
        return plan is not None and plan.channels_last and plan.mode == 0 and plan.g in _MASK_WORDS

    def norm_plan(self, x: torch.Tensor) -> Optional[Plan]:
        """x's plan if a BatchNorm's backward can read x's codes in place of x
        (``division.triton_norm``: channels_last maps with NHWC-ordered codes), else None."""
        if x.dim() != 4 or dense_layout(x) is not True:
            return None
        plan, _, _ = self._plan_of(x)
        from . import triton_norm
        return plan if triton_norm.applies(plan) else None

    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None,
               relu_mask: Optional[torch.Tensor] = None) -> Packed:
        """``relu_mask``: a uint8 tensor of ``packed_nbytes(x.numel(), 1)`` bytes that the encode
        fills with x's ReLU mask; only where ``packs_relu_mask(x)``."""
        plan, maps, cl = self._plan_of(x)
        if relu_mask is not None and not self.packs_relu_mask(x):
            raise ValueError("this encode cannot pack a ReLU mask (see packs_relu_mask)")
        if plan is None:
            return super().encode(x, ctx)
        if cl and not plan.channels_last:
            maps = maps.contiguous()  # a narrow channels_last map: coded as its NCHW copy
        return self.packed(x, plan, self._encode_kernel(maps, plan, relu_mask=relu_mask))

    def packed(self, x: torch.Tensor, plan: Plan, tensors: dict[str, torch.Tensor]) -> Packed:
        """The Packed of x whose tensors ``_encode_kernel`` wrote under ``plan``."""
        geom: Geometry = self.geometry(x.shape, x.dtype)
        meta = {"layout": geom.layout, "shape": x.shape, "dtype": x.dtype,
                "memory_format": _memory_format(x), "geometry": geom, "bits": self.bits,
                "has_lfc": True, "has_hfc": True, "simulated": False}
        if plan.codes_cl:
            meta["codes_order"] = CODES_NHWC
        return Packed(self, tensors, meta)

    def _as_maps(self, x: torch.Tensor) -> tuple[Optional[torch.Tensor], bool]:
        """(x as the (N, C, H, W) maps its geometry encodes, channels_last), where that is a view
        the kernels read: 4-D contiguous or channels_last, and contiguous (N, F) features and
        volumes, whose canonical maps are reshapes (same codes, same LFC). Else (None, False)."""
        if x.dim() == 4:
            cl = dense_layout(x)
            return (x, cl) if cl is not None else (None, False)
        geom: Geometry = self.geometry(x.shape, x.dtype)
        if geom.layout in (LAYOUT_FEATURES, LAYOUT_VOLUME) and x.is_contiguous():
            return x.view(geom.n, geom.c, geom.h, geom.w), False
        return None, False

    def _encode_kernel(self, x: torch.Tensor, plan: Plan, seed: Optional[int] = None,
                       counter: Optional[torch.Tensor] = None,
                       relu_mask: Optional[torch.Tensor] = None,
                       norm: Optional[FusedNorm] = None) -> dict[str, torch.Tensor]:
        """Launch the encode. ``counter``: an int32 device scalar hashed into the seed by the kernel
        (``(counter * 0x85EBCA6B + seed) mod 2^31``); taken, and advanced first, when capturing.
        ``relu_mask``: bits to fill with x's ReLU mask (``packs_relu_mask`` plans only).
        ``norm``: a BatchNorm forward run by the same two launches (``FusedNorm``)."""
        n, c, h, w = plan.n, plan.c, plan.h, plan.w
        dev = x.device
        lfc = torch.empty((n, c, plan.hb, plan.wb), dtype=torch.bfloat16, device=dev,
                          memory_format=_lfc_format(plan))
        codes = torch.empty(packed_nbytes(n * c * h * w, plan.bits), dtype=torch.uint8, device=dev)
        mn = torch.empty((n, c), dtype=torch.bfloat16, device=dev)
        step = torch.empty((n, c), dtype=torch.bfloat16, device=dev)
        stochastic = self.rounding == "stochastic"
        if seed is None:
            seed = self.draw_seed() if stochastic else 0
        rng = TUNING["rng"] if self.rng is None else self.rng
        if counter is None and stochastic and not _INTERPRET and torch.cuda.is_current_stream_capturing():
            counter = graph_seed_counter(dev)
            counter.add_(1)  # captured: each replay advances it before this encode
        from_counter = counter is not None and stochastic
        if counter is None:
            counter = step  # any pointer: the kernel reads it only with SEED_PTR
        phases = plan.encode_phases if norm is None else (1, 2)  # the statistics come between
        # split planes: each chunk's HFC (min, max), written by phase 1 and reduced by phase 2
        part = torch.empty((n * c * plan.enc_split * 2,), dtype=torch.float32, device=dev) \
            if len(phases) > 1 else step
        # C and CG are fixed by the plan, so the plan, x's dtype and alignment and the flags are
        # all the specialisation there is (outputs and the counter are fresh allocations: aligned).
        words = step if relu_mask is None else relu_mask.view(_MASK_WORDS[plan.g])  # step: any pointer
        norm_args = (step,) * 4 if norm is None else (norm.y, norm.stats, norm.mean, norm.coef)
        for phase in phases:
            pack_mask = relu_mask is not None and phase != 2  # pass 1 (phases 0 and 1) reads all of x
            _ENCODE.launch((plan, phase, x.dtype, aligned(x), stochastic, rng, from_counter, pack_mask,
                            norm is not None, dev.index),
                           plan.encode_grid,
                           (x, lfc, codes, mn, step, part, counter, words, *norm_args, seed, c, c // plan.g),
                           lambda: dict(STOCHASTIC=stochastic, RNG=rng, SEED_PTR=from_counter,
                                        FMA_Q=stochastic and plan.fma_q, PACK_MASK=pack_mask,
                                        NORM=norm is not None, **plan.encode_constexprs(phase)),
                           plan.enc_warps)
            if norm is not None and phase == 1:
                norm.reduce()
        return {"lfc": lfc, "codes": codes, "mn": mn, "step": step}

    def _decode(self, packed: Packed, mask: Optional[Packed]) -> torch.Tensor:
        t, m = packed.tensors, packed.meta
        plan = None
        if (m.get("layout") in (LAYOUT_MAPS, LAYOUT_FEATURES, LAYOUT_VOLUME) and not m.get("simulated")
                and m.get("has_lfc") and m.get("has_hfc") and set(t) >= {"lfc", "codes", "mn", "step"}
                and all(runs_here(v) and (k == "lfc" or v.is_contiguous()) for k, v in t.items())
                and t["lfc"].dtype == torch.bfloat16 and t["codes"].dtype == torch.uint8
                and m["memory_format"] in (None, "channels_last")):
            geom: Geometry = m["geometry"]
            plan = self.plan_for((geom.n, geom.c, geom.h, geom.w), m["dtype"],
                                 m["memory_format"] == "channels_last", t["codes"].device)
            if plan is not None and (plan.bits, plan.kh, plan.kw) != (m["bits"], geom.kh, geom.kw):
                # A Packed from a codec with other bits or another block size: the plan's grid
                # would read its LFC out of bounds. The reference reads any geometry.
                plan = None
            if plan is not None and plan.codes_cl != (m.get("codes_order", CODES_NCHW) == CODES_NHWC):
                plan = None  # codes in the other byte order (another codec's or tuning's): reference
        if plan is None:
            return super()._decode(packed, mask)
        fmt = _lfc_format(plan)
        if not t["lfc"].is_contiguous(memory_format=fmt):
            t = dict(t, lfc=t["lfc"].contiguous(memory_format=fmt))  # e.g. the reference's Packed
        # The mask's bits follow the decoded output's storage order: the kernel reads the bit of
        # each element it writes. (A mask of another shape or format: applied afterwards.)
        bits = None if mask is None else relu_mask_bits(mask, m["shape"], plan.channels_last)
        out = self._decode_kernel(t, m["dtype"], plan, bits).view(m["shape"])
        if m["memory_format"] == "channels_last" and not plan.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)  # a narrow map's NCHW decode
        return out if mask is None or bits is not None else apply_relu_mask(out, mask)

    def _decode_kernel(self, t: dict[str, torch.Tensor], dtype: torch.dtype, plan: Plan,
                       mask_bits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The decode; with ``mask_bits`` (a ReLU mask in the output's storage order) the output
        takes its zeros from the mask (``exact.apply_relu_mask``)."""
        n, c, h, w = plan.n, plan.c, plan.h, plan.w
        fmt = torch.channels_last if plan.channels_last else torch.contiguous_format
        out = torch.empty((n, c, h, w), dtype=dtype, device=t["codes"].device, memory_format=fmt)
        mask_mode, mask_arg = _mask_argument(mask_bits, plan)
        args = (t["codes"], t["lfc"], t["mn"], t["step"], out, out if mask_arg is None else mask_arg,
                c, c // plan.g)
        key = (plan, dtype, mask_mode, *(aligned(a) for a in args[:4]), out.device.index)
        _DECODE.launch(key, plan.decode_grid, args,
                       lambda: dict(plan.decode_constexprs(), MASK=mask_mode,
                                    TINY=float(torch.finfo(dtype).tiny)),
                       plan.dec_warps)
        return out


__all__ = ["TritonDivisionCodec", "Plan", "TUNING", "RNG_HASH", "RNG_PHILOX", "interpreting",
           "prepare_graph_capture", "graph_seed_counter"]
