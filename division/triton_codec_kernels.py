"""The fused encode and decode kernels of ``TritonDivisionCodec`` (division/triton_codec.py).

Two kernels; a program owns ``G`` consecutive channels (planes) of one sample, reads x
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
NORM    (``FusedNorm``, division/triton_norm.py; split phases of NHWC mode 0): phase 1 also writes
        each chunk's per-channel count, mean and squared deviations, phase 2 a BatchNorm's output
        ``(x - mean) * scale + bias`` from the statistics a kernel merged in between (NORM == 2: and
        a ReLU after it, whose mask phase 2 stores as one G-bit word per pixel).
decode  4-D tiles [G, kh, blocks, kw] per block row: one LFC load per block, one byte load per
        element (cached), unpack -> ``lfc + (mn + code * step)`` (then, with ``AFFINE``, a
        per-channel ``* scale + shift``: a rebuilt BatchNorm output) -> cast -> store in the output's
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
``RNG_PHILOX`` uses Triton's ``tl.rand`` (1.6x slower encode on an H200).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_launch import CachedLaunch


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
def _lane_uniform(seed, bctr, jl, v, LANES: tl.constexpr, PB: tl.constexpr, RNG: tl.constexpr):
    """U[0, 1) for code lane ``jl`` (0..PB-1) of byte ``bctr`` (uint32 global byte index);
    ``v``: the byte's PB quantization ratios along axis ``LANES``, the last (read by RNG 2 only).

    RNG 0: one 32-bit hash per byte (golden-ratio spread + seed, then Wellons' lowbias32), spread
    to the byte's lanes by distinct odd multipliers (each lane is exactly uniform: a bijection of
    the hash); the top 23 bits become the mantissa of a float in [1, 2). No int->float conversion.
    RNG 1: Triton's Philox ``tl.rand`` on the element index (slower, reference quality).
    RNG 2: RNG 0 with the XOR of the byte's ratio bits mixed into the seed: the draw is a pure
    function of the encode's input, so a compiled graph may merge two encodes of one tensor, and
    it changes whenever the values do (each step's activations), without a host seed.
    """
    if RNG != 1:
        h = bctr * 0x9E3779B1 + tl.cast(seed, tl.uint32)  # (a plain int where a compiler made it constant)
        if RNG == 2:
            h ^= tl.xor_sum(v.to(tl.uint32, bitcast=True), axis=LANES)
        h ^= h >> 16
        h *= 0x21F0AAAD
        h ^= h >> 15
        h *= 0x735A2D97
        h ^= h >> 15
        h = tl.expand_dims(h, -1)
        if PB > 1:
            h = h * (jl.to(tl.uint32) * 0xB0A3E85A + 1)
        return ((h >> 9) | 0x3F800000).to(tl.float32, bitcast=True) - 1.0
    else:
        return tl.rand(seed, (tl.expand_dims(bctr, -1) * PB + jl.to(tl.uint32)).to(tl.int32, bitcast=True))


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


@triton.jit
def _store_mask_words_flat(maskw_ptr, yv, e, live, pix0, group, CG, G: tl.constexpr):
    """``_store_mask_words`` for the flat NHWC tile [G, EB, PB] of pass 2 (element ``e`` [1, EB, PB]
    of each of the G channels' planes): one G-bit word per pixel."""
    if G > 32:
        bits = (yv > 0).to(tl.int64) << tl.arange(0, G).to(tl.int64)[:, None, None]
    else:
        bits = (yv > 0).to(tl.int32) << tl.arange(0, G)[:, None, None]
    word = tl.sum(bits, axis=0)                                   # disjoint bits: the sum is the OR
    tl.store(maskw_ptr + (pix0 + e) * CG + group, word[None, :, :].to(maskw_ptr.dtype.element_ty), mask=live)


@triton.jit(do_not_specialize=["seed"])
def _encode_kernel(x_ptr, lfc_ptr, codes_ptr, mn_ptr, step_ptr, part_ptr, seed_ptr, maskw_ptr,
                   y_ptr, nstat_ptr, nmean_ptr, ncoef_ptr, seed, C, CG, XN,
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
    (``nmean_ptr``, ``ncoef_ptr`` = [scale, bias] per channel) to ``y_ptr``, x's layout. NORM == 2:
    a ReLU follows, ``y = max(that, 0)``, and its mask (``y > 0``) goes to ``maskw_ptr`` as one
    G-bit word per pixel, as PACK_MASK stores x's."""
    tl.static_assert(not NORM or (MODE == 0 and CL and not MISALIGNED and PHASE != 0))
    tl.static_assert(NORM != 2 or G == 8 or G == 16 or G == 32 or G == 64)
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
    # XN: elements from one sample to the next (C * HW when dense; more for a map sliced out of a
    # longer one, as a ViT's token grid out of its tokens with the class token)
    if CL:   # NHWC memory: G neighbouring channels are contiguous, an element step is C
        x_off = n * XN + c0
        sE = C
    else:    # NCHW memory: each plane is contiguous
        x_off = n * XN + c0 * HW
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
                            v = v + _lane_uniform(seed, bctr, jl, v, 3, PB, RNG)
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
                        if NORM == 2:
                            yv = tl.maximum(yv, 0.0)
                        yc = _cast_out(yv, y_ptr, EXACT)
                        if FULL_H and FULL_W:
                            tl.store(y_base + g5 + el, yc)
                        else:
                            tl.store(y_base + g5 + el, yc, mask=m)
                        if NORM == 2:  # the ReLU's mask: of the stored output (> 0 after rounding)
                            _store_mask_words(maskw_ptr, tl.reshape(yc.to(tl.float32), [G, TKH, WBC, TKW]),
                                              n * HW, hb, wb, pid - n * CG, CG, H, W, KH, KW, TKH, TKW, G,
                                              FULL_H and FULL_W)
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
                        v = v + _lane_uniform(seed, bctr, jl, v, 4, PB, RNG)
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
                    if NORM == 2:
                        yv = tl.maximum(yv, 0.0)
                    yc = _cast_out(yv, y_ptr, EXACT)
                    tl.store(y_base + g3 + e * sE, yc, mask=ok)
                    if NORM == 2:
                        _store_mask_words_flat(maskw_ptr, yc.to(tl.float32), e, e < HW, n * HW, pid - n * CG, CG, G)
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
                    v = v + _lane_uniform(seed, bctr, j3, v, 2, PB, RNG)
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
def _decode_kernel(codes_ptr, lfc_ptr, mn_ptr, step_ptr, out_ptr, mask_ptr, scale_ptr, shift_ptr, C, CG, XN,
                   H: tl.constexpr, W: tl.constexpr, HW: tl.constexpr,
                   KH: tl.constexpr, KW: tl.constexpr, HB: tl.constexpr, WB: tl.constexpr,
                   TKH: tl.constexpr, TKW: tl.constexpr, WBC: tl.constexpr, NWC: tl.constexpr,
                   FULL_H: tl.constexpr, FULL_W: tl.constexpr,
                   G: tl.constexpr, PB: tl.constexpr, Q: tl.constexpr, LEVELS: tl.constexpr,
                   ROW: tl.constexpr, CL: tl.constexpr, INT64: tl.constexpr, EXACT: tl.constexpr,
                   HBS: tl.constexpr, CODES_CL: tl.constexpr, MASK: tl.constexpr,
                   TINY: tl.constexpr, AFFINE: tl.constexpr):
    """AFFINE: the decoded value goes through a per-channel affine map, ``val * scale[c] + shift[c]``
    (fp32 ``scale_ptr``, ``shift_ptr``), before the mask: a BatchNorm's output rebuilt from its
    input's codes (division/rebuild.py) in one pass."""
    pid, s = _program(HB // HBS)
    hb0 = s * HBS                                  # this program's block rows: hb0 .. hb0 + HBS - 1
    if INT64:
        pid = pid.to(tl.int64)
    n = pid // CG
    c0 = (pid - n * CG) * G
    p0 = pid * G
    g = tl.arange(0, G)
    if CL:  # element offsets in the output's storage (XN: as in _encode_kernel; C * HW with MASK)
        out_off = n * XN + c0
        sE = C
    else:
        out_off = n * XN + c0 * HW
        sE = 1
    wl = tl.arange(0, WBC)
    lfc_base, sL = _lfc_base(lfc_ptr, n, c0, p0, g, C, HB * WB, CL)
    mn = tl.load(mn_ptr + p0 + g).to(tl.float32)
    step = tl.load(step_ptr + p0 + g).to(tl.float32)
    if AFFINE:
        a_scale = tl.load(scale_ptr + c0 + g)
        a_shift = tl.load(shift_ptr + c0 + g)
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
                if AFFINE:
                    val = val * a_scale[:, None, None, None, None] + a_shift[:, None, None, None, None]
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
                if AFFINE:
                    val = val * a_scale[:, None, None, None] + a_shift[:, None, None, None]
                if MASK == 1:
                    val = _relu_masked(val, mask_ptr, plane_off + e * sE, m, TINY)
                elif MASK == 2:
                    val = _relu_masked_words(val, _mask_words(mask_ptr, n * HW + e, pid - n * CG, CG, m), gi, TINY)
                tl.store(out_planes + e * sE, _cast_out(val, out_ptr, EXACT), mask=m)


_ENCODE = CachedLaunch(_encode_kernel)
_DECODE = CachedLaunch(_decode_kernel)
