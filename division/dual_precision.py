"""DIVISION's dual-precision activation codec: plain-PyTorch reference implementation.

An activation map is split into a low-frequency component (LFC: block averages, kept in bfloat16)
and a high-frequency component (HFC: the residual, kept at ``bits`` bits per element with one
min / step pair per map). Backward reads ``upsample(LFC) + mn + code * step``. See
``shared/docs/DIVISION.md`` section 1 for the method.

Canonical view
--------------
Every input is handled as a stack of 2-D maps ``(N, C, H, W)`` pooled with a ``(kh, kw)`` kernel.
One "map" is one ``(n, c)`` slice: it owns one ``mn`` / ``step`` pair.

==========================  ============================  ==========================  ================
input                       canonical (N, C, H, W)        kernel (kh, kw)             stats per
==========================  ============================  ==========================  ================
4-D (N, C, H, W) (conv/BN)  as is                         (min(B, H), min(B, W))      (n, c)
2-D (N, F) (Linear input)   (N, 1, F, 1)                  (min(B, F), 1)              n
3-D (N, L, D) (tokens)      (N, D, L, 1) (a transpose)    (min(B, L), 1)              (n, d)
k-D, k >= 5 (N, C, D, H, W) (N, C * D, H, W)              (min(B, H), min(B, W))      (n, c, d)
1-D, 0-D, empty, integer    stored raw (a reference to the tensor, as plain autograd keeps it)
==========================  ============================  ==========================  ================

3-D inputs are read as token sequences (pool along dim 1). A Conv1d input ``(N, C, L)`` is
therefore pooled across channels; that stays correct (the error bound below holds for any
layout), only the compression quality differs from a per-channel treatment.

Edge cases, all handled without padding the input:
- H or W not a multiple of the kernel: the last block is ceiled and averages only its valid
  elements, so every LFC cell lines up with the elements it summarises (no misalignment).
- H < B or W < B: the kernel shrinks to the map (the LFC is the map's mean along that axis).
- Maps of a single element (H == W == 1, e.g. an SE block's 1x1 input, a length-1 sequence):
  the LFC *is* the value, so only the LFC is kept (2 bytes per element; its error is the bf16
  rounding, at most 2^-9 relative). Adding the HFC would cost Q/8 + 4 bytes per element (codes plus
  one mn / step pair per element) to recover bits that bf16 already nearly has. With
  ``keep_lfc=False`` the generic path runs (the value lands in ``mn``).

Quantization and its error bound
--------------------------------
The residual is taken against the LFC *as stored* (bf16-rounded), so the LFC's rounding moves into
the HFC instead of adding error. ``mn`` is rounded toward -inf and ``step`` toward +inf when they
are stored in bf16, and quantization uses these stored values; the grid
``mn_s + k * step_s, k = 0 .. 2^Q - 1`` therefore covers each map's HFC range and nothing is
clamped. Per element ``|x_hat - x| < step_s`` (stochastic rounding, unbiased) or
``<= step_s / 2`` (nearest), up to fp32 arithmetic, plus the final cast for 16-bit inputs.
The bf16 rounding of the stats only widens ``step_s`` slightly (by at most 2^-7 relative, plus
one bf16 ulp of ``mn`` spread over the levels). Inputs must be finite.

Stored format (what ``encode`` keeps; a Triton kernel may replace encode/decode on CUDA as long as
it keeps this format):
    Packed.tensors = {"lfc":   bf16 (N, C, Hb, Wb), any strides (absent when keep_lfc=False),
                      "codes": uint8, flat, ceil(N*C*H*W*Q/8) bytes (absent when no HFC is kept):
                               8/Q codes per byte, W-neighbours of one map row, bytes in NCHW
                               order; or, with meta codes_order="nhwc" (the fused kernels, for
                               channels_last maps whose planes are whole bytes), the same bytes in
                               (N, H*W*Q/8, C) order, so each store from an NHWC tile is contiguous,
                      "mn":    bf16 (N, C),
                      "step":  bf16 (N, C)}
    simulate=True:  {"x_hat": the fake-quantized reconstruction, input dtype and shape}
    raw inputs:     {"x": the input itself}
    Packed.meta    = {"layout", "shape", "dtype", "memory_format", "geometry", "bits",
                      "has_lfc", "has_hfc"[, "codes_order"][, exact.RELU_MASK: the Packed of the
                      input's ReLU mask, linked by the compressor under relu_zeros]}
Bytes per element for an fp32 (N, C, H, W) map, B = 8, Q = 2: Q/8 + 2/B^2 + 4/(H*W), with ceil'd
block counts and ceil(numel * Q / 8) code bytes; ``closed_form_nbytes`` gives it exactly.

Work is done in fp32 whatever the input dtype (fp32, bf16, fp16; fp64 is accepted at fp32
precision); decode returns the input's dtype, shape, device and memory format (channels_last
4-D, channels_last_3d 5-D). A ``generator`` must live on the inputs' device.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .codec import ActivationCodec, Packed, SaveContext
from .decode_prefetch import take as take_prefetched
from .exact import (RELU_MASK, _is_channels_last, _restore_format, apply_relu_mask, apply_relu_mask_, last_reader,
                    share_decode)
from .packing import SUPPORTED_BITS, pack_bits, packed_nbytes, unpack_bits

ROUNDINGS = ("stochastic", "nearest")

LAYOUT_RAW = "raw"            # stored as is
LAYOUT_MAPS = "maps"          # 4-D (N, C, H, W)
LAYOUT_FEATURES = "features"  # 2-D (N, F) -> (N, 1, F, 1)
LAYOUT_SEQUENCE = "sequence"  # 3-D (N, L, D) -> (N, D, L, 1)
LAYOUT_VOLUME = "volume"      # k-D, k >= 5 (N, C, D, ..., H, W) -> (N, C * D * ..., H, W)

_BF16_BYTES = 2

CODES_NCHW = "nchw"  # Packed.meta["codes_order"]: absent means NCHW
CODES_NHWC = "nhwc"


# ------------------------------------------------------------------------------ canonical view
@dataclass(frozen=True)
class Geometry:
    """The canonical (N, C, H, W) view of an input and its pooling kernel (kh, kw)."""

    layout: str
    n: int = 0
    c: int = 0
    h: int = 0
    w: int = 0
    kh: int = 1
    kw: int = 1

    @property
    def hb(self) -> int:
        return -(-self.h // self.kh)  # ceil: the last block may be partial

    @property
    def wb(self) -> int:
        return -(-self.w // self.kw)

    @property
    def maps(self) -> int:
        return self.n * self.c

    @property
    def numel(self) -> int:
        return self.n * self.c * self.h * self.w


@functools.lru_cache(maxsize=1024)
def _cached_geometry(shape: tuple, dtype: torch.dtype, block_size: int) -> "Geometry":
    """canonical_geometry, remembered: encode and decode ask for the same few shapes every step."""
    return canonical_geometry(shape, dtype, block_size)


def canonical_geometry(shape, dtype: torch.dtype, block_size: int) -> Geometry:
    """How a tensor of this shape and dtype is viewed (see the module docstring's table)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or math.prod(shape) == 0 or not dtype.is_floating_point:
        return Geometry(LAYOUT_RAW)
    if len(shape) == 2:
        n, f = shape
        return Geometry(LAYOUT_FEATURES, n, 1, f, 1, min(block_size, f), 1)
    if len(shape) == 3:
        n, length, d = shape
        return Geometry(LAYOUT_SEQUENCE, n, d, length, 1, min(block_size, length), 1)
    n, h, w = shape[0], shape[-2], shape[-1]
    c = math.prod(shape[1:-2])
    layout = LAYOUT_MAPS if len(shape) == 4 else LAYOUT_VOLUME
    return Geometry(layout, n, c, h, w, min(block_size, h), min(block_size, w))


def to_canonical(x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """``x`` as a contiguous fp32 (N, C, H, W) tensor.

    Contiguous (NCHW) order makes the codes' order, and so the random draws, independent of the
    input's memory format: a channels_last input encodes exactly like its contiguous copy.
    """
    if geom.layout == LAYOUT_FEATURES:
        x = x.reshape(geom.n, 1, geom.h, 1)
    elif geom.layout == LAYOUT_SEQUENCE:
        x = x.transpose(1, 2).unsqueeze(-1)
    elif geom.layout == LAYOUT_VOLUME:
        x = x.reshape(geom.n, geom.c, geom.h, geom.w)
    return x.to(dtype=torch.float32, memory_format=torch.contiguous_format)


def from_canonical(y: torch.Tensor, geom: Geometry, shape, dtype: torch.dtype,
                   memory_format: Optional[str]) -> torch.Tensor:
    """Inverse of ``to_canonical``: the original shape, dtype and memory format."""
    if geom.layout == LAYOUT_SEQUENCE:
        y = y.squeeze(-1).transpose(1, 2)
    # (``Tensor.to`` returns a tensor of the same dtype as it is, strides and all: a sequence's
    # transposed view stays one without the ``contiguous``)
    y = y.reshape(shape).to(dtype=dtype).contiguous()
    return _restore_memory_format(y, memory_format)


def _memory_format(x: torch.Tensor) -> Optional[str]:
    if _is_channels_last(x):
        return "channels_last"
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return None


def _restore_memory_format(y: torch.Tensor, memory_format: Optional[str]) -> torch.Tensor:
    if memory_format == "channels_last_3d":
        return y.contiguous(memory_format=torch.channels_last_3d)
    return _restore_format(y, memory_format == "channels_last")


# ------------------------------------------------------------------------------------ the LFC
def block_mean(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Mean of each (kh, kw) block of an fp32 (N, C, H, W) tensor; the last blocks are ceiled.

    Sums come from avg_pool2d with divisor 1 and are divided by each block's count of *valid*
    elements, computed here, so partial edge blocks average only what they hold on any backend
    (ceil_mode's divisor convention is then irrelevant).
    """
    h, w = x.shape[-2:]
    sums = F.avg_pool2d(x, (kh, kw), stride=(kh, kw), ceil_mode=True, divisor_override=1)
    rows = _block_counts(h, kh, x.device)
    cols = _block_counts(w, kw, x.device)
    return sums / (rows.view(-1, 1) * cols.view(1, -1))


def _block_counts(size: int, k: int, device) -> torch.Tensor:
    """Valid elements in each ceiled block along one axis: k, k, ..., and the remainder."""
    counts = torch.full((-(-size // k),), float(k), device=device)
    # fill_ with a Python number is a kernel argument, no host-to-device copy (which a CUDA graph
    # capture refuses from pageable memory)
    counts[-1:].fill_(size - (counts.numel() - 1) * k)
    return counts


def upsample(lfc: torch.Tensor, kh: int, kw: int, h: int, w: int) -> torch.Tensor:
    """Nearest-upsample a (N, C, Hb, Wb) LFC back to fp32 (N, C, h, w): element (i, j) reads
    block (i // kh, j // kw), the block it was averaged into."""
    n, c, hb, wb = lfc.shape
    big = lfc.float()[:, :, :, None, :, None].expand(n, c, hb, kh, wb, kw)
    return big.reshape(n, c, hb * kh, wb * kw)[:, :, :h, :w]


def _over_blocks(x4: torch.Tensor, lfc: torch.Tensor, geom: "Geometry"):
    """(x4 as (N, C, Hb, kh, Wb, kw) blocks, the fp32 LFC broadcast over them) where the blocks
    tile the contiguous map, so that an op with the LFC needs no full-size upsample; else None."""
    n, c, hb, wb = lfc.shape
    if hb * geom.kh != geom.h or wb * geom.kw != geom.w or not x4.is_contiguous():
        return None
    return x4.view(n, c, hb, geom.kh, wb, geom.kw), lfc.float()[:, :, :, None, :, None]


def residual(x4: torch.Tensor, lfc: torch.Tensor, geom: "Geometry") -> torch.Tensor:
    """``x4 - upsample(lfc)`` as a new fp32 (N, C, H, W) tensor (see ``_over_blocks``)."""
    blocks = _over_blocks(x4, lfc, geom)
    if blocks is None:
        return x4 - upsample(lfc, geom.kh, geom.kw, geom.h, geom.w)
    return (blocks[0] - blocks[1]).view(x4.shape)


def add_upsampled_(x4: Optional[torch.Tensor], lfc: torch.Tensor, geom: "Geometry") -> torch.Tensor:
    """``x4 + upsample(lfc)``, added into ``x4`` (a contiguous fp32 (N, C, H, W) tensor the caller
    owns; None: the upsample alone; see ``_over_blocks``). Addition commutes, so the values are
    those of ``upsample(lfc) + x4``."""
    if x4 is None:
        return upsample(lfc, geom.kh, geom.kw, geom.h, geom.w).contiguous()
    blocks = _over_blocks(x4, lfc, geom)
    if blocks is None:
        return x4.add_(upsample(lfc, geom.kh, geom.kw, geom.h, geom.w))
    blocks[0].add_(blocks[1])
    return x4


# ---------------------------------------------------------------------------------- the HFC
def bf16_directed(x: torch.Tensor, toward: str) -> torch.Tensor:
    """Round fp32 ``x`` to bfloat16 toward ``"up"`` (+inf) or ``"down"`` (-inf).

    bf16 is the top half of fp32, so clearing the low 16 bits truncates toward zero; where that
    moved the value the wrong way, one bf16 ulp away from zero is added (integer +0x10000 on the
    bit pattern grows the magnitude). Pure integer ops: same result on every device.
    """
    x = x.float()
    bits = x.view(torch.int32)
    low = bits & 0xFFFF
    trunc = bits - low
    wrong_way = (low != 0) & ((x > 0) if toward == "up" else (x < 0))
    bits = torch.where(wrong_way, trunc + 0x10000, trunc)
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


def quantize(hfc: torch.Tensor, bits: int, rounding: str, generator: Optional[torch.Generator],
             noise: Optional[torch.Tensor] = None, owned: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-map uniform quantization of an fp32 (N, C, H, W) tensor to ``bits``-bit codes.

    Returns codes (uint8, same shape), mn and step (bf16, (N, C)). mn is rounded down and step up
    so the stored grid covers [min, max] of each map; the codes are computed against the stored
    values, so decode is consistent with encode and nothing needs clamping (the clamp only
    catches fp32 round-off). Stochastic rounding floor(v + u), u ~ U[0, 1), is unbiased for
    v in [0, levels]; nearest uses u = 0.5. ``noise``: the u to use instead of ``torch.rand``
    (fp32, hfc's shape), for stochastic rounding only. ``owned``: hfc is the caller's scratch, and
    the scaled values are computed in it (the same values, one full-size temporary fewer).
    """
    levels = 2 ** bits - 1
    mn, mx = torch.aminmax(hfc.flatten(2), dim=-1)
    mn_s = bf16_directed(mn, "down")
    step_s = bf16_directed((mx - mn_s.float()) / levels, "up")
    mn_f = mn_s.float()[:, :, None, None]
    step_f = step_s.float()[:, :, None, None]
    # A constant map has step 0 (all its values equal mn_s): divide by 1 instead, giving code 0.
    safe_step = torch.where(step_f > 0, step_f, torch.ones_like(step_f))
    v = hfc.sub_(mn_f).div_(safe_step) if owned else (hfc - mn_f) / safe_step
    if rounding == "stochastic" and noise is not None:
        v += noise
    elif rounding == "stochastic":
        # torch.rand with the logical shape (not rand_like, which follows strides): draws depend
        # only on the element's NCHW position and the generator's state.
        v += torch.rand(hfc.shape, generator=generator, device=hfc.device, dtype=torch.float32)
    else:
        v += 0.5
    codes = v.floor_().clamp_(0, levels).to(torch.uint8)
    return codes, mn_s, step_s


def codes_in_nchw_order(codes: torch.Tensor, meta: dict) -> torch.Tensor:
    """The packed code bytes of a Packed in NCHW order, whichever order they were stored in."""
    if meta.get("codes_order", CODES_NCHW) == CODES_NCHW:
        return codes
    geom: Geometry = meta["geometry"]
    plane_bytes = geom.h * geom.w * meta["bits"] // 8
    return codes.view(geom.n, plane_bytes, geom.c).permute(0, 2, 1).reshape(-1)


def dequantize(codes: torch.Tensor, mn: torch.Tensor, step: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """fp32 mn + code * step for (N, C, H, W) codes and (N, C) stats. ``in_place``: the codes are
    fp32 already and are overwritten with the result (no second full-size buffer)."""
    mn, step = mn.float()[:, :, None, None], step.float()[:, :, None, None]
    if in_place:
        return torch.addcmul(mn, codes, step, out=codes)
    return torch.addcmul(mn, codes.float(), step)


# ---------------------------------------------------------------------------------- the codec
class DivisionCodec(ActivationCodec):
    """DIVISION: LFC in bf16 + HFC at ``bits`` bits with per-map min / step. See the module doc.

    block_size: LFC block B (the kernel is min(B, H) x min(B, W) in the canonical view).
    bits: HFC bits Q, one of 1, 2, 4, 8.
    rounding: "stochastic" (unbiased, the method's default) or "nearest" (deterministic).
    keep_lfc: False stores no LFC and quantizes the input itself (ablation).
    keep_hfc: False stores only the LFC; decode is its upsample (ablation).
    simulate: run the same math but keep the fake-quantized reconstruction at full size in the
        input dtype (debugging; saves no memory).
    generator: the torch.Generator for stochastic rounding (None: the global RNG).
    relu_zeros: where the input is also a ReLU's output, kept as the ReLU's exact mask, decode
        takes its zeros from the mask and shares the decoded tensor with the ReLU's backward
        (``exact.share_decode``; the compressor links the two). False: the paper's decode.
    """

    name = "division"

    def __init__(self, block_size: int = 8, bits: int = 2, rounding: str = "stochastic",
                 keep_lfc: bool = True, keep_hfc: bool = True, simulate: bool = False,
                 generator: Optional[torch.Generator] = None, relu_zeros: bool = True):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        if not keep_lfc and not keep_hfc:
            raise ValueError("keep_lfc and keep_hfc cannot both be False (nothing would be stored); "
                             f"got keep_lfc={keep_lfc!r}, keep_hfc={keep_hfc!r}")
        self.block_size = block_size
        self.bits = bits
        self.rounding = rounding
        self.keep_lfc = bool(keep_lfc)
        self.keep_hfc = bool(keep_hfc)
        self.simulate = bool(simulate)
        self.generator = generator
        self.relu_zeros = bool(relu_zeros)

    def describe(self) -> dict[str, Any]:
        return {"codec": self.name, "block_size": self.block_size, "bits": self.bits,
                "rounding": self.rounding, "keep_lfc": self.keep_lfc, "keep_hfc": self.keep_hfc,
                "simulate": self.simulate, "relu_zeros": self.relu_zeros}

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "codec")
        return f"DivisionCodec({knobs})"

    # ------------------------------------------------------------------------------- geometry
    def geometry(self, shape, dtype: torch.dtype) -> Geometry:
        return _cached_geometry(tuple(shape), dtype, self.block_size)

    def _parts(self, geom: Geometry) -> tuple[bool, bool]:
        """(store the LFC, store the HFC) for this geometry; a one-element map is its own LFC."""
        if not self.keep_lfc:
            return False, True
        return True, self.keep_hfc and geom.h * geom.w > 1

    # ------------------------------------------------------------------------- encode / decode
    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        geom = self.geometry(x.shape, x.dtype)
        meta = {"layout": geom.layout, "shape": x.shape, "dtype": x.dtype,
                "memory_format": _memory_format(x), "geometry": geom, "bits": self.bits}
        if geom.layout == LAYOUT_RAW:
            return Packed(self, {"x": x.detach()}, meta)  # detach: see RawCodec.encode
        has_lfc, has_hfc = self._parts(geom)
        meta.update(has_lfc=has_lfc, has_hfc=has_hfc, simulated=False)
        packed = Packed(self, self._encode_maps(to_canonical(x, geom), geom, has_lfc, has_hfc), meta)
        if self.simulate:
            x_hat = self.decode(packed)
            return Packed(self, {"x_hat": x_hat}, {**meta, "simulated": True})
        return packed

    def _encode_maps(self, x4: torch.Tensor, geom: Geometry, has_lfc: bool,
                     has_hfc: bool) -> dict[str, torch.Tensor]:
        stored: dict[str, torch.Tensor] = {}
        hfc = x4
        if has_lfc:
            lfc = block_mean(x4, geom.kh, geom.kw).to(torch.bfloat16)
            stored["lfc"] = lfc
            if has_hfc:
                # Residual against the *stored* LFC: its bf16 rounding lands in the HFC.
                hfc = residual(x4, lfc, geom)
        if has_hfc:
            # (without an LFC, hfc is x4: perhaps the activation itself, which stays as it is)
            codes, mn, step = quantize(hfc, self.bits, self.rounding, self.generator, owned=hfc is not x4)
            stored["codes"] = pack_bits(codes, self.bits)
            stored["mn"] = mn
            stored["step"] = step
        return stored

    def decode(self, packed: Packed) -> torch.Tensor:
        mask = packed.meta.get(RELU_MASK)
        decoded = take_prefetched(packed)  # decoded ahead on a side stream (decode_prefetch)
        if decoded is None:
            decoded = self._decode(packed, mask)
        if mask is not None and last_reader(packed):
            share_decode(mask, decoded)  # for the ReLU's backward, which comes next
        return decoded

    def decode_ahead(self, packed: Packed) -> torch.Tensor:
        """What ``decode`` will return, computed early (``decode_prefetch``); no reader counted."""
        return self._decode(packed, packed.meta.get(RELU_MASK))

    def _decode(self, packed: Packed, mask: Optional[Packed]) -> torch.Tensor:
        """The activation; with the zeros of ``mask`` (a linked ReLU mask's Packed) if given."""
        t, m = packed.tensors, packed.meta
        if m["layout"] == LAYOUT_RAW:
            return t["x"]  # the output itself: its zeros are exact
        if m.get("simulated"):
            return t["x_hat"] if mask is None else apply_relu_mask(t["x_hat"], mask)
        geom: Geometry = m["geometry"]
        # One full-size fp32 buffer, written in place: the HFC, then the upsampled LFC added into
        # it, then the mask's zeros. This decode made six full-size temporaries before, all alive
        # inside the backward that asked for it.
        x4 = None
        if m["has_hfc"]:
            codes = unpack_bits(codes_in_nchw_order(t["codes"], m), m["bits"], geom.numel)
            x4 = dequantize(codes.view(geom.n, geom.c, geom.h, geom.w).float(), t["mn"], t["step"], in_place=True)
            del codes
        if m["has_lfc"]:
            x4 = add_upsampled_(x4, t["lfc"], geom)
        out = from_canonical(x4, geom, m["shape"], m["dtype"], m["memory_format"])
        if mask is None:
            return out
        # ``out`` is this decode's own tensor unless it is x4 viewed (then x4 is ours too)
        return apply_relu_mask_(out, mask)

    # ------------------------------------------------------------------------------------ bytes
    def closed_form_nbytes(self, shape, dtype: torch.dtype) -> int:
        geom = self.geometry(shape, dtype)
        if geom.layout == LAYOUT_RAW or self.simulate:
            return math.prod(shape) * dtype.itemsize
        has_lfc, has_hfc = self._parts(geom)
        nbytes = 0
        if has_lfc:
            nbytes += geom.maps * geom.hb * geom.wb * _BF16_BYTES
        if has_hfc:
            nbytes += packed_nbytes(geom.numel, self.bits) + 2 * geom.maps * _BF16_BYTES
        return nbytes
