"""The fused Triton DIVISION codec (division/triton_codec.py) against the plain-PyTorch reference.

The same checks run twice:
- on CPU through Triton's interpreter, in a subprocess started with TRITON_INTERPRET=1 (the kernels
  are built as interpreted functions when division.triton_codec is imported, so the variable must be
  set before that import; a subprocess keeps it out of this test process). About three minutes of
  one core, run beside the rest of the suite from the end of collection (tests/background.py).
- on a CUDA device (``-m gpu``), with larger shapes, every dtype and memory format.

Equivalence: with rounding="nearest" and inputs whose block sums are exact in fp32 (multiples of
2^-8), the fast path must store the reference's bytes exactly (lfc, codes, mn, step) and decode to
the same values. On random inputs the block sums' order may differ, so an LFC may move by one bf16
ulp and a few codes by one. Stochastic rounding uses other random draws than the reference, so it is
checked for its own properties: |error| < step, unbiased, reproducible from the seed.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from division.codec import Packed  # noqa: E402
from division.dual_precision import DivisionCodec, codes_in_nchw_order, upsample  # noqa: E402
from division.packing import unpack_bits  # noqa: E402
from tests import background  # noqa: E402

BF16_ULP = 2.0 ** -7  # relative spacing of bf16 values (upper bound)


# ====================================================================================== helpers
def exact_input(shape, dtype=torch.float32, channels_last=False, seed=0, device="cpu"):
    """Multiples of 2^-8 in (-1, 1): representable in bf16 / fp16, block sums exact in fp32."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-255, 256, shape, generator=g).float() / 256).to(dtype)
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def random_input(shape, dtype=torch.float32, channels_last=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _codes(packed):
    m = packed.meta
    return unpack_bits(codes_in_nchw_order(packed.tensors["codes"], m), m["bits"], m["geometry"].numel).long()


def _assert_fast(codec, x):
    from division.triton_launch import dense_layout
    plan = codec.plan_for(x.shape, x.dtype, bool(dense_layout(x)), x.device)
    assert plan is not None, f"expected the fused path for {tuple(x.shape)} {x.dtype}"
    return plan


def _tuning(name):
    from division.triton_codec import TUNING
    return TUNING[name]


def _assert_format(xh, x):
    assert xh.shape == x.shape and xh.dtype == x.dtype and xh.device == x.device
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if cl:
        assert xh.is_contiguous(memory_format=torch.channels_last)
    else:
        assert xh.is_contiguous()


# =========================================================================== the shared checks
# (shape, bits, channels_last, dtype, block_size)
CPU_EXACT_CASES = [
    ((2, 4, 12, 12), 2, False, torch.float32, 8),   # partial last blocks (12 = 8 + 4)
    ((2, 8, 7, 7), 2, False, torch.float32, 8),     # H < B, 49 codes per plane: planes share bytes
    ((1, 8, 7, 7), 1, True, torch.bfloat16, 8),     # 1 bit: 8 codes per byte, misaligned planes
    ((1, 4, 5, 9), 4, False, torch.float16, 8),     # kh = H = 5, W = 9 (blocks 8 + 1), odd planes
    ((2, 4, 16, 16), 2, True, torch.float32, 8),    # channels_last
    ((1, 8, 3, 3), 8, False, torch.float32, 8),     # 8 bits: one code per byte
    ((2, 8, 9, 7), 2, True, torch.float16, 4),      # block 4, channels_last, misaligned
    ((1, 2, 20, 4), 2, False, torch.bfloat16, 16),  # block 16 > W
    ((2, 4, 14, 14), 2, True, torch.float32, 8),    # rows not byte-aligned, planes aligned
    ((2, 3, 16, 16), 2, True, torch.bfloat16, 8),   # 3-channel image: coded from its NCHW copy
]

_A, _B, _C, _D = (8, 64, 56, 56), (4, 256, 14, 14), (4, 512, 7, 7), (2, 3, 36, 36)
GPU_EXACT_CASES = (
    [(shape, 2, cl, torch.float32, 8) for shape in (_A, _B, _C, _D) for cl in (False, True)]
    + [(shape, 2, cl, torch.bfloat16, 8) for shape in (_A, _C) for cl in (False, True)]
    + [(shape, 2, cl, torch.float16, 8) for shape in (_B, _D) for cl in (False, True)]
    + [((4, 64, 28, 28), 1, True, torch.float32, 8), ((4, 64, 7, 7), 4, False, torch.float32, 8),
       ((4, 64, 14, 14), 8, True, torch.bfloat16, 8), ((2, 16, 112, 112), 2, False, torch.float32, 8)]
)
GPU_RANDOM_CASES = [(shape, 2, cl, dtype, 8) for shape in (_A, _B, _C)
                    for dtype in (torch.float32, torch.bfloat16) for cl in (False, True)]


def check_nearest_exact(device, cases):
    from division.triton_codec import TritonDivisionCodec
    for i, (shape, bits, cl, dtype, block) in enumerate(cases):
        x = exact_input(shape, dtype, cl, seed=i, device=device)
        ref = DivisionCodec(block_size=block, bits=bits, rounding="nearest")
        fast = TritonDivisionCodec(block_size=block, bits=bits, rounding="nearest")
        plan = _assert_fast(fast, x)
        pf, pr = fast.encode(x), ref.encode(x)
        label = f"{shape} bits={bits} cl={cl} {dtype} B={block}"
        assert set(pf.tensors) == set(pr.tensors) == {"lfc", "codes", "mn", "step"}, label
        meta = dict(pf.meta)
        # channels_last maps whose planes are whole bytes: the same bytes, stored in NHWC order
        assert meta.pop("codes_order", "nchw") == ("nhwc" if plan.codes_cl else "nchw"), label
        whole_bytes = (shape[2] * shape[3] * bits) % 8 == 0
        # channels_last maps of a few channels (narrow pixels) are coded as their NCHW copy
        narrow = shape[1] * x.element_size() < _tuning("narrow_pixel_bytes")
        assert plan.channels_last == (cl and not narrow), label
        assert plan.codes_cl == (plan.channels_last and whole_bytes and _tuning("codes_nhwc")), label
        bad = {}
        for k in pr.tensors:
            a, b = pf.tensors[k], pr.tensors[k]
            if k == "codes":
                a = codes_in_nchw_order(a, pf.meta)
            assert a.dtype == b.dtype and a.shape == b.shape, (label, k)
            if not torch.equal(a, b):
                where = (a != b).nonzero()[:4].tolist()
                bad[k] = (int((a != b).sum()), where)
        assert not bad, (label, "differing elements (count, first indices):", bad)
        assert meta == pr.meta, label
        assert pf.nbytes == fast.closed_form_nbytes(x.shape, x.dtype), label
        # the LFC is kept in the input's memory format (channels_last kernels read a block's G
        # channels as neighbours); the fused decode takes an LFC in the other format too
        fmt, other = (torch.channels_last, torch.contiguous_format) if plan.channels_last \
            else (torch.contiguous_format, torch.channels_last)
        assert pf.tensors["lfc"].is_contiguous(memory_format=fmt), label
        moved = Packed(pf.codec, dict(pf.tensors, lfc=pf.tensors["lfc"].contiguous(memory_format=other)),
                       pf.meta)
        # decode: the fused decode of either Packed equals the reference decode
        want = ref.decode(pr)
        for got in (fast.decode(pf), fast.decode(pr), fast.decode(moved), ref.decode(pf)):
            _assert_format(got, x)
            tol = 0.0 if dtype == torch.float32 else 1e-2
            assert torch.allclose(got.float(), want.float(), rtol=tol, atol=1e-6), label


def check_random_close(device, cases):
    from division.triton_codec import TritonDivisionCodec
    for i, (shape, bits, cl, dtype, block) in enumerate(cases):
        x = random_input(shape, dtype, cl, seed=100 + i, device=device)
        ref = DivisionCodec(block_size=block, bits=bits, rounding="nearest")
        fast = TritonDivisionCodec(block_size=block, bits=bits, rounding="nearest")
        _assert_fast(fast, x)
        pf, pr = fast.encode(x), ref.encode(x)
        label = f"{shape} bits={bits} cl={cl} {dtype}"
        for k in ("lfc", "mn", "step"):
            a, b = pf.tensors[k].float(), pr.tensors[k].float()
            assert torch.allclose(a, b, rtol=BF16_ULP, atol=1e-30), (label, k)
        ca, cb = _codes(pf), _codes(pr)
        diff = (ca - cb).abs()
        assert diff.max().item() <= 1, label
        assert diff.float().mean().item() <= 1e-3, (label, diff.float().mean().item())
        # the nearest-rounding error bound of the reference holds for the fast path
        xh = fast.decode(pf)
        _assert_format(xh, x)
        step = pf.tensors["step"].float()[:, :, None, None]
        err = (xh.float() - x.float()).abs()
        slack = 1e-5 * x.float().abs().amax() if dtype == torch.float32 else \
            2.0 ** -7 * x.float().abs().amax()
        assert (err <= step / 2 + slack).all(), label


def _frac_check(x, packed):
    """Stochastic rounding: P(round up) equals the fractional part of v = (hfc - mn) / step."""
    t = packed.tensors
    g = packed.meta["geometry"]
    hfc = x.float() - upsample(t["lfc"], g.kh, g.kw, g.h, g.w)
    mn = t["mn"].float()[:, :, None, None]
    step = t["step"].float()[:, :, None, None]
    v = (hfc - mn) / step
    codes = _codes(packed).view(v.shape).float()
    fl = v.floor()
    up = codes - fl
    assert ((up == 0) | (up == 1) | ((fl < 0) & (codes == 0)) | (codes == 2 ** packed.meta["bits"] - 1)).all()
    frac = (v - fl).flatten()
    up = up.flatten().clamp(0, 1)
    n = frac.numel()
    assert abs(up.mean().item() - frac.mean().item()) < 5 * 0.5 / n ** 0.5
    for lo in (0.0, 0.25, 0.5, 0.75):
        sel = (frac >= lo) & (frac < lo + 0.25)
        if sel.sum() > 200:
            k = sel.sum().item()
            assert abs(up[sel].mean().item() - frac[sel].mean().item()) < 5 * 0.5 / k ** 0.5, lo


def check_stochastic(device, shape=(2, 4, 16, 16), draws=64, small=(1, 2, 8, 8)):
    from division.triton_codec import TritonDivisionCodec
    x = random_input(shape, torch.float32, seed=7, device=device)
    fast = TritonDivisionCodec(bits=2, generator=torch.Generator().manual_seed(1))
    _assert_fast(fast, x)
    p = fast.encode(x)
    ref_p = DivisionCodec(bits=2, rounding="nearest").encode(x)
    for k in ("lfc", "mn", "step"):  # the stats do not depend on the rounding mode
        assert torch.allclose(p.tensors[k].float(), ref_p.tensors[k].float(), rtol=BF16_ULP, atol=1e-30), k
    xh = fast.decode(p)
    step = p.tensors["step"].float()[:, :, None, None]
    err = xh - x
    assert (err.abs() < step + 1e-5).all(), "stochastic error must stay below one step"
    rel = (err / step).flatten()
    assert abs(rel.mean().item()) < 5 * 0.5 / rel.numel() ** 0.5, "biased rounding"
    _frac_check(x, p)
    pcl = fast.encode(x.contiguous(memory_format=torch.channels_last))
    _frac_check(x, pcl)
    # unbiased per element: average of many independent draws (copies of one map along the batch
    # draw independent numbers: the counter is the element's index)
    xs = random_input(small, torch.float32, seed=8, device=device)
    xr = xs.repeat(draws, 1, 1, 1)
    pr = fast.encode(xr)
    xh = fast.decode(pr).view(draws, *small)
    st = pr.tensors["step"].float()[: small[0], :, None, None]
    mean_err = (xh.mean(0) - xs) / st
    assert mean_err.abs().max().item() < 5 * 0.5 / draws ** 0.5, mean_err.abs().max().item()
    # reproducible from the codec generator; another seed gives other codes
    a = TritonDivisionCodec(generator=torch.Generator().manual_seed(5)).encode(x)
    b = TritonDivisionCodec(generator=torch.Generator().manual_seed(5)).encode(x)
    c = TritonDivisionCodec(generator=torch.Generator().manual_seed(6)).encode(x)
    assert torch.equal(a.tensors["codes"], b.tensors["codes"])
    assert not torch.equal(a.tensors["codes"], c.tensors["codes"])
    # generator=None: reproducible from torch.manual_seed
    torch.manual_seed(11)
    d = TritonDivisionCodec().encode(x)
    torch.manual_seed(11)
    e = TritonDivisionCodec().encode(x)
    assert torch.equal(d.tensors["codes"], e.tensors["codes"])
    # draws follow the NCHW position: a channels_last input (another kernel structure) gets the
    # codes of its contiguous copy under the same seed, for both random-number generators
    # (14x14 maps: rows are not whole bytes, planes are; their NHWC codes cross rows)
    from division.triton_codec import RNG_PHILOX
    for rng, hw in ((None, 16), (RNG_PHILOX, 16), (None, 14)):
        xs = random_input((2, 4, hw, hw), torch.float32, seed=9, device=device)
        codec = TritonDivisionCodec(rng=rng)
        xcl = xs.contiguous(memory_format=torch.channels_last)
        plan_cl = codec.plan_for(xcl.shape, xcl.dtype, True, xcl.device)
        plan = codec.plan_for(xs.shape, xs.dtype, False, xs.device)
        assert plan_cl.mode != plan.mode and plan_cl.codes_cl
        meta = {"codes_order": "nhwc" if plan_cl.codes_cl else "nchw", "bits": 2,
                "geometry": codec.geometry(xs.shape, xs.dtype)}
        assert torch.equal(codes_in_nchw_order(codec._encode_kernel(xcl, plan_cl, seed=99)["codes"], meta),
                           codec._encode_kernel(xs, plan, seed=99)["codes"]), (rng, hw)
    # the Philox variant, and the ratio computed as a correctly rounded quotient instead of one
    # fma, obey the same laws
    from division import triton_codec as tc
    saved = tc.TUNING["fma_quantize"]
    try:
        for rng, fma in ((RNG_PHILOX, True), (None, False)):
            tc.TUNING["fma_quantize"] = fma
            ph = TritonDivisionCodec(rng=rng, generator=torch.Generator().manual_seed(2))
            assert ph.plan_for(x.shape, x.dtype, False, x.device).fma_q == fma
            pp = ph.encode(x)
            assert ((ph.decode(pp) - x).abs() < step + 1e-5).all()
            _frac_check(x, pp)
    finally:
        tc.TUNING["fma_quantize"] = saved


def check_fallbacks(device):
    """Inputs and knobs the kernels do not cover take the reference path: identical results."""
    from division.triton_codec import TritonDivisionCodec
    x4 = random_input((2, 4, 6, 6), device=device)
    cases = [
        (dict(), random_input((2, 9, 5), device=device)),                        # 3-D (a transpose)
        (dict(), random_input((2, 3, 2, 4, 4), device=device).transpose(1, 2)),  # 5-D, not contiguous
        (dict(), random_input((2, 4, 6, 6), device=device).double()),            # fp64
        (dict(), x4.transpose(2, 3)),                                             # odd strides
        (dict(), random_input((2, 4, 1, 1), device=device)),                     # 1x1 maps
        (dict(bits=1), random_input((2, 4, 2, 2), device=device)),               # 4 < 8 codes/byte
        (dict(block_size=6), random_input((1, 2, 14, 14), device=device)),       # kh=6, 3 blocks
        (dict(keep_lfc=False), x4),
        (dict(keep_hfc=False), x4),
        (dict(simulate=True), x4),
    ]
    for knobs, x in cases:
        fast = TritonDivisionCodec(rounding="nearest", **knobs)
        ref = DivisionCodec(rounding="nearest", **knobs)
        pf, pr = fast.encode(x), ref.encode(x)
        assert set(pf.tensors) == set(pr.tensors), knobs
        for k in pr.tensors:
            assert torch.equal(pf.tensors[k], pr.tensors[k]), (knobs, tuple(x.shape), k)
        assert torch.equal(fast.decode(pf), ref.decode(pr)), (knobs, tuple(x.shape))
    # A Packed written with another block size or bits than the decoding codec's: the codec's own
    # plan does not fit it, so the reference must read it (the kernel would read out of bounds).
    x = random_input((2, 4, 16, 16), device=device)
    fast = TritonDivisionCodec(block_size=4, bits=2, rounding="nearest")
    _assert_fast(fast, x)
    for knobs in (dict(block_size=8), dict(block_size=4, bits=4)):
        ref = DivisionCodec(rounding="nearest", **knobs)
        pr = ref.encode(x)
        assert torch.equal(fast.decode(pr), ref.decode(pr)), knobs


def check_feature_and_volume_views(device):
    """(N, F) features and contiguous volumes are reshapes of their canonical maps: the kernels
    code them, byte for byte as the reference, and decode to the input's shape."""
    from division.triton_codec import TritonDivisionCodec
    for shape, dtype in (((3, 20), torch.float32), ((4, 96), torch.bfloat16), ((2, 3, 2, 4, 4), torch.float32)):
        x = random_input(shape, device=device).to(dtype)
        fast = TritonDivisionCodec(rounding="nearest")
        ref = DivisionCodec(rounding="nearest")
        geom = fast.geometry(x.shape, x.dtype)
        assert fast.plan_for((geom.n, geom.c, geom.h, geom.w), x.dtype, False, x.device) is not None, shape
        pf, pr = fast.encode(x), ref.encode(x)
        assert pf.meta["layout"] == pr.meta["layout"] != "maps"
        for k in pr.tensors:
            assert torch.equal(pf.tensors[k], pr.tensors[k]), (shape, k)
        out = fast.decode(pf)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.equal(out, ref.decode(pr)), shape


def check_sample_strided_grids(device, cases=((3, 4, 16, torch.float32), (2, 8, 32, torch.bfloat16))):
    """A ViT's token grid behind its class token, (N, 1 + k * k, C) tokens viewed as (N, C, k, k)
    maps whose samples lie 1 + k * k tokens apart: encoded where it lies, the codes are the dense
    copy's byte for byte (nearest rounding); ``decode_into`` writes that decode into such a view
    and nothing else (the class token's slot stays untouched), and refuses a Packed whose decode
    takes a ReLU mask's zeros; the compiled path's fused ops refuse such maps (its layers make them
    dense); ``LayoutCodec`` (``cls_grid``) gives the reference codec's decode; stochastic codes of
    the strided view decode within one step."""
    from division.layouts import CLS_GRID, GRID, LayoutCodec, as_maps
    from division.triton_codec import TritonDivisionCodec, sample_strided
    for n, k, c, dtype in cases:
        tokens = exact_input((n, 1 + k * k, c), dtype, device=device)
        maps = as_maps(tokens[:, 1:], GRID)
        assert sample_strided(maps) and not sample_strided(maps.contiguous(memory_format=torch.channels_last))
        fast = TritonDivisionCodec(rounding="nearest")
        assert fast.takes_sample_strided(maps)
        strided, dense = fast.encode(maps), fast.encode(maps.contiguous(memory_format=torch.channels_last))
        assert strided.meta["memory_format"] == dense.meta["memory_format"] == "channels_last"
        for key in dense.tensors:
            assert torch.equal(strided.tensors[key], dense.tensors[key]), (n, k, c, key)
        into = torch.full_like(tokens, float("nan"))
        from division.exact import RELU_MASK
        assert not fast.decode_into(type(strided)(fast, strided.tensors, {**strided.meta, RELU_MASK: None}),
                                    as_maps(into[:, 1:], GRID))  # a mask's zeros: decode() applies them
        assert torch.isnan(into).all()
        assert fast.decode_into(strided, as_maps(into[:, 1:], GRID))
        assert torch.isnan(into[:, 0]).all()
        assert torch.equal(as_maps(into[:, 1:], GRID), fast.decode(dense))
        # the compiled path's fused ops take dense maps only (its layers make the grid dense)
        from division import compiled_ops
        dense_maps = maps.contiguous(memory_format=torch.channels_last)
        assert compiled_ops.applies(dense_maps, 8, 2, False) and not compiled_ops.applies(maps, 8, 2, False)
        ref_codec = LayoutCodec(DivisionCodec(rounding="nearest"), CLS_GRID)
        fast_codec = LayoutCodec(fast, CLS_GRID)
        assert torch.equal(fast_codec.decode(fast_codec.encode(tokens)), ref_codec.decode(ref_codec.encode(tokens)))
        noisy = random_input((n, 1 + k * k, c), dtype, device=device)
        rounded = TritonDivisionCodec(generator=torch.Generator(device=device).manual_seed(1))
        packed = rounded.encode(as_maps(noisy[:, 1:], GRID))
        step = packed.tensors["step"].float()[:, :, None, None]
        err = (rounded.decode(packed).float() - as_maps(noisy[:, 1:], GRID).float()).abs()
        assert (err <= step * 1.001 + 1e-2 * (dtype != torch.float32)).all(), (n, k, c)


def check_int64_path(device, shape=(2, 8, 7, 7)):
    """The 64-bit index variant (used from 2^31 elements on) computes the same bytes."""
    from division import triton_codec as tc
    old = tc.TUNING["force_int64"]
    tc.TUNING["force_int64"] = True
    try:
        check_nearest_exact(device, [(shape, 2, False, torch.float32, 8),
                                     ((1, 4, 16, 16), 2, True, torch.bfloat16, 8)])
        x = random_input(shape, device=device)
        c = tc.TritonDivisionCodec(generator=torch.Generator().manual_seed(3))
        p = c.encode(x)
        assert ((c.decode(p) - x).abs() < p.tensors["step"].float()[:, :, None, None] + 1e-5).all()
    finally:
        tc.TUNING["force_int64"] = old


def check_tilings(device):
    """Other tilings of the same work (tiny tiles: many block-column chunks; flat pass 2 where rows
    are byte-aligned; forced group sizes) store the same bytes."""
    from division import triton_codec as tc
    row_case = ((1, 4, 12, 20), 2, True, torch.bfloat16, 4)      # byte-aligned rows, partial blocks
    flat_case = ((1, 8, 7, 7), 2, False, torch.float32, 8)       # misaligned planes
    old = dict(tc.TUNING)
    try:
        for tun, cases in (({"max_tile": 64}, [row_case, flat_case]),
                           ({"force_flat": True}, [row_case]),
                           ({"g": 2, "max_tile": 256}, [row_case]),
                           ({"max_tile": 128}, [((1, 4, 14, 14), 2, True, torch.float16, 8)]),
                           ({"encode_mode": 0, "decode_row": True}, [row_case, flat_case]),
                           ({"encode_mode": 0, "max_tile": 64}, [row_case]),
                           ({"max_row_tile": 16}, [row_case, ((1, 4, 9, 12), 1, False, torch.float32, 8)]),
                           ({"enc_warps": 1, "dec_warps": 1}, [row_case, flat_case]),
                           ({"encode_mode": 1}, [row_case, ((1, 8, 7, 7), 4, True, torch.float16, 8)]),
                           ({"enc_warps": 8, "dec_warps": 8, "group_bytes": 1024}, [row_case, flat_case]),
                           ({"split_warps_per_sm": 0}, [row_case, ((2, 4, 16, 16), 2, False, torch.float32, 8)]),
                           ({"split_warps_per_sm": 1 << 20}, [row_case, flat_case]),
                           ({"codes_nhwc": False}, [row_case, ((2, 4, 16, 16), 2, True, torch.float32, 8)])):
            tc.TUNING.update(tun)
            check_nearest_exact(device, cases)
            tc.TUNING.clear()
            tc.TUNING.update(old)
    finally:
        tc.TUNING.clear()
        tc.TUNING.update(old)


def check_split_planes(device, cases=None):
    """A plane split into chunks of block rows (two kernels: each chunk's HFC range, then the
    quantization) stores the bytes of the one-kernel encode, also with stochastic rounding (the
    draws follow the byte index), and the split decode writes the same maps."""
    from division import triton_codec as tc
    cases = cases or [((2, 4, 40, 16), 2, True, torch.bfloat16, 8),    # 5 block rows
                      ((1, 4, 12, 20), 2, False, torch.float32, 4),    # 3 rows, partial blocks
                      ((2, 8, 28, 28), 4, True, torch.float16, 8)]     # partial last block row
    old = dict(tc.TUNING)
    try:
        for shape, bits, cl, dtype, block in cases:
            x = random_input(shape, dtype, cl, seed=3, device=device)
            out = {}
            for label, warps in (("fused", 0), ("split", 1 << 20)):
                tc.TUNING.update(split_warps_per_sm=warps)
                for rounding in ("nearest", "stochastic"):
                    codec = tc.TritonDivisionCodec(block_size=block, bits=bits, rounding=rounding)
                    plan = _assert_fast(codec, x)
                    assert plan.encode_phases == ((0,) if label == "fused" else (1, 2)), (shape, label)
                    assert (plan.dec_hbs == plan.hb) == (label == "fused"), (shape, label)
                    t = codec._encode_kernel(x, plan, seed=12345)
                    out[label, rounding] = (t, codec._decode_kernel(t, dtype, plan))
            for rounding in ("nearest", "stochastic"):
                (tf, xf), (ts, xs) = out["fused", rounding], out["split", rounding]
                for k in tf:
                    assert torch.equal(tf[k], ts[k]), (shape, rounding, k)
                assert torch.equal(xf, xs) and xs.stride() == xf.stride(), (shape, rounding)
    finally:
        tc.TUNING.clear()
        tc.TUNING.update(old)


def _exact_reference(fn):
    """``fn()`` with division/exact.py's PyTorch path, the Triton kernels switched off."""
    from division import exact
    saved, exact._FAST = exact._FAST, False
    try:
        return fn()
    finally:
        exact._FAST = saved


def check_masks(device, shapes=((2, 3, 5, 7), (4, 8, 6, 6), (3, 13), (1,), (0, 4), (2, 64, 8, 8))):
    """The fused mask kernels store the reference's bits and decode to the reference's tensors.

    Odd element counts (a partial last byte), channels_last, every float dtype, bool masks and
    dropout's scale; each codec is run through the kernels and again through the PyTorch path.
    """
    from division.exact import BoolMaskCodec, DropoutMaskCodec, ReluMaskCodec
    from division.triton_masks import applies
    reference = _exact_reference

    g = torch.Generator().manual_seed(0)
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            base = torch.randn(shape, generator=g).to(dtype)
            base[base.abs() < 0.3] = 0  # exact zeros: > 0 and != 0 differ on them
            layouts = [base, base.contiguous(memory_format=torch.channels_last)] if base.dim() == 4 else [base]
            for x in layouts:
                x = x.to(device)
                noise = (x != 0).to(dtype) * 2.0
                for codec, t in ((ReluMaskCodec(), x), (DropoutMaskCodec(), noise), (BoolMaskCodec(), x > 0)):
                    assert applies(t), (shape, t.stride())
                    fast = codec.encode(t)
                    ref = reference(lambda: codec.encode(t))
                    assert torch.equal(fast.tensors["bits"], ref.tensors["bits"]), (codec.name, shape, dtype)
                    out, out_ref = codec.decode(fast), reference(lambda: codec.decode(ref))
                    assert out.dtype == out_ref.dtype and out.shape == t.shape
                    assert out.stride() == out_ref.stride() == t.stride() or t.numel() == 0, (codec.name, shape)
                    assert torch.equal(out, out_ref), (codec.name, shape, dtype)
                    expected = {"relu_mask": (t > 0).to(dtype), "dropout_mask": t, "bool_mask": t}[codec.name]
                    assert torch.equal(out, expected), (codec.name, shape, dtype)


def check_direct_launch(device):
    """A compiled kernel launched directly writes what the normal launch writes (fast path of repeat calls)."""
    from division.triton_codec import TritonDivisionCodec
    codec = TritonDivisionCodec(rounding="nearest")
    x = random_input((2, 16, 16, 16), device=device)
    first = codec.encode(x)      # compiles and launches normally
    again = codec.encode(x)      # launches the kept compiled kernel (on a GPU)
    for k in first.tensors:
        assert torch.equal(first.tensors[k], again.tensors[k]), k
    assert torch.equal(codec.decode(first), codec.decode(again))


def check_maxpool_offsets(device):
    """The offset kernels store the reference's uint8 window offsets and rebuild the exact int64
    indices, for R50's 3x3/2 pad 1 window, 2x2/2, dilation and ragged sizes, NCHW and NHWC."""
    import torch.nn.functional as F
    from division.exact import MaxPoolIndexCodec
    reference = _exact_reference

    g = torch.Generator().manual_seed(0)
    for shape, kernel, stride, padding, dilation in (((2, 3, 12, 12), 3, 2, 1, 1), ((2, 5, 9, 7), 2, 2, 0, 1),
                                                      ((1, 4, 11, 13), 3, 1, 1, 2), ((2, 8, 16, 16), 2, 2, 0, 1)):
        x = torch.randn(shape, generator=g).to(device)
        for cl in (False, True):
            xin = x.contiguous(memory_format=torch.channels_last) if cl else x
            _, idx = F.max_pool2d(xin, kernel, stride, padding, dilation, return_indices=True)
            codec = MaxPoolIndexCodec(kernel, stride, padding, dilation, shape[-1])
            fast, ref = codec.encode(idx), reference(lambda: codec.encode(idx))
            assert torch.equal(fast.tensors["offset"], ref.tensors["offset"]), (shape, cl)
            assert fast.tensors["offset"].stride() == idx.stride() or idx.numel() <= 1
            out = codec.decode(fast)
            assert torch.equal(out, idx), (shape, cl)
            assert out.stride() == idx.stride()


def check_seed_counter(device):
    """An encode that reads its seed from a device counter (as captured in a CUDA graph) draws what
    an ordinary encode draws with the documented mix of counter and seed; new counter, new draws."""
    from division.triton_codec import TritonDivisionCodec
    codec = TritonDivisionCodec()
    x = random_input((2, 16, 16, 16), device=device)
    plan = codec.plan_for(x.shape, x.dtype, False, x.device)
    seed = 12345
    for count in (1, 7, 2 ** 31 - 5):
        counter = torch.tensor(count, dtype=torch.int32, device=device)
        mixed = (count * 0x85EBCA6B + seed) % 2 ** 31
        from_counter = codec._encode_kernel(x, plan, seed=seed, counter=counter)
        plain = codec._encode_kernel(x, plan, seed=mixed)
        assert torch.equal(from_counter["codes"], plain["codes"]), count
        assert int(counter) == count  # the kernel reads the counter, never writes it
    one = codec._encode_kernel(x, plan, seed=seed, counter=torch.tensor(1, dtype=torch.int32, device=device))
    two = codec._encode_kernel(x, plan, seed=seed, counter=torch.tensor(2, dtype=torch.int32, device=device))
    assert not torch.equal(one["codes"], two["codes"])
    # Replays of one captured encode: same host seed, counter advanced by the encodes of a step
    # between them. Each element rounds up with the probability of its fractional part on average
    # over the replays (unbiased per element, not only over the tensor), and one replay's
    # decisions are uncorrelated with the next one's.
    x = random_input((1, 4, 16, 16), device=device)
    plan = codec.plan_for(x.shape, x.dtype, False, x.device)
    replays, encodes_per_step = 24, 107
    ups = []
    for r in range(replays):
        counter = torch.tensor(1 + r * encodes_per_step, dtype=torch.int32, device=device)
        t = codec._encode_kernel(x, plan, seed=seed, counter=counter)
        g = codec.geometry(x.shape, x.dtype)
        v = ((x.float() - upsample(t["lfc"], g.kh, g.kw, g.h, g.w)) - t["mn"].float()[:, :, None, None]) \
            / t["step"].float()[:, :, None, None]
        codes = unpack_bits(t["codes"], codec.bits, g.numel).view(v.shape).float()
        ups.append((codes - v.floor()).clamp(0, 1).flatten())
    ups = torch.stack(ups)                                   # [replays, elements]
    frac = (v - v.floor()).flatten()
    interior = (v.flatten() > 0) & (v.flatten() < 2 ** codec.bits - 1)
    dev = ups[:, interior] - frac[interior]
    assert dev.mean(0).abs().max().item() < 5 * 0.5 / replays ** 0.5
    assert abs(dev.mean().item()) < 5 * 0.5 / dev.numel() ** 0.5
    z = dev / dev.std()
    corr = (z[1:] * z[:-1]).mean().item()
    assert abs(corr) < 5 / (z[1:].numel()) ** 0.5, corr


def check_data_rng(device, shape=(2, 4, 16, 16), draws=64, small=(1, 2, 8, 8)):
    """The compiled graph's encode (division.compiled_ops: RNG_DATA, draws keyed by the values
    rounded, no host seed): a pure function of its input, with the laws of stochastic rounding
    (below one step, P(round up) = the fraction, unbiased per element over independent draws),
    decoded by the eager codec too; NCHW, channels_last, and 7x7 maps (pass 2 in flat order)."""
    from division import compiled_ops
    for shp, cl in ((shape, False), (shape, True), ((2, 8, 7, 7), False)):
        x = random_input(shp, torch.float32, channels_last=cl, seed=7, device=device)
        t = compiled_ops.fused_encode(x, 8, 2, True)
        again = compiled_ops.fused_encode(x.clone(), 8, 2, True)
        assert all(torch.equal(a, b) for a, b in zip(t, again)), "the encode must be a function of x"
        other = compiled_ops.fused_encode(x * (1 + 2 ** -20), 8, 2, True)
        assert not torch.equal(t[1], other[1]), "other values must draw other numbers"
        codec, plan, _ = compiled_ops._plan(x, 8, 2, True)
        packed = codec.packed(x, plan, dict(zip(("lfc", "codes", "mn", "step"), t)))
        _frac_check(x, packed)
        xh = compiled_ops.fused_decode(*t, list(x.shape), x.dtype, cl, 8, 2)
        assert torch.equal(xh, codec.decode(packed))
        assert xh.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        assert ((xh - x).abs() < t[3].float()[:, :, None, None] + 1e-5).all()
    # copies of one map along the batch draw independently (the byte index is hashed too)
    xs = random_input(small, torch.float32, seed=8, device=device)
    t = compiled_ops.fused_encode(xs.repeat(draws, 1, 1, 1), 8, 2, True)
    xh = compiled_ops.fused_decode(*t, [draws * small[0], *small[1:]], xs.dtype, False, 8, 2)
    mean_err = (xh.view(draws, *small).mean(0) - xs) / t[3].float()[: small[0], :, None, None]
    assert mean_err.abs().max().item() < 5 * 0.5 / draws ** 0.5, mean_err.abs().max().item()


# (shape, channels_last, dtype): NHWC programs of 8 to 64 channels read a word of mask bits per
# pixel (mode 2); NCHW maps, and NHWC programs of fewer channels, a byte per element (mode 1)
RELU_ZERO_CASES = [((2, 64, 16, 16), True, torch.bfloat16), ((2, 128, 8, 8), True, torch.float32),
                   ((2, 64, 7, 7), True, torch.float16), ((2, 4, 14, 14), True, torch.float32),
                   ((2, 8, 16, 16), False, torch.bfloat16), ((3, 4, 9, 7), False, torch.float32),
                   ((2, 3, 16, 16), True, torch.bfloat16)]  # narrow: decoded as NCHW, mask applied after


def check_relu_zeros(device, cases=RELU_ZERO_CASES):
    """A decode linked to the ReLU mask of its input: the fused decode writes the reference's
    values (``exact.apply_relu_mask`` on the reference decode), so exactly the ReLU's zeros, and
    leaves its output with the mask for the ReLU's backward (the reader counting is the
    reference's, tested in test_exact_codecs)."""
    from division.exact import RELU_MASK, ReluMaskCodec, shared_decode
    from division.triton_codec import TritonDivisionCodec, _mask_argument
    modes = set()
    for i, (shape, cl, dtype) in enumerate(cases):
        x = exact_input(shape, dtype, cl, seed=i, device=device).relu()
        x[0, 0] = 0.0  # a whole plane of zeros: every decoded value must be 0 there
        x = x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()
        relu = ReluMaskCodec()
        fast = TritonDivisionCodec(rounding="nearest")
        ref = DivisionCodec(rounding="nearest")
        plan = _assert_fast(fast, x)
        mf, mr = relu.encode(x), relu.encode(x)
        pf, pr = fast.encode(x), ref.encode(x)
        pf.meta[RELU_MASK], pr.meta[RELU_MASK] = mf, mr
        modes.add(_mask_argument(mf.tensors["bits"], plan)[0])
        got, want = fast.decode(pf), ref.decode(pr)
        label = f"{shape} cl={cl} {dtype}"
        _assert_format(got, x)
        assert torch.equal((got > 0), (x > 0)) and torch.equal((got == 0), (x == 0)), label
        assert torch.equal(got, want), label
        # left with the mask for the ReLU's backward, which takes it
        assert shared_decode(mf) is got, label
        assert relu.decode(mf) is got and shared_decode(mf) is None, label
        assert torch.equal(relu.decode(mf), (x > 0).to(dtype)), label  # afterwards: 0 / 1 again
    assert modes == {1, 2}, modes
    # (N, F) features (a ReLU before a Linear) and volumes go through the same decode as views
    for shape in ((8, 256), (4, 3, 8, 8, 8)):
        x = exact_input(shape, device=device).relu()
        fast, ref, relu = TritonDivisionCodec(rounding="nearest"), DivisionCodec(rounding="nearest"), ReluMaskCodec()
        pf, pr = fast.encode(x), ref.encode(x)
        pf.meta[RELU_MASK], pr.meta[RELU_MASK] = relu.encode(x), relu.encode(x)
        got = fast.decode(pf)
        assert torch.equal(got == 0, x == 0) and torch.equal(got, ref.decode(pr)), shape


def check_decode_affine(device, cases=RELU_ZERO_CASES):
    """``decode_affine``: a rebuilt BatchNorm output in one kernel. Its values are the decode mapped
    per channel, ``x_hat * scale + shift`` (computed before the cast to the output's dtype, so within
    an ulp of the composed ops), and with a ReLU mask exactly that mask's zeros, the smallest normal
    number at least where it is set."""
    from division.exact import ReluMaskCodec, apply_relu_mask
    from division.triton_codec import TritonDivisionCodec, _mask_argument
    modes = set()
    for i, (shape, cl, dtype) in enumerate(cases):
        x = random_input(shape, dtype, cl, seed=20 + i, device=device)
        g = torch.Generator().manual_seed(i)
        scale = (torch.rand(shape[1], generator=g) + 0.5).to(device)
        shift = torch.randn(shape[1], generator=g).to(device)
        fast = TritonDivisionCodec(rounding="nearest")
        plan = _assert_fast(fast, x)
        packed = fast.encode(x)
        x_hat = fast.decode(packed).float()
        view = (1, -1, 1, 1)
        exact = x_hat * scale.view(view) + shift.view(view)
        ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
        bound = 2 * ulp * ((x_hat * scale.view(view)).abs() + shift.abs().view(view)) + 1e-6
        label = f"{shape} cl={cl} {dtype}"
        got = fast.decode_affine(packed, scale, shift)
        _assert_format(got, x)
        assert got.dtype == dtype and got.shape == x.shape, label
        assert ((got.float() - exact).abs() <= bound).all(), label
        y = exact.to(dtype).relu()
        y = y.contiguous(memory_format=torch.channels_last) if cl else y.contiguous()
        mask = ReluMaskCodec().encode(y)
        modes.add(_mask_argument(mask.tensors["bits"], plan)[0])
        masked = fast.decode_affine(packed, scale, shift, mask)
        assert torch.equal(masked == 0, y == 0), label
        want = apply_relu_mask(exact.to(dtype), mask).float()
        assert ((masked.float() - want).abs() <= bound).all(), label
    assert modes == {1, 2}, modes
    # a Packed the fused decode does not take (the reference codec's other byte order): None
    from division.dual_precision import DivisionCodec
    ref_packed = DivisionCodec(rounding="nearest", block_size=4).encode(random_input((2, 8, 16, 16), device=device))
    assert TritonDivisionCodec(rounding="nearest").decode_affine(ref_packed, torch.ones(8), torch.zeros(8)) is None


# (shape, dtype, block size, split planes, tuning): channels_last maps whose NHWC programs have
# 8 to 64 channels, one G-bit mask word per pixel
MASK_IN_ENCODE_CASES = [((2, 64, 16, 16), torch.bfloat16, 8, False, {}),
                        ((2, 128, 8, 8), torch.float32, 8, False, {}),
                        ((2, 64, 7, 7), torch.float16, 8, False, {}),              # partial blocks
                        ((2, 16, 12, 20), torch.float32, 4, False, {}),
                        ((2, 32, 8, 8), torch.float32, 8, False, {"g": 8, "cl_min_bytes": 0}),
                        ((2, 128, 8, 8), torch.bfloat16, 8, False, {"g": 64}),
                        ((2, 32, 40, 16), torch.bfloat16, 8, True, {})]            # phase 1 writes it


def check_relu_mask_in_encode(device, cases=MASK_IN_ENCODE_CASES):
    """An encode asked for its input's ReLU mask writes every byte of the exact mask (the bits
    division/exact.py's PyTorch path packs) and stores the codes it stores without; inputs it
    cannot do this for say so."""
    from division import triton_codec as tc
    from division.exact import ReluMaskCodec
    from division.packing import packed_nbytes
    old = dict(tc.TUNING)
    try:
        for i, (shape, dtype, block, split, tuning) in enumerate(cases):
            tc.TUNING.update(split_warps_per_sm=1 << 20 if split else 0, **tuning)
            x = random_input(shape, dtype, True, seed=i, device=device)
            x[x.abs() < 0.5] = 0.0
            codec = tc.TritonDivisionCodec(block_size=block, rounding="nearest")
            plan = _assert_fast(codec, x)
            assert codec.packs_relu_mask(x) and plan.encode_phases == ((1, 2) if split else (0,)), shape
            assert plan.g == tuning.get("g", plan.g), (shape, plan.g)
            bits = torch.full((packed_nbytes(x.numel(), 1),), 0x5A, dtype=torch.uint8, device=device)
            fused, plain = codec.encode(x, relu_mask=bits), codec.encode(x)
            assert torch.equal(bits, _exact_reference(lambda: ReluMaskCodec().encode(x).tensors["bits"])), shape
            for k in plain.tensors:
                assert torch.equal(fused.tensors[k], plain.tensors[k]), (shape, k)
            tc.TUNING.clear()
            tc.TUNING.update(old)
        codec = tc.TritonDivisionCodec()
        for x in (random_input((2, 64, 8, 8), device=device),                               # NCHW
                  random_input((2, 3, 16, 16), torch.bfloat16, True, device=device)):        # narrow
            assert not codec.packs_relu_mask(x)
            with pytest.raises(ValueError, match="cannot pack a ReLU mask"):
                codec.encode(x, relu_mask=torch.empty(x.numel() // 8, dtype=torch.uint8, device=device))
    finally:
        tc.TUNING.clear()
        tc.TUNING.update(old)


def check_relu_masks_from_encodes_in_training(device):
    """In a model, the ReLU outputs a convolution reads get their masks from that convolution's
    encode, the others from the mask's own pack, and the gradients are those without fusing."""
    from torch import nn
    from division.compressor import compress_activations
    from division.exact import ReluMaskCodec
    from division.triton_codec import TritonDivisionCodec
    fills = []
    real_fill = ReluMaskCodec.fill
    ReluMaskCodec.fill = lambda self, packed, x: fills.append(tuple(x.shape)) or real_fill(self, packed, x)
    try:
        x = random_input((4, 3, 16, 16), channels_last=True, device=device)
        grads = {}
        for fuse in (False, True):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 4))
            model = model.to(device).to(memory_format=torch.channels_last)
            compressor = compress_activations(model, TritonDivisionCodec(rounding="nearest"), min_numel=1)
            compressor._fuse_masks = fuse
            fills.clear()
            model(x).square().sum().backward()
            grads[fuse] = [p.grad for p in model.parameters()]
            # fused: only the last ReLU's mask (read by the pool, not by a convolution) packs itself
            assert fills == ([(4, 32, 16, 16)] if fuse else []), fills
        for a, b in zip(grads[False], grads[True]):
            assert torch.equal(a, b)
    finally:
        ReluMaskCodec.fill = real_fill


# (shape, dtype, block size): channels_last maps with whole-byte planes (NHWC-ordered codes)
NORM_CASES = [((2, 32, 16, 16), torch.float32, 8), ((3, 16, 12, 20), torch.float32, 4),
              ((2, 64, 14, 14), torch.float32, 8)]


def check_norm_from_codes(device, cases=NORM_CASES):
    """A BatchNorm's backward computed from its input's codes equals PyTorch's backward on the
    decoded input (up to the order of the sums), and in a model the BatchNorms run from codes
    give the gradients of the decoding path."""
    from division.triton_codec import TritonDivisionCodec
    from division.triton_norm import batch_norm_backward
    for i, (shape, dtype, block) in enumerate(cases):
        x = random_input(shape, dtype, True, seed=i, device=device)
        dy = random_input(shape, dtype, True, seed=100 + i, device=device)
        c = shape[1]
        weight = torch.rand(c, device=device) + 0.5
        bias = torch.randn(c, device=device)
        _, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.1, 1e-5)
        codec = TritonDivisionCodec(block_size=block, rounding="nearest")
        plan = codec.norm_plan(x)
        assert plan is not None, shape
        packed = codec.encode(x)
        want = torch.ops.aten.native_batch_norm_backward(dy, codec.decode(packed), weight, None, None, mean,
                                                         invstd, True, 1e-5, [True, True, True])
        got = batch_norm_backward(dy, packed.tensors, plan, weight, mean, invstd)
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        tol = 1e-4 if dtype == torch.float32 else 1e-2  # dx rounded to 16 bits: an ulp apart at most
        for name, a, b in zip(("dx", "dw", "db"), got, want):
            assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item()), (shape, name)
    assert TritonDivisionCodec().norm_plan(random_input((2, 16, 7, 7), channels_last=True, device=device)) is None
    assert TritonDivisionCodec().norm_plan(random_input((2, 16, 8, 8), device=device)) is None  # NCHW
    _check_norm_from_codes_in_a_model(device)


# (shape, dtype, block size, split planes): whole blocks, partial blocks, a flat pass 2 (14x14)
NORM_FORWARD_CASES = [((2, 32, 16, 16), torch.float32, 8, False), ((3, 16, 12, 20), torch.float32, 4, True),
                      ((2, 64, 14, 14), torch.bfloat16, 8, False), ((2, 16, 24, 16), torch.float16, 8, True)]


def check_norm_forward(device, cases=NORM_FORWARD_CASES):
    """The BatchNorm forward fused into the encode gives PyTorch's output, batch statistics and
    running statistics (to fp32 rounding; y within an ulp of its dtype), and the encode's bytes
    bit for bit (same seed), with and without weight, bias and running statistics."""
    from division import triton_codec as tc
    from division.triton_norm import applies, batch_norm_forward, forward_applies
    old = dict(tc.TUNING)
    try:
        for i, (shape, dtype, block, split) in enumerate(cases):
            tc.TUNING.update(split_warps_per_sm=1 << 20 if split else 0)
            c = shape[1]
            # a large mean next to a small spread: a sum of squares would lose the variance
            x = (random_input(shape, torch.float32, True, seed=i, device=device) * 0.1 + 30).to(dtype)
            for affine, running in ((True, True), (False, False), (True, False)):
                weight = torch.rand(c, device=device) + 0.5 if affine else None
                bias = torch.randn(c, device=device) if affine else None
                rm = torch.randn(c, device=device) if running else None
                rv = torch.rand(c, device=device) + 0.5 if running else None
                rm2, rv2 = (rm.double(), rv.double()) if running else (None, None)
                codec = tc.TritonDivisionCodec(block_size=block)
                plan = codec.norm_plan(x)
                assert applies(plan) and forward_applies(plan) and (plan.enc_split > 1) == split, (shape, plan.enc_split)
                seed = 4321
                real_seed, codec.draw_seed = codec.draw_seed, lambda: seed
                y, mean, invstd, packed = batch_norm_forward(codec, x, plan, weight, bias, rm, rv, 0.1, 1e-5)
                want = codec._encode_kernel(x, plan, seed=seed)
                codec.draw_seed = real_seed
                for k, v in want.items():
                    assert torch.equal(packed.tensors[k], v), (shape, k)
                assert codec.decode(packed).shape == x.shape
                # In float64: PyTorch's CPU kernel keeps 16-bit statistics for 16-bit inputs (CUDA's fp32),
                # and in fp32 its sums of 30 + 0.1 x run in an order that depends on the thread count.
                f64 = lambda t: None if t is None else t.double()  # noqa: E731
                ry, rmean, rinvstd = torch.native_batch_norm(x.double(), f64(weight), f64(bias), rm2, rv2,
                                                             True, 0.1, 1e-5)
                ry = ry.to(dtype)
                assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
                assert torch.allclose(mean, rmean.float(), rtol=1e-5, atol=0), (shape, "mean")
                assert torch.allclose(invstd, rinvstd.float(), rtol=1e-4, atol=0), (shape, "invstd")
                ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10 if dtype == torch.float16 else 1e-5
                assert (y.float() - ry.float()).abs().max() <= 2 * ulp * ry.float().abs().max(), (shape, affine)
                if running:
                    assert torch.allclose(rm, rm2.float(), rtol=1e-5, atol=1e-6), (shape, "running mean")
                    assert torch.allclose(rv, rv2.float(), rtol=1e-4, atol=1e-6), (shape, "running var")
    finally:
        tc.TUNING.clear()
        tc.TUNING.update(old)


def _check_norm_from_codes_in_a_model(device):
    """Off, backward from codes only, and forward fused into the encode as well: the same
    gradients (to the order of the sums) and running statistics."""
    from torch import nn
    from division import triton_norm
    from division.methods import CodecMethod
    from division.triton_codec import TritonDivisionCodec
    x = random_input((4, 3, 16, 16), channels_last=True, device=device)
    grads, buffers, calls = {}, {}, {}
    real_forward, fused = triton_norm.batch_norm_forward, []

    def counted(*args):
        fused.append(args[1].shape)
        return real_forward(*args)
    old_flag = triton_norm.TUNING["fused_forward"]
    triton_norm.batch_norm_forward = counted
    try:
        for variant in ("off", "backward", "both"):
            triton_norm.TUNING["fused_forward"] = variant == "both"
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                                  nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32, affine=False),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 4))
            model = model.to(device).to(memory_format=torch.channels_last)
            method = CodecMethod("division", TritonDivisionCodec(rounding="nearest"),
                                 norm_from_codes=variant != "off")
            method.attach(model)
            fused.clear()
            loss = model(x).square().sum()
            loss.backward(retain_graph=True)
            grads[variant] = [p.grad.clone() for p in model.parameters()]
            buffers[variant] = [b.clone() for b in model.buffers() if b.is_floating_point()]
            model.zero_grad()
            loss.backward()  # the codes stay with a retained graph, as saved tensors do
            assert all(torch.equal(a, p.grad) for a, p in zip(grads[variant], model.parameters()))
            mode = method.compressor.norm_mode
            calls[variant] = None if mode is None else (mode.calls, len(fused))
    finally:
        triton_norm.batch_norm_forward = real_forward
        triton_norm.TUNING["fused_forward"] = old_flag
    assert calls == {"off": None, "backward": (2, 0), "both": (2, 2)}, calls
    for variant in ("backward", "both"):
        for a, b in zip(grads[variant], grads["off"]):
            # (a convolution bias's gradient is a sum of BatchNorm input gradients that nearly cancel)
            assert (a - b).abs().max() <= 1e-3 * b.abs().max() + 1e-7, variant
        for a, b in zip(buffers[variant], buffers["off"]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), variant


def check_rebuild_and_recompute_on_fused_kernels(device):
    """``rebuild_conv_input`` and ``recompute_norm_input`` on the fused kernels (channels_last, the
    fused ``norm_from_codes`` BatchNorm): the 3x3 convolution's BatchNorm runs fused and the 1x1
    convolution after it is rebuilt from its node, in one ``decode_affine`` kernel; the 1x1
    convolutions' BatchNorm inputs are recomputed (those BatchNorms run as PyTorch's). At Q = 8 the
    gradients are those of the same codec storing every input."""
    from torch import nn
    from division.ledger import RECOMPUTED, REBUILT, ByteLedger
    from division.methods import CodecMethod
    from division.triton_codec import TritonDivisionCodec

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
            self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.conv3, self.bn3 = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
            self.short, self.bn_short = nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32)
            self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            y = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
            y = self.relu3(self.bn3(self.conv3(y)) + self.bn_short(self.short(x)))
            return self.head(y.mean((2, 3)))

    x = random_input((4, 8, 16, 16), channels_last=True, device=device)
    affine_calls = []
    real = TritonDivisionCodec.decode_affine

    def counted(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        affine_calls.append(out is not None)
        return out
    TritonDivisionCodec.decode_affine = counted
    grads, ledgers = {}, {}
    try:
        for knobs in (False, True):
            torch.manual_seed(0)
            model = Block().to(device).to(memory_format=torch.channels_last)
            method = CodecMethod("division", TritonDivisionCodec(rounding="nearest", bits=8), norm_from_codes=True,
                                 rebuild_conv_input=knobs, recompute_norm_input=knobs)
            ledgers[knobs] = ByteLedger()
            method.attach(model, ledgers[knobs])
            model(x).square().sum().backward()
            grads[knobs] = torch.cat([p.grad.flatten() for p in model.parameters()])
            assert method.compressor.norm_mode.calls >= 1, knobs  # bn2 (and, without the knobs, all)
            method.detach()
    finally:
        TritonDivisionCodec.decode_affine = real
    on = ledgers[True]
    assert [e.layer for e in on.entries if e.codec == RECOMPUTED] == ["bn1", "bn3", "bn_short"]
    assert [(e.layer, e.rebuilt_from) for e in on.entries if e.codec == REBUILT] == [("conv2", "bn1"), ("conv3", "bn2")]
    assert affine_calls == [True], affine_calls  # conv3's input, from the fused bn2's codes
    cos = torch.nn.functional.cosine_similarity(grads[True].double(), grads[False].double(), dim=0).item()
    assert cos > 0.9999, cos


def check_ledger_matches_held(device, shape=(2, 3, 16, 16)):
    """The byte ledger equals the bytes the hooks actually hold, with every fused path on
    (BatchNorm forward and backward from codes, ReLU masks written by encodes), channels_last, fp32
    and bf16: each stored tensor once, by storage, parameters left out. On CUDA the allocator agrees:
    what one forward leaves allocated is those storages in the allocator's 512-byte blocks, plus the
    few blocks of the output, its float copy and the loss. (With the BatchNorm codes packed a second
    time, as they once were, the ledger counted 6,094,720 B against 4,310,912 B held on an H200, fp32,
    batch 32; the allocator held 4,328,448 B, the held storages' blocks plus 2 KiB.) On the CPU a batch
    of 2 takes every fused path a batch of 4 takes (only the last stage's channel group halves) in half
    the interpreted programs."""
    from models import build_model
    from division import ByteLedger
    from division.methods import CodecMethod
    from division.triton_codec import TritonDivisionCodec
    cuda = torch.device(device).type == "cuda"
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = build_model("resnet20", num_classes=10).to(device).to(memory_format=torch.channels_last)
        ledger = ByteLedger()
        method = CodecMethod("division", TritonDivisionCodec(), norm_from_codes=True)
        method.attach(model, ledger=ledger)
        x = random_input(shape, channels_last=True, device=device)

        def forward():
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                                enabled=dtype == torch.bfloat16):
                return model(x).float().square().sum()
        if cuda:  # kernels built, generators and gradients allocated before the step that is counted
            forward().backward()
            torch.cuda.synchronize()
        compressor = method.compressor
        held, real_pack = [], compressor._pack
        compressor._pack = lambda t: held.append(real_pack(t)) or held[-1]
        before = torch.cuda.memory_allocated(device) if cuda else 0
        loss = forward()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}
        for obj in held:
            for t in (obj.tensors.values() if isinstance(obj, Packed) else [obj]):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in params:
                    storages[ptr] = t.untyped_storage().nbytes()
        assert method.compressor.norm_mode.calls > 0  # the BatchNorms ran from codes
        assert ledger.stored_bytes == sum(storages.values()), (dtype, ledger.stored_bytes, sum(storages.values()))
        if cuda:
            torch.cuda.synchronize()
            grown = torch.cuda.memory_allocated(device) - before
            new = [n for ptr, n in storages.items() if ptr != x.untyped_storage().data_ptr()]  # x was there before
            blocks = sum(-(-n // 512) * 512 for n in new)
            assert blocks <= grown <= blocks + 8 * 512, (dtype, ledger.stored_bytes, blocks, grown)
        loss.backward()


CPU_CHECKS = {
    "ledger_matches_held": lambda: check_ledger_matches_held("cpu"),
    "relu_zeros": lambda: check_relu_zeros("cpu"),
    "decode_affine": lambda: check_decode_affine("cpu"),
    "rebuild_recompute_fused": lambda: check_rebuild_and_recompute_on_fused_kernels("cpu"),
    "relu_mask_in_encode": lambda: check_relu_mask_in_encode("cpu"),
    "norm_from_codes": lambda: check_norm_from_codes("cpu"),
    "norm_forward": lambda: check_norm_forward("cpu"),
    "relu_masks_in_training": lambda: check_relu_masks_from_encodes_in_training("cpu"),
    "masks": lambda: check_masks("cpu"),
    "seed_counter": lambda: check_seed_counter("cpu"),
    "data_rng": lambda: check_data_rng("cpu"),
    "maxpool_offsets": lambda: check_maxpool_offsets("cpu"),
    "direct_launch": lambda: check_direct_launch("cpu"),
    "tilings": lambda: check_tilings("cpu"),
    "split_planes": lambda: check_split_planes("cpu"),
    "nearest_exact": lambda: check_nearest_exact("cpu", CPU_EXACT_CASES),
    "random_close": lambda: check_random_close("cpu", [((2, 8, 20, 20), 2, False, torch.float32, 8),
                                                       ((2, 16, 7, 7), 2, True, torch.float32, 8),
                                                       ((1, 4, 33, 31), 4, False, torch.bfloat16, 8)]),
    "stochastic": lambda: check_stochastic("cpu"),
    "fallbacks": lambda: check_fallbacks("cpu"),
    "feature_views": lambda: check_feature_and_volume_views("cpu"),
    "int64_path": lambda: check_int64_path("cpu"),
    "sample_strided_grids": lambda: check_sample_strided_grids("cpu"),
}


def _interpreter_main(out_path: str) -> None:
    """Entry point of the interpreter subprocess: run every CPU check, record ok / traceback."""
    background.skip_dropped_overflow_checks()
    from division.triton_codec import interpreting
    results = {}
    if not interpreting():
        results = {name: "TRITON_INTERPRET=1 was not in effect" for name in CPU_CHECKS}
    else:
        import time
        for name, fn in CPU_CHECKS.items():
            t0 = time.perf_counter()
            try:
                fn()
                results[name] = "ok"
            except Exception:  # noqa: BLE001 - reported to the parent test
                results[name] = traceback.format_exc()
            results[name + ".seconds"] = round(time.perf_counter() - t0, 2)
    Path(out_path).write_text(json.dumps(results, indent=1))


# ======================================================================== CPU (interpreter) tests
def _interpreter_command(out_path: str) -> list[str]:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]); "
            "import test_triton_codec as T; T._interpreter_main(sys.argv[3])")
    return [sys.executable, "-c", code, str(ROOT), str(Path(__file__).parent), out_path]


BACKGROUND = {"interpreted": _interpreter_command}  # started after collection (tests/background.py)


@pytest.fixture(scope="module")
def interpreted():
    return background.result(f"{__name__}.interpreted", _interpreter_command)


@pytest.mark.parametrize("name", list(CPU_CHECKS))
def test_interpreter(interpreted, name):
    assert interpreted[name] == "ok", interpreted[name]


# ============================================================================ in-process tests
def test_cpu_tensors_take_the_reference_path():
    from division.triton_codec import TritonDivisionCodec, interpreting
    if interpreting():
        pytest.skip("this process runs the kernels through the interpreter")
    x = random_input((2, 4, 16, 16))
    for rounding in ("nearest", "stochastic"):
        fast = TritonDivisionCodec(rounding=rounding, generator=torch.Generator().manual_seed(0))
        ref = DivisionCodec(rounding=rounding, generator=torch.Generator().manual_seed(0))
        pf, pr = fast.encode(x), ref.encode(x)
        for k in pr.tensors:
            assert torch.equal(pf.tensors[k], pr.tensors[k])


def test_constructor_and_describe():
    from division.triton_codec import TritonDivisionCodec
    c = TritonDivisionCodec(block_size=4, bits=4, rounding="nearest")
    assert isinstance(c, DivisionCodec)
    assert c.describe() == {**DivisionCodec(block_size=4, bits=4, rounding="nearest").describe(),
                            "backend": "triton"}
    with pytest.raises(ValueError):
        TritonDivisionCodec(bits=3)
    with pytest.raises(ValueError):
        TritonDivisionCodec(rng=7)


def test_plans():
    from division.triton_codec import TUNING, TritonDivisionCodec, _plan
    key = tuple(sorted(TUNING.items()))
    p = _plan(256, 64, 56, 56, 8, 8, 2, 4, False, 132, key)
    assert p is not None and not p.misaligned and p.g * 56 * 56 * 4 <= max(TUNING["group_bytes"], 56 * 56 * 4)
    assert p.row and p.full_h and p.full_w and p.wbc * p.nwc >= 7 and p.mode == 1
    assert p.g * p.tkh * p.wbc * p.tkw <= (TUNING["max_tile"] or 2048)
    p = _plan(256, 64, 56, 56, 8, 8, 2, 2, True, 132, key)
    assert p is not None and p.channels_last and p.g * 2 >= 32 and p.dec_row
    assert p.mode == 0 and p.enc_warps == 1
    # NHWC: 64-byte pixel reads, codes stored in NHWC order; a grid of 512 one-warp programs is
    # split into the 7 block rows of each plane (two encode launches)
    assert p.g == 32 and p.codes_cl and p.enc_hbs == 1 and p.encode_phases == (1, 2)
    assert p.encode_grid == (256 * 64 // 32 * 7,) and p.decode_grid[0] * p.dec_warps >= 32 * 132
    q = _plan(256, 64, 56, 56, 8, 8, 2, 4, False, 132, key)   # NCHW fp32: 16k programs, one launch
    assert q.encode_phases == (0,) and q.encode_grid == (256 * 64 // q.g,) and not q.codes_cl
    p = _plan(128, 2048, 7, 7, 7, 7, 2, 4, True, 132, key)
    assert p is not None and p.misaligned and not p.row and (p.g * 49) % 4 == 0
    assert p.encode_grid[0] >= 4 * 132 and p.e * p.nk >= 49 + 3
    assert p.g * 4 >= 32                                                  # NHWC: wide pixel reads
    p = _plan(256, 1024, 14, 14, 8, 8, 2, 2, False, 132, key)
    assert p is not None and not p.row and not p.misaligned and not p.full_w
    p = _plan(128, 1024, 14, 14, 8, 8, 2, 2, True, 132, key)  # NHWC codes: planes are whole bytes
    assert p is not None and not p.row and p.codes_cl
    assert _plan(2, 3, 7, 7, 7, 7, 2, 4, False, 132, key) is None          # no aligned group of C=3
    # a channels_last image of 3 channels: its NHWC plan reads 2 bytes per pixel, so the codec
    # codes it from its NCHW copy; 64 channels read 64-byte pixels and keep the NHWC plan
    codec = TritonDivisionCodec()
    assert _plan(128, 3, 224, 224, 8, 8, 2, 2, True, 132, key).g == 1
    assert not codec.plan_for((128, 3, 224, 224), torch.bfloat16, True, "cpu").channels_last
    assert codec.plan_for((128, 64, 56, 56), torch.bfloat16, True, "cpu").channels_last
    assert _plan(2, 4, 14, 14, 6, 6, 2, 4, False, 132, key) is None        # kh=6 over 3 blocks
    assert _plan(2, 4, 1, 1, 1, 1, 2, 4, False, 132, key) is None          # 1x1: LFC only
    assert _plan(1 << 16, 512, 128, 128, 8, 8, 2, 2, False, 132, key).int64


def test_backend_auto_on_this_machine():
    from division.backends import division_codec
    codec = division_codec(backend="auto", rounding="nearest")
    from division.triton_codec import TritonDivisionCodec
    assert isinstance(codec, TritonDivisionCodec) == torch.cuda.is_available()


# =================================================================================== GPU tests
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_gpu_nearest_exact():
    check_nearest_exact("cuda", GPU_EXACT_CASES + CPU_EXACT_CASES[:4])


@pytest.mark.gpu
@needs_cuda
def test_gpu_random_close():
    check_random_close("cuda", GPU_RANDOM_CASES)


@pytest.mark.gpu
@needs_cuda
def test_gpu_tilings():
    check_tilings("cuda")


@pytest.mark.gpu
@needs_cuda
def test_gpu_split_planes():
    check_split_planes("cuda")
    check_split_planes("cuda", [((16, 64, 56, 56), 2, True, torch.bfloat16, 8),
                                ((8, 512, 28, 28), 2, True, torch.bfloat16, 8),
                                ((8, 64, 56, 56), 2, False, torch.float32, 8)])


@pytest.mark.gpu
@needs_cuda
def test_gpu_stochastic():
    check_stochastic("cuda", shape=(8, 64, 28, 28), draws=64, small=(2, 16, 14, 14))


@pytest.mark.gpu
@needs_cuda
def test_gpu_data_rng():
    check_data_rng("cuda", shape=(8, 64, 28, 28), draws=64, small=(2, 16, 14, 14))


@pytest.mark.gpu
@needs_cuda
def test_gpu_fallbacks_and_int64():
    check_fallbacks("cuda")
    check_feature_and_volume_views("cuda")
    check_sample_strided_grids("cuda", ((3, 4, 16, torch.float32), (8, 14, 768, torch.bfloat16)))
    check_int64_path("cuda", shape=(4, 64, 7, 7))


@pytest.mark.gpu
@needs_cuda
def test_gpu_masks():
    check_masks("cuda", shapes=((2, 3, 5, 7), (32, 64, 56, 56), (7, 13, 9, 11), (1000003,), (0, 4)))
    check_maxpool_offsets("cuda")


@pytest.mark.gpu
@needs_cuda
def test_gpu_relu_zeros():
    check_relu_zeros("cuda", RELU_ZERO_CASES + [((16, 256, 56, 56), True, torch.bfloat16),
                                                ((16, 2048, 7, 7), True, torch.bfloat16)])


@pytest.mark.gpu
@needs_cuda
def test_gpu_decode_affine():
    # many SMs give the small cases groups of 2 to 4 channels (a mask byte per element): the larger
    # maps take groups of 8 and 16, whose mask bits the kernel reads as one word per pixel
    check_decode_affine("cuda", RELU_ZERO_CASES + [((32, 64, 16, 16), True, torch.bfloat16),
                                                   ((16, 256, 56, 56), True, torch.bfloat16)])


@pytest.mark.gpu
@needs_cuda
def test_gpu_rebuild_and_recompute_on_fused_kernels():
    check_rebuild_and_recompute_on_fused_kernels("cuda")


@pytest.mark.gpu
@needs_cuda
def test_gpu_relu_mask_in_encode():
    # small maps on many SMs take groups of fewer than 8 channels: each case names its group
    groups = [(shape, dtype, block, split, {"g": g, "cl_min_bytes": 0})
              for (shape, dtype, block, split, _), g in zip(MASK_IN_ENCODE_CASES, (32, 16, 32, 16, 8, 64, 32))]
    check_relu_mask_in_encode("cuda", groups + [((16, 256, 56, 56), torch.bfloat16, 8, False, {}),
                                                ((16, 256, 56, 56), torch.bfloat16, 8, True, {})])


@pytest.mark.gpu
@needs_cuda
def test_gpu_norm_from_codes():
    check_norm_from_codes("cuda", NORM_CASES + [((16, 256, 56, 56), torch.bfloat16, 8),
                                                ((8, 64, 112, 112), torch.bfloat16, 8),
                                                ((32, 1024, 14, 14), torch.bfloat16, 8),
                                                ((16, 128, 28, 28), torch.float16, 4)])


@pytest.mark.gpu
@needs_cuda
def test_gpu_ledger_matches_held_and_allocator():
    check_ledger_matches_held("cuda", (32, 3, 32, 32))


@pytest.mark.gpu
@needs_cuda
def test_gpu_norm_forward():
    check_norm_forward("cuda", NORM_FORWARD_CASES + [((16, 256, 56, 56), torch.bfloat16, 8, True),
                                                     ((8, 64, 112, 112), torch.bfloat16, 8, True),
                                                     ((32, 1024, 14, 14), torch.bfloat16, 8, False),
                                                     ((16, 128, 28, 28), torch.float16, 4, False)])


@pytest.mark.gpu
@needs_cuda
def test_gpu_seed_counter():
    check_seed_counter("cuda")


@pytest.mark.gpu
@needs_cuda
def test_gpu_direct_launch():
    from division.triton_launch import direct_launch_style
    check_direct_launch("cuda")
    assert direct_launch_style() in ("all", "runtime"), direct_launch_style()


@pytest.mark.gpu
@needs_cuda
def test_gpu_no_host_sync_and_cross_device_generator():
    """encode must not synchronise with the device (a CUDA generator is only read on the host)."""
    from division.triton_codec import TritonDivisionCodec
    x = random_input((4, 64, 28, 28), device="cuda")
    codec = TritonDivisionCodec(generator=torch.Generator(device="cuda").manual_seed(0))
    codec.decode(codec.encode(x))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        p = codec.encode(x)
        codec.decode(p)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
