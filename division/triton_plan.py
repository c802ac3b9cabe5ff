"""Launch plans of the codec's fused kernels (division/triton_codec_kernels.py).

``_plan`` turns a map's shape, dtype, memory format, bits and block size into a ``Plan``: how many
channels a program owns (G), the tile shapes, warps, whether planes are split into chunks of block
rows (two encode launches), whether codes are stored in NHWC order. ``TUNING`` holds the choices
measured best on an H200 (docs/kernels.md); tools override its entries to compare variants.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .triton_launch import INT32_LIMIT, interpreting

RNG_HASH = 0
RNG_PHILOX = 1
RNG_DATA = 2  # RNG_HASH keyed by the values being rounded: a pure function of the input (compiled graphs)

_INTERPRET = interpreting()


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


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count

