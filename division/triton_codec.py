"""DIVISION's codec with fused Triton kernels: the GPU fast path of ``dual_precision.DivisionCodec``.

``TritonDivisionCodec`` takes the reference's constructor and writes the reference's stored format
(``Packed.tensors`` = lfc / codes / mn / step, same meta), so either codec decodes the other's
``Packed``.

The kernels and how they work: division/triton_codec_kernels.py; their launch parameters
(``Plan``, ``TUNING``): division/triton_plan.py. A training BatchNorm's forward can ride on an
encode's two launches (``FusedNorm``, division/triton_norm.py).

The 31-bit seed of each encode is drawn on the host (no device sync): from the codec's generator
when it lives on the CPU, else from a private host stream (Python's ``random.Random``) seeded with
the codec generator's ``initial_seed()`` (or ``torch.initial_seed()`` when there is none), so
``torch.manual_seed(s)`` before building the codec makes runs reproducible. The draws differ from the reference's
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

import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .codec import Packed, SaveContext
from .decode_prefetch import prefetched
from .exact import RELU_MASK, apply_relu_mask, relu_mask_bits
from .dual_precision import (CODES_NCHW, CODES_NHWC, LAYOUT_FEATURES, LAYOUT_MAPS, LAYOUT_VOLUME,
                             DivisionCodec, Geometry, _memory_format)
from .packing import packed_nbytes
from .triton_codec_kernels import _DECODE, _ENCODE
from .triton_launch import INT32_LIMIT, aligned, dense_layout, interpreting, runs_here
from .triton_plan import (_INTERPRET, _MASK_WORDS, RNG_DATA, RNG_HASH, RNG_PHILOX, TUNING, Plan, _lfc_format,
                          _mask_argument, _plan, _sm_count)

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sample_strided(x: torch.Tensor) -> bool:
    """Is x an (N, C, H, W) map laid out channels_last within each sample, its samples further
    apart than H * W * C elements: the token grid of (N, 1 + H * W, C) tokens without the class
    token, viewed as maps (``division.layouts``). The kernels read and write such a map in place
    (``_encode_kernel``'s XN); offsets stay below int32's range."""
    if x.dim() != 4 or x.shape[0] < 2 or min(x.shape) < 1:
        return False
    n, c, h, w = x.shape
    return (x.stride()[1:] == (1, w * c, c) and x.stride(0) > h * w * c
            and x.storage_offset() + n * x.stride(0) < INT32_LIMIT)


def sample_stride(x: torch.Tensor, plan: Plan) -> int:
    """The kernels' XN for the maps x under ``plan``: elements from one sample to the next. Called
    for every encode and decode: a dense map (every one but a ViT's token grid) is answered by its
    first stride alone."""
    dense = plan.c * plan.h * plan.w
    step = x.stride(0)
    return step if step != dense and sample_strided(x) else dense


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



# ====================================================================================== codec
class TritonDivisionCodec(DivisionCodec):
    """``DivisionCodec`` whose encode / decode run fused Triton kernels on CUDA 4-D inputs.

    Same constructor and stored format as the reference; see the module docstring for what runs
    where and what falls back. ``rng`` picks the in-kernel random numbers (RNG_HASH, RNG_PHILOX, or
    RNG_DATA: seeded by the values being rounded, no host seed); None takes ``TUNING["rng"]``.
    """

    def __init__(self, block_size: int = 8, bits: int = 2, rounding: str = "stochastic",
                 keep_lfc: bool = True, keep_hfc: bool = True, simulate: bool = False,
                 generator: Optional[torch.Generator] = None, rng: Optional[int] = None,
                 relu_zeros: bool = True):
        super().__init__(block_size=block_size, bits=bits, rounding=rounding, keep_lfc=keep_lfc,
                         keep_hfc=keep_hfc, simulate=simulate, generator=generator,
                         relu_zeros=relu_zeros)
        if rng not in (None, RNG_HASH, RNG_PHILOX, RNG_DATA):
            raise ValueError(f"rng must be None, RNG_HASH, RNG_PHILOX or RNG_DATA, got {rng!r}")
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
        fmt = _memory_format(x)
        if fmt is None and not x.is_contiguous() and sample_strided(x):
            fmt = "channels_last"  # a token grid read in place: channels_last within each sample
        meta = {"layout": geom.layout, "shape": x.shape, "dtype": x.dtype, "memory_format": fmt,
                "geometry": geom, "bits": self.bits, "has_lfc": True, "has_hfc": True, "simulated": False}
        if plan.codes_cl:
            meta["codes_order"] = CODES_NHWC
        return Packed(self, tensors, meta)

    def _as_maps(self, x: torch.Tensor) -> tuple[Optional[torch.Tensor], bool]:
        """(x as the (N, C, H, W) maps its geometry encodes, channels_last), where that is a view
        the kernels read: 4-D contiguous or channels_last, and contiguous (N, F) features and
        volumes, whose canonical maps are reshapes (same codes, same LFC). Else (None, False)."""
        if x.dim() == 4:
            cl = dense_layout(x)
            if cl is None and sample_strided(x):
                return x, True
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
        xn = sample_stride(x, plan)
        norm_args = (step,) * 4 if norm is None else (norm.y, norm.stats, norm.mean, norm.coef)
        for phase in phases:
            pack_mask = relu_mask is not None and phase != 2  # pass 1 (phases 0 and 1) reads all of x
            _ENCODE.launch((plan, phase, x.dtype, aligned(x), stochastic, rng, from_counter, pack_mask,
                            norm is not None, dev.index, xn),
                           plan.encode_grid,
                           (x, lfc, codes, mn, step, part, counter, words, *norm_args, seed, c, c // plan.g, xn),
                           lambda: dict(STOCHASTIC=stochastic, RNG=rng, SEED_PTR=from_counter,
                                        FMA_Q=stochastic and plan.fma_q, PACK_MASK=pack_mask,
                                        NORM=norm is not None, **plan.encode_constexprs(phase)),
                           plan.enc_warps)
            if norm is not None and phase == 1:
                norm.reduce()
        return {"lfc": lfc, "codes": codes, "mn": mn, "step": step}

    def _decode(self, packed: Packed, mask: Optional[Packed]) -> torch.Tensor:
        plan = self._decode_plan(packed)
        if plan is None:
            return super()._decode(packed, mask)
        return self._decode_fused(packed, plan, mask)

    def decode_affine(self, packed: Packed, scale: torch.Tensor, shift: torch.Tensor,
                      mask: Optional[Packed] = None) -> Optional[torch.Tensor]:
        """``decode(packed) * scale + shift`` per channel (fp32 ``scale``, ``shift`` of C values),
        with the zeros of ``mask`` (a ReLU mask's Packed of the result) if given, in one kernel: a
        BatchNorm's output rebuilt from its input's codes (``division.rebuild``). None where the
        fused decode does not take this Packed (the caller composes the reference ops instead)."""
        plan = self._decode_plan(packed)
        if plan is None:
            return None
        affine = (scale.detach().float().contiguous(), shift.detach().float().contiguous())
        return self._decode_fused(packed, plan, mask, affine)

    def takes_sample_strided(self, x: torch.Tensor) -> bool:
        """Does ``encode`` read the sample-strided channels_last map x (``sample_strided``: an
        (N, C, H, W) map sliced out of longer samples, as a ViT's token grid out of its tokens) in
        place, and can ``decode_into`` write its decode into such a map?"""
        if not sample_strided(x):
            return False
        plan, _, _ = self._plan_of(x)
        return plan is not None and plan.channels_last

    def decode_into(self, packed: Packed, out: torch.Tensor) -> bool:
        """Write ``packed``'s decode into ``out`` (its maps: dense, or sample-strided channels_last
        where ``takes_sample_strided``) in one fused decode, instead of decoding into a fresh tensor
        and copying: a ViT's tokens are rebuilt around their class token without a concatenation.
        False (nothing written) where the fused decode does not take this Packed or this ``out``."""
        m = packed.meta
        if RELU_MASK in m or prefetched(packed):
            return False  # its decode takes a mask's zeros, or is waiting on a side stream: decode()
        plan = self._decode_plan(packed)
        if (plan is None or tuple(out.shape) != (plan.n, plan.c, plan.h, plan.w) or out.dtype != m["dtype"]
                or not runs_here(out) or out.device != packed.tensors["codes"].device
                or not (plan.channels_last and (sample_strided(out) or dense_layout(out) is True))):
            return False
        self._decode_fused(packed, plan, None, out=out)
        return True

    def _decode_fused(self, packed: Packed, plan: Plan, mask: Optional[Packed],
                      affine: Optional[tuple] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        t, m = packed.tensors, packed.meta
        fmt = _lfc_format(plan)
        if not t["lfc"].is_contiguous(memory_format=fmt):
            t = dict(t, lfc=t["lfc"].contiguous(memory_format=fmt))  # e.g. the reference's Packed
        # The mask's bits follow the decoded output's storage order: the kernel reads the bit of
        # each element it writes. (A mask of another shape or format: applied afterwards.)
        bits = None if mask is None else relu_mask_bits(mask, m["shape"], plan.channels_last)
        out = self._decode_kernel(t, m["dtype"], plan, bits, affine, out).view(m["shape"])
        if m["memory_format"] == "channels_last" and not plan.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)  # a narrow map's NCHW decode
        return out if mask is None or bits is not None else apply_relu_mask(out, mask)

    def _decode_plan(self, packed: Packed) -> Optional[Plan]:
        """The fused decode's plan for ``packed``, or None where the reference decodes it."""
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
        return plan

    def _decode_kernel(self, t: dict[str, torch.Tensor], dtype: torch.dtype, plan: Plan,
                       mask_bits: Optional[torch.Tensor] = None, affine: Optional[tuple] = None,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The decode; with ``mask_bits`` (a ReLU mask in the output's storage order) the output
        takes its zeros from the mask (``exact.apply_relu_mask``); with ``affine`` (fp32 scale,
        shift per channel) the decoded values are mapped through it first. ``out``: the maps to
        write (``decode_into``), else a fresh tensor."""
        n, c, h, w = plan.n, plan.c, plan.h, plan.w
        if out is None:
            fmt = torch.channels_last if plan.channels_last else torch.contiguous_format
            out = torch.empty((n, c, h, w), dtype=dtype, device=t["codes"].device, memory_format=fmt)
        xn = sample_stride(out, plan)
        if mask_bits is not None and xn != c * h * w:
            raise ValueError("a ReLU mask's bits follow a dense output: decode it into a fresh tensor")
        mask_mode, mask_arg = _mask_argument(mask_bits, plan)
        scale, shift = (out, out) if affine is None else affine
        args = (t["codes"], t["lfc"], t["mn"], t["step"], out, out if mask_arg is None else mask_arg,
                scale, shift, c, c // plan.g, xn)
        key = (plan, dtype, mask_mode, affine is not None, *(aligned(a) for a in args[:5]), out.device.index, xn)
        _DECODE.launch(key, plan.decode_grid, args,
                       lambda: dict(plan.decode_constexprs(), MASK=mask_mode,
                                    TINY=float(torch.finfo(dtype).tiny), AFFINE=affine is not None),
                       plan.dec_warps)
        return out


__all__ = ["TritonDivisionCodec", "Plan", "TUNING", "RNG_HASH", "RNG_PHILOX", "RNG_DATA", "interpreting",
           "prepare_graph_capture", "graph_seed_counter"]
