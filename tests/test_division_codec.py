"""Tests of the DIVISION codec (division/dual_precision.py): error bounds, unbiasedness, bytes, formats.

Error bound used throughout (derived in the codec's docstring): the HFC is the residual against
the LFC *as stored*, so the LFC's bf16 rounding is part of the HFC and adds no error; mn is
rounded down and step up when stored in bf16, so the stored grid mn_s + k * step_s covers each
map's HFC range and no value is clamped. Per element, then,
    stochastic: |x_hat - x| < step_s            nearest: |x_hat - x| <= step_s / 2
plus fp32 round-off (TOL_REL * magnitude) and, for 16-bit inputs, the final cast (half an ulp of
the output dtype). The stats' bf16 rounding shows up only as a slightly wider step_s, checked
separately: step_s * levels <= (HFC range + one bf16 ulp of mn) * (1 + 2^-7).
The test-side helpers below re-derive the canonical view, block means and upsampling by
indexing, independently of the codec's implementation.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from division.codec import ActivationCodec, RawCodec, SaveContext
from division.dual_precision import DivisionCodec, bf16_directed

BITS = (1, 2, 4, 8)
ROUNDINGS = ("stochastic", "nearest")
TOL_REL = 1e-5  # fp32 round-off allowance, relative to the map's magnitude


pytestmark = pytest.mark.usefixtures("one_thread")

# Shape classes: square, exact multiple, non-multiples, H < B, W < B, non-square, 1x1 maps,
# a 1-row map, 2-D (Linear), 3-D (tokens), 5-D (Conv3d).
SHAPES = [
    (2, 3, 16, 16),
    (2, 3, 8, 8),
    (2, 3, 12, 20),
    (1, 2, 5, 6),
    (2, 2, 3, 19),
    (2, 2, 19, 3),
    (1, 3, 1, 1),
    (2, 2, 1, 9),
    (3, 40),
    (4, 1),
    (2, 11, 6),
    (2, 1, 5),
    (2, 2, 3, 9, 10),
]


# ------------------------------------------------------------------------- test-side reference
def canon(x: torch.Tensor) -> torch.Tensor:
    """The canonical (N, C, H, W) view, written independently of the codec."""
    if x.dim() == 2:
        return x[:, None, :, None]
    if x.dim() == 3:
        return x.permute(0, 2, 1)[..., None]
    if x.dim() == 4:
        return x
    return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])


def kernel(shape4, block=8):
    return min(block, shape4[2]), min(block, shape4[3])


def ref_block_mean(x4: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Block means by explicit slicing; the last block takes whatever is left."""
    n, c, h, w = x4.shape
    hb, wb = math.ceil(h / kh), math.ceil(w / kw)
    out = torch.empty(n, c, hb, wb, dtype=torch.float64)
    for i in range(hb):
        for j in range(wb):
            out[:, :, i, j] = x4[:, :, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].double().mean(dim=(2, 3))
    return out


def ref_upsample(lfc: torch.Tensor, kh: int, kw: int, h: int, w: int) -> torch.Tensor:
    """Element (i, j) reads block (i // kh, j // kw)."""
    rows = torch.arange(h) // kh
    cols = torch.arange(w) // kw
    return lfc.float()[:, :, rows][:, :, :, cols]


def map_max(t4: torch.Tensor) -> torch.Tensor:
    return t4.flatten(2).amax(-1)


def out_rounding(dtype: torch.dtype) -> float:
    """Half an ulp, relative, of the output dtype (the final cast)."""
    return {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]


def check_bound(codec: DivisionCodec, x: torch.Tensor, x_hat: torch.Tensor, packed, rounding: str):
    """Per-map error bound (see the module docstring); returns max error / step (for reporting)."""
    x4, xh4 = canon(x.float()), canon(x_hat.float())
    err = map_max((xh4 - x4).abs())
    scale = map_max(x4.abs()) + 1.0
    cast = out_rounding(x.dtype) * map_max(xh4.abs())
    tol = TOL_REL * scale + cast
    if "step" not in packed.tensors:  # one-element maps: LFC only, bf16 rounding of the value
        assert torch.all(err <= 2.0 ** -8 * map_max(x4.abs()) + tol)
        return 0.0
    step = packed.tensors["step"].float()
    frac = 1.0 if rounding == "stochastic" else 0.5
    assert torch.all(err <= frac * step + tol), (err - frac * step - tol).max()
    return float((err / step.clamp_min(1e-30)).max())


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_round_trip_bound(shape, bits, rounding):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 1
    codec = DivisionCodec(bits=bits, rounding=rounding, generator=torch.Generator().manual_seed(1))
    packed = codec.encode(x)
    x_hat = codec.decode(packed)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    check_bound(codec, x, x_hat, packed, rounding)


@pytest.mark.parametrize("shape", [s for s in SHAPES], ids=str)
def test_lfc_is_ceiled_block_mean_and_grid_covers_hfc(shape):
    """The stored LFC is the mean of each (ceiled) block, aligned; the stored grid covers the HFC
    and is only slightly wider than the ideal one."""
    torch.manual_seed(0)
    x = torch.randn(shape) * 2 - 0.5
    codec = DivisionCodec(bits=2, generator=torch.Generator().manual_seed(0))
    packed = codec.encode(x)
    x4 = canon(x)
    kh, kw = kernel(x4.shape)
    ref = ref_block_mean(x4, kh, kw)
    lfc = packed.tensors["lfc"]
    assert lfc.dtype == torch.bfloat16 and lfc.shape == ref.shape
    assert torch.all((lfc.double() - ref).abs() <= 2.0 ** -8 * ref.abs() + 1e-6)
    if "step" not in packed.tensors:
        assert x4.shape[2] * x4.shape[3] == 1
        return
    mn, step = packed.tensors["mn"], packed.tensors["step"]
    assert mn.dtype == step.dtype == torch.bfloat16 and mn.shape == step.shape == x4.shape[:2]
    hfc = (x4.float() - ref_upsample(lfc, kh, kw, *x4.shape[2:])).flatten(2)
    lo, hi = hfc.amin(-1), hfc.amax(-1)
    levels = 2 ** 2 - 1
    mn_f, step_f = mn.float(), step.float()
    assert torch.all(mn_f <= lo)
    assert torch.all(mn_f + levels * step_f >= hi - 1e-6 * (hi.abs() + 1))
    ulp_mn = 2.0 ** -7 * lo.abs()
    assert torch.all(step_f * levels <= (hi - lo + ulp_mn) * (1 + 2.0 ** -7) + 1e-6)


def test_real_conv_activations():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    with torch.no_grad():
        act = F.relu(conv(torch.randn(4, 3, 28, 28)))
        pre = conv(torch.randn(2, 3, 13, 13))
    for x in (act, pre):
        for bits in BITS:
            for rounding in ROUNDINGS:
                codec = DivisionCodec(bits=bits, rounding=rounding, generator=torch.Generator().manual_seed(2))
                packed = codec.encode(x)
                check_bound(codec, x, codec.decode(packed), packed, rounding)


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 12)
    gen = torch.Generator().manual_seed(0)
    codec = DivisionCodec(bits=2, generator=gen)
    draws = 400
    total = torch.zeros_like(x, dtype=torch.float64)
    steps = []
    for _ in range(draws):
        packed = codec.encode(x)
        steps.append(packed.tensors["step"].float())
        total += codec.decode(packed).double()
    # the stats do not depend on the draw: the step is the same every time
    assert all(torch.equal(s, steps[0]) for s in steps)
    step = steps[0][:, :, None, None].double()
    bias = (total / draws - x.double()).abs()
    # one draw's error has std <= step / 2, so the mean of 400 has std <= step / 40
    assert torch.all(bias.flatten(2).mean(-1) < step.flatten(2).mean(-1) / 20)
    assert torch.all(bias < step / 5)
    # nearest rounding is deterministic: two encodes store the same codes
    near = DivisionCodec(bits=2, rounding="nearest")
    assert torch.equal(near.decode(near.encode(x)), near.decode(near.encode(x)))


def test_reproducible_with_generator_seed():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 11)

    def codes(seed):
        c = DivisionCodec(bits=2, generator=torch.Generator().manual_seed(seed))
        return c.encode(x).tensors["codes"]

    assert torch.equal(codes(7), codes(7))
    assert not torch.equal(codes(7), codes(8))
    # without a generator the global RNG is used: torch.manual_seed makes it reproducible
    c = DivisionCodec(bits=2)
    torch.manual_seed(3)
    a = c.encode(x).tensors["codes"]
    torch.manual_seed(3)
    b = c.encode(x).tensors["codes"]
    assert torch.equal(a, b)


BYTE_SHAPES = SHAPES + [(1, 1, 3, 5), (3, 7, 17, 9), (2, 64, 56, 56), (1, 1, 1, 1), (5, 3), (1, 9, 1)]


@pytest.mark.parametrize("block", [1, 3, 8, 16])
@pytest.mark.parametrize("bits", BITS)
def test_nbytes_equals_closed_form(block, bits):
    torch.manual_seed(0)
    for shape in BYTE_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape).to(dtype)
            for knobs in ({}, {"keep_lfc": False}, {"keep_hfc": False}, {"simulate": True}):
                codec = DivisionCodec(block_size=block, bits=bits, **knobs)
                assert codec.encode(x).nbytes == codec.closed_form_nbytes(x.shape, dtype), (shape, dtype, knobs)


def test_closed_form_by_hand():
    codec = DivisionCodec(block_size=8, bits=2)
    # (2, 64, 56, 56) fp32: 128 maps of 56x56, 7x7 blocks each
    numel = 2 * 64 * 56 * 56
    codes = numel * 2 // 8            # 100352
    lfc = 128 * 7 * 7 * 2             # 12544
    stats = 128 * 2 * 2               # 512
    assert codes + lfc + stats == 113408
    assert codec.closed_form_nbytes((2, 64, 56, 56), torch.float32) == 113408
    per_elem = 2 / 8 + 2 / 8 ** 2 + 4 / (56 * 56)  # no ceil effects here
    assert math.isclose(113408 / numel, per_elem, rel_tol=1e-12)
    assert 14.1 < numel * 4 / 113408 < 14.2
    # ceil effects: 10x13 maps -> 2x2 blocks; 390 codes at 2 bits -> 98 bytes
    assert codec.closed_form_nbytes((1, 3, 10, 13), torch.float32) == 98 + 3 * 4 * 2 + 3 * 4
    # 1-bit codes, odd count: 15 codes -> 2 bytes; one 3x5 block
    assert DivisionCodec(bits=1).closed_form_nbytes((1, 1, 3, 5), torch.float32) == 2 + 2 + 4
    # 1x1 maps keep the LFC only: 2 bytes per element
    assert codec.closed_form_nbytes((4, 16, 1, 1), torch.float32) == 4 * 16 * 2
    # 2-D (N, F): blocks of 8 along F, stats per sample
    assert codec.closed_form_nbytes((3, 20), torch.float32) == math.ceil(60 * 2 / 8) + 3 * 3 * 2 + 3 * 4
    # raw: 1-D, 0-D, integer, empty
    assert codec.closed_form_nbytes((10,), torch.float32) == 40
    assert codec.closed_form_nbytes((), torch.float16) == 2
    assert codec.closed_form_nbytes((2, 3, 8, 8), torch.int64) == 2 * 3 * 64 * 8
    assert codec.closed_form_nbytes((0, 3, 8, 8), torch.float32) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_dtypes(dtype, rounding):
    torch.manual_seed(0)
    for shape in ((2, 3, 12, 10), (3, 20), (2, 9, 5), (2, 2, 3, 4, 9)):
        x = (torch.randn(shape) * 2).to(dtype)
        codec = DivisionCodec(bits=4, rounding=rounding, generator=torch.Generator().manual_seed(0))
        packed = codec.encode(x)
        x_hat = codec.decode(packed)
        assert x_hat.dtype == dtype and x_hat.shape == x.shape and x_hat.device == x.device
        assert torch.isfinite(x_hat).all()
        check_bound(codec, x, x_hat, packed, rounding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_channels_last_round_trip(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 11, 9).to(dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()

    def run(t):
        c = DivisionCodec(bits=2, generator=torch.Generator().manual_seed(5))
        p = c.encode(t)
        return p, c.decode(p)

    p, y = run(x)
    p_cl, y_cl = run(x_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and not y_cl.is_contiguous()
    assert y.is_contiguous()
    assert torch.equal(p.tensors["codes"], p_cl.tensors["codes"])
    assert torch.equal(y, y_cl)
    # 5-D channels_last_3d comes back in its format too
    v = torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    c = DivisionCodec()
    w = c.decode(c.encode(v))
    assert w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()


def test_three_d_maps_are_per_token_feature():
    """(N, L, D): one mn / step per (n, d), blocks along L."""
    torch.manual_seed(0)
    x = torch.randn(2, 19, 6)
    x[:, :, 3] *= 100  # feature 3 has a much wider range than the others
    packed = DivisionCodec(bits=2).encode(x)
    step = packed.tensors["step"].float()
    assert step.shape == (2, 6)
    assert packed.tensors["lfc"].shape == (2, 6, 3, 1)
    assert torch.all(step[:, 3] > 20 * step[:, [0, 1, 2, 4, 5]].amax(1))


def test_constant_and_zero_maps_are_finite():
    x = torch.zeros(2, 3, 9, 10)
    x[0, 1] = 1.2345
    x[1, 2] = -7.0
    x[1, 0, :8, :8] = 3.0  # piecewise constant on blocks: HFC is exactly zero there
    for bits in BITS:
        for rounding in ROUNDINGS:
            codec = DivisionCodec(bits=bits, rounding=rounding)
            packed = codec.encode(x)
            x_hat = codec.decode(packed)
            assert torch.isfinite(x_hat).all()
            assert torch.isfinite(packed.tensors["step"].float()).all()
            check_bound(codec, x, x_hat, packed, rounding)
            assert torch.equal(x_hat[0, 0], x[0, 0])  # an all-zero map is exact
    near = DivisionCodec(bits=2, rounding="nearest")
    assert torch.equal(near.decode(near.encode(x))[1, 2], x[1, 2])  # bf16-exact constant


def test_one_element_maps_store_lfc_only():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 1, 1)
    codec = DivisionCodec()
    packed = codec.encode(x)
    assert set(packed.tensors) == {"lfc"}
    assert torch.equal(codec.decode(packed), x.to(torch.bfloat16).float())


def test_piecewise_constant_blocks_align():
    """A map constant on each (ceiled) block is reproduced by the LFC alone: no misalignment."""
    torch.manual_seed(0)
    for h, w in ((10, 13), (19, 3), (5, 6), (16, 9)):
        kh, kw = min(8, h), min(8, w)
        blocks = torch.randn(2, 3, math.ceil(h / kh), math.ceil(w / kw)).to(torch.bfloat16)
        x = ref_upsample(blocks, kh, kw, h, w)
        codec = DivisionCodec(keep_hfc=False)
        assert torch.equal(codec.decode(codec.encode(x)), x)


def test_keep_lfc_false():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 10) + 5
    codec = DivisionCodec(bits=2, keep_lfc=False, generator=torch.Generator().manual_seed(0))
    packed = codec.encode(x)
    assert set(packed.tensors) == {"codes", "mn", "step"}
    # the HFC is x itself: the grid spans x's own range
    lo, hi = x.flatten(2).amin(-1), x.flatten(2).amax(-1)
    mn, step = packed.tensors["mn"].float(), packed.tensors["step"].float()
    assert torch.all(mn <= lo) and torch.all(mn + 3 * step >= hi - 1e-5)
    check_bound(codec, x, codec.decode(packed), packed, "stochastic")
    assert packed.nbytes == codec.closed_form_nbytes(x.shape, x.dtype)
    # 1x1 maps under keep_lfc=False go through the generic path and stay within one step
    y = torch.randn(2, 4, 1, 1)
    py = codec.encode(y)
    check_bound(codec, y, codec.decode(py), py, "stochastic")


def test_keep_hfc_false():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 10)
    codec = DivisionCodec(keep_hfc=False)
    packed = codec.encode(x)
    assert set(packed.tensors) == {"lfc"}
    assert torch.equal(codec.decode(packed), ref_upsample(packed.tensors["lfc"], 8, 8, 12, 10))
    assert packed.nbytes == 2 * 3 * 2 * 2 * 2


def test_simulate_matches_real_storage():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 12, 10).to(dtype).contiguous(memory_format=torch.channels_last)
        real = DivisionCodec(bits=2, generator=torch.Generator().manual_seed(9))
        sim = DivisionCodec(bits=2, simulate=True, generator=torch.Generator().manual_seed(9))
        p_sim = sim.encode(x)
        assert set(p_sim.tensors) == {"x_hat"}
        assert p_sim.tensors["x_hat"].dtype == dtype
        assert p_sim.nbytes == x.numel() * x.element_size() == sim.closed_form_nbytes(x.shape, dtype)
        out = sim.decode(p_sim)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, real.decode(real.encode(x)))
        assert not torch.equal(out, x)


def test_more_bits_is_closer():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    errs = {}
    for bits in BITS:
        c = DivisionCodec(bits=bits, generator=torch.Generator().manual_seed(0))
        errs[bits] = (c.decode(c.encode(x)) - x).abs().mean().item()
    assert errs[8] < errs[4] < errs[2] < errs[1]
    assert errs[8] < errs[2] / 20


def test_raw_inputs():
    codec = DivisionCodec()
    for x in (torch.randn(7), torch.tensor(3.0), torch.arange(24).view(2, 3, 4), torch.randn(0, 3, 8, 8)):
        packed = codec.encode(x)
        assert set(packed.tensors) == {"x"}
        # Kept by reference (same storage, no copy), detached from the graph (see RawCodec.encode).
        kept = codec.decode(packed)
        assert kept.data_ptr() == x.data_ptr() and kept.shape == x.shape and kept.grad_fn is None
        assert torch.equal(kept, x)
        assert packed.nbytes == codec.closed_form_nbytes(x.shape, x.dtype)


def test_interface_and_describe():
    codec = DivisionCodec(block_size=4, bits=4, rounding="nearest", keep_hfc=True)
    assert isinstance(codec, ActivationCodec) and codec.name == "division"
    assert codec.describe() == {"codec": "division", "block_size": 4, "bits": 4, "rounding": "nearest",
                                "keep_lfc": True, "keep_hfc": True, "simulate": False, "relu_zeros": True}
    x = torch.randn(2, 3, 8, 8)
    packed = codec.encode(x, SaveContext("layer1.0.conv1", "conv"))
    assert torch.equal(packed.unpack(), codec.decode(packed))
    m = packed.meta
    assert m["shape"] == x.shape and m["dtype"] == torch.float32 and m["layout"] == "maps"
    assert packed.tensors["codes"].dtype == torch.uint8 and packed.tensors["codes"].dim() == 1
    assert packed.tensors["lfc"].shape == (2, 3, 2, 2)


@pytest.mark.parametrize("kwargs, name", [
    ({"block_size": 0}, "block_size"),
    ({"block_size": 2.5}, "block_size"),
    ({"block_size": True}, "block_size"),
    ({"bits": 3}, "bits"),
    ({"bits": 16}, "bits"),
    ({"bits": True}, "bits"),
    ({"rounding": "up"}, "rounding"),
    ({"keep_lfc": False, "keep_hfc": False}, "keep_lfc"),
])
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name) as info:
        DivisionCodec(**kwargs)
    value = next(iter(kwargs.values()))
    assert repr(value) in str(info.value)


def test_bf16_directed_rounding():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(10000) * 10.0 ** torch.randint(-30, 30, (10000,)).float(),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40])])
    up = bf16_directed(x, "up").float()
    down = bf16_directed(x, "down").float()
    assert torch.all(down <= x) and torch.all(x <= up)
    # at most one bf16 ulp apart, and equal where x is representable
    exact = x.to(torch.bfloat16).float() == x
    assert torch.equal(up[exact], x[exact]) and torch.equal(down[exact], x[exact])
    nearest = x.to(torch.bfloat16).float()
    assert torch.all((nearest == up) | (nearest == down))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_bound_and_bytes():
    torch.manual_seed(0)
    for shape in SHAPES:
        x = (torch.randn(shape) * 3 + 1).cuda()
        for bits in BITS:
            for rounding in ROUNDINGS:
                codec = DivisionCodec(bits=bits, rounding=rounding,
                                      generator=torch.Generator(device="cuda").manual_seed(0))
                packed = codec.encode(x)
                x_hat = codec.decode(packed)
                assert x_hat.device == x.device and all(t.device == x.device for t in packed.tensors.values())
                assert packed.nbytes == codec.closed_form_nbytes(x.shape, x.dtype)
                check_bound(codec, x.cpu(), x_hat.cpu(), type(packed)(codec, {k: v.cpu() for k, v in packed.tensors.items()},
                                                                        packed.meta), rounding)
    # nearest rounding is deterministic, so CPU and CUDA agree up to fp32 reduction order
    x = torch.randn(2, 3, 12, 10)
    c = DivisionCodec(bits=4, rounding="nearest")
    assert torch.allclose(c.decode(c.encode(x.cuda())).cpu(), c.decode(c.encode(x)), atol=1e-2)


def test_raw_codec_interplay():
    """RawCodec and DivisionCodec agree on what raw storage costs."""
    x = torch.randn(11)
    assert RawCodec().closed_form_nbytes(x.shape, x.dtype) == DivisionCodec().closed_form_nbytes(x.shape, x.dtype)


def _full_size_float_buffers(fn, numel: int, existing: tuple = ()) -> int:
    """How many new floating-point storages of at least ``numel`` elements the tensor ops of
    ``fn()`` create (an op writing into its own input or an ``out=`` tensor creates none; views of
    the ``existing`` tensors are not new)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= numel:
                    self.storages.add(t.untyped_storage().data_ptr())
            return out

    with Count() as count:
        fn()
    return len(count.storages - {t.untyped_storage().data_ptr() for t in existing})


@pytest.mark.parametrize("channels_last", [False, True])
def test_reference_decode_writes_one_full_size_buffer(channels_last):
    """The tensor-op decode (``method.backend=torch``, and any CPU run) of a ReLU output with its
    mask: the HFC, the upsampled LFC and the mask's zeros are written into one full-size fp32
    buffer (plus the channels_last copy of a channels_last map), where it made six (seven) full-size
    temporaries, all alive in the backward that asked for the decode. The values are those of the
    formula ``where(mask, max(upsample(lfc) + mn + code * step, tiny), 0)``."""
    from division.dual_precision import dequantize, upsample, codes_in_nchw_order
    from division.exact import RELU_MASK, ReluMaskCodec
    from division.packing import unpack_bits

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, 16, 24, generator=g).relu()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    codec = DivisionCodec(block_size=4, bits=2, rounding="nearest")
    packed = codec.encode(x)
    packed.meta[RELU_MASK] = ReluMaskCodec(kernels=False).encode(x)
    decoded = codec.decode(packed)
    assert _full_size_float_buffers(lambda: codec.decode(packed), x.numel()) == 1 + int(channels_last)

    t, geom = packed.tensors, packed.meta["geometry"]
    codes = unpack_bits(codes_in_nchw_order(t["codes"], packed.meta), 2, x.numel()).view(x.shape)
    formula = upsample(t["lfc"], geom.kh, geom.kw, geom.h, geom.w) + dequantize(codes, t["mn"], t["step"])
    formula = torch.where(x > 0, formula.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    assert torch.equal(decoded, formula)
    assert decoded.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_reference_encode_makes_two_full_size_buffers_at_most(rounding):
    """The tensor-op encode of an fp32 map: the residual against the stored LFC is made in one new
    buffer (the LFC broadcast over each block, no full-size upsample), scaled to the code grid in
    place, plus the rounding's uniform draws; it made five (four rounding to nearest) before. The activation
    itself is left as it was, and the codes are those of the formula."""
    from division.dual_precision import quantize, upsample

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 16, 16, 24, generator=g)
    before = x.clone()

    def codec():
        return DivisionCodec(block_size=4, bits=2, rounding=rounding, generator=torch.Generator().manual_seed(3))
    assert _full_size_float_buffers(lambda: codec().encode(x), x.numel(), (x,)) == (2 if rounding == "stochastic" else 1)
    assert torch.equal(x, before)
    packed = codec().encode(x)
    lfc = packed.tensors["lfc"]
    want_codes, want_mn, want_step = quantize(x - upsample(lfc, 4, 4, 16, 24), 2, rounding,
                                              torch.Generator().manual_seed(3))
    from division.packing import pack_bits
    assert torch.equal(packed.tensors["codes"], pack_bits(want_codes, 2))
    assert torch.equal(packed.tensors["mn"], want_mn) and torch.equal(packed.tensors["step"], want_step)
