"""Exact storage (bit packing, ReLU / dropout / bool masks, max-pool indices) and the compressor's
behaviour on small models: exact gradients with lossless codecs, shared inputs stored once, the
ledger against closed-form sizes, eval / no_grad, hook removal, and DIVISION's gradient quality.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from division.codec import RawCodec
from division.compressor import compress_activations
from division.dual_precision import DivisionCodec
from division.exact import (BoolMaskCodec, DropoutMaskCodec, MaxPoolIndexCodec, ReluMaskCodec,
                            ShapeOnlyCodec)
from division.ledger import ByteLedger
from division.packing import pack_bits, pack_mask, packed_nbytes, unpack_bits, unpack_mask


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("numel", [0, 1, 3, 7, 8, 13, 1001])
def test_pack_round_trip(bits, numel):
    torch.manual_seed(numel)
    codes = torch.randint(0, 2 ** bits, (numel,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(numel, bits) == math.ceil(numel * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, numel), codes)
    # multi-dimensional input packs in flattened order
    if numel == 1001:
        grid = codes[:1000].view(10, 100)
        assert torch.equal(unpack_bits(pack_bits(grid, bits), bits, 1000), codes[:1000])


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_packing_fake_tensors_after_eager_packing(bits):
    """The compiler propagates fake tensors through an opaque op's fake implementation (the
    reference encode) outside Dynamo's trace: the bit offsets cached by an eager call on the same
    device must not meet them (a real tensor in a fake op is an error)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    codes = torch.randint(0, 2 ** bits, (64,), dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, 64), codes)  # caches the offsets
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(codes)
        packed = pack_bits(fake, bits)
        assert packed.shape == (packed_nbytes(64, bits),) and unpack_bits(packed, bits, 64).shape == (64,)


def test_pack_layout_and_extremes():
    # code i sits in byte i // per_byte at bit offset (i % per_byte) * bits
    assert pack_bits(torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4, 3]
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0b10000001, 1]
    for bits in (1, 2, 4, 8):
        top = torch.full((9,), 2 ** bits - 1, dtype=torch.uint8)
        assert torch.equal(unpack_bits(pack_bits(top, bits), bits, 9), top)
    assert [packed_nbytes(n, b) for n, b in ((15, 1), (15, 2), (15, 4), (15, 8))] == [2, 4, 8, 15]
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 3)


def test_mask_round_trip():
    torch.manual_seed(0)
    m = torch.rand(3, 5, 7) > 0.5
    assert torch.equal(unpack_mask(pack_mask(m), m.shape), m)


# ---------------------------------------------------------------------------- exact codecs
def test_relu_mask_codec():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        y = F.relu(torch.randn(2, 3, 5, 7)).to(dtype)
        for t in (y, y.contiguous(memory_format=torch.channels_last)):
            c = ReluMaskCodec()
            p = c.encode(t)
            out = c.decode(p)
            assert out.dtype == dtype and torch.equal(out, (t > 0).to(dtype))
            assert out.is_contiguous(memory_format=torch.channels_last) == (t is not y)
            assert p.nbytes == c.closed_form_nbytes(t.shape, dtype) == math.ceil(t.numel() / 8)


def test_parameters_and_their_views_are_kept_by_reference():
    """Weights (and views such as Linear's weight.t()) are model memory: the pack hook keeps them as
    they are; plain tensors and a Parameter subclass are told apart correctly."""
    from division.compressor import _is_parameter
    w = torch.nn.Parameter(torch.randn(4, 3))
    lazy = torch.nn.parameter.UninitializedParameter()
    assert _is_parameter(w) and _is_parameter(w.t()) and _is_parameter(lazy)
    assert not _is_parameter(torch.randn(4, 3)) and not _is_parameter(torch.randn(4, 3).t())
    assert not _is_parameter(w.detach() * 2)


def test_mask_bits_follow_storage_order():
    """A channels_last tensor's bits are laid out in its NHWC storage order (no reordering copy
    either way), a contiguous tensor's in NCHW order; the same bytes as pack_mask of that order."""
    torch.manual_seed(0)
    y = torch.randn(2, 3, 5, 7)
    cl = y.contiguous(memory_format=torch.channels_last)
    bits_cl = ReluMaskCodec().encode(cl).tensors["bits"]
    assert torch.equal(bits_cl, pack_mask(cl.permute(0, 2, 3, 1).reshape(-1) > 0))
    assert torch.equal(ReluMaskCodec().encode(y).tensors["bits"], pack_mask(y.reshape(-1) > 0))
    assert not torch.equal(bits_cl, ReluMaskCodec().encode(y).tensors["bits"])  # the orders differ here


def test_relu_mask_gives_exact_threshold_backward():
    torch.manual_seed(0)
    x = torch.randn(4, 9)
    y = F.relu(x)
    g = torch.randn_like(x)
    c = ReluMaskCodec()
    ref = torch.ops.aten.threshold_backward(g, y, 0)
    assert torch.equal(torch.ops.aten.threshold_backward(g, c.decode(c.encode(y)), 0), ref)


def test_dropout_mask_codec():
    torch.manual_seed(0)
    for p_drop in (0.1, 0.5, 0.9):
        noise = (torch.rand(3, 4, 5, 6) > p_drop).float() / (1 - p_drop)
        for t in (noise, noise.contiguous(memory_format=torch.channels_last)):
            c = DropoutMaskCodec()
            packed = c.encode(t)
            out = c.decode(packed)
            assert torch.equal(out, t)
            assert out.is_contiguous(memory_format=torch.channels_last) == (t is not noise)
            assert packed.nbytes == c.closed_form_nbytes(t.shape, t.dtype) == math.ceil(t.numel() / 8) + 4
    # an empty tensor has no maximum to take the scale from
    empty = torch.empty(0, 4, dtype=torch.float16)
    c = DropoutMaskCodec()
    packed = c.encode(empty)
    assert torch.equal(c.decode(packed), empty) and c.decode(packed).dtype == torch.float16
    assert packed.nbytes == c.closed_form_nbytes(empty.shape, empty.dtype) == 2


def test_bool_mask_codec():
    torch.manual_seed(0)
    for shape in ((13,), (3, 5, 7), (2, 1, 1, 1)):
        m = torch.rand(shape) > 0.3
        c = BoolMaskCodec()
        p = c.encode(m)
        assert torch.equal(c.decode(p), m)
        assert p.nbytes == c.closed_form_nbytes(m.shape, m.dtype) == math.ceil(m.numel() / 8)
    # CUDA dropout's mask follows a channels_last input's format; it comes back in that format
    m = (torch.rand(2, 3, 4, 5) > 0.3).contiguous(memory_format=torch.channels_last)
    out = BoolMaskCodec().decode(BoolMaskCodec().encode(m))
    assert torch.equal(out, m) and out.is_contiguous(memory_format=torch.channels_last)


def test_shape_only_codec():
    x = torch.randn(2, 3, 4, 5)
    c = ShapeOnlyCodec()
    p = c.encode(x)
    out = c.decode(p)
    assert p.nbytes == 0 == c.closed_form_nbytes(x.shape, x.dtype)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.stride() == (0, 0, 0, 0)  # no memory behind it
    # CUDA's max-pool backward picks its kernel by the input's format: a channels_last input
    # decodes in that format
    out = c.decode(c.encode(x.contiguous(memory_format=torch.channels_last)))
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("cfg", [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
    dict(kernel_size=3, stride=1, padding=1, dilation=2),
    dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=16, stride=16),
])
def test_maxpool_index_codec(cfg):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 17, 16)
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        _, idx = F.max_pool2d(t, return_indices=True, **cfg)
        c = MaxPoolIndexCodec(cfg["kernel_size"], cfg.get("stride"), cfg.get("padding", 0),
                              cfg.get("dilation", 1), input_width=t.shape[-1])
        p = c.encode(idx)
        assert p.tensors["offset"].dtype == torch.uint8
        out = c.decode(p)
        assert out.dtype == torch.int64 and torch.equal(out, idx)
        assert p.nbytes == c.closed_form_nbytes(idx.shape, idx.dtype) == idx.numel()
    assert MaxPoolIndexCodec.fits(16) and not MaxPoolIndexCodec.fits(17)


# ---------------------------------------------------------------------------------- models
def make_seq() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.3), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


class TinyResNet(nn.Module):
    """A stem and one downsampling residual block; the block input h feeds conv1 and down."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.down = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        self.relu2 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = self.relu(self.bn(self.conv(x)))
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(h)))))
        out = self.relu2(out + self.down(h))
        return self.fc(out.mean((2, 3)))


def make_resnet() -> nn.Module:
    torch.manual_seed(0)
    return TinyResNet()


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


class CountingCodec(DivisionCodec):
    """DIVISION that counts its encode calls (to see whether hooks ran and sharing happened)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encodes = 0

    def encode(self, x, ctx=None):
        self.encodes += 1
        return super().encode(x, ctx)


def step(model: nn.Module, x: torch.Tensor, seed: int = 1):
    """One forward / backward with a fixed RNG (dropout); returns the gradients by name and x's."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = model(x)
    target = torch.arange(y.shape[0]) % y.shape[1]
    F.cross_entropy(y, target).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["<input>"] = x.grad.clone()
    return grads


def images(n=4, hw=16):
    torch.manual_seed(123)
    return torch.randn(n, 3, hw, hw)


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for n, g in grads.items() if n != "<input>"])


def cosine(a: dict, b: dict) -> float:
    return F.cosine_similarity(flat(a), flat(b), dim=0).item()


def assert_same_grads(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=0, atol=atol), n


# --------------------------------------------------------------------------- compressor tests
@pytest.mark.parametrize("make", [make_seq, make_resnet], ids=["seq", "resnet"])
def test_lossless_codecs_give_exact_gradients(make):
    """(a) ReLU / dropout / max-pool in their exact forms, everything else raw: plain gradients."""
    plain = make()
    hooked = copy.deepcopy(plain)
    ledger = ByteLedger()
    compress_activations(hooked, RawCodec(), exact_masks=True, ledger=ledger, min_numel=1)
    x = images()
    ref = step(plain, x)
    got = step(hooked, x)
    assert_same_grads(ref, got)
    codecs = {e.codec for e in ledger.entries}
    assert "relu_mask" in codecs
    if make is make_seq:
        assert {"maxpool_index", "shape_only"} <= codecs
        assert codecs & {"dropout_mask", "bool_mask"}
        # the exact forms are much smaller than what they replace
        by = ledger.by_codec()
        assert by["relu_mask"]["stored_bytes"] * 32 == by["relu_mask"]["plain_bytes"]
        assert by["maxpool_index"]["stored_bytes"] * 8 == by["maxpool_index"]["plain_bytes"]
    # a second step (the hooks re-enter, the ledger resets) is exact as well
    assert_same_grads(step(plain, x, seed=2), step(hooked, x, seed=2))


def test_shared_block_input_stored_once():
    """(b) h feeds conv1 and down: encoded once, the second save is 'shared' at 0 bytes."""
    x = images()
    raw_model = make_resnet()
    raw_ledger = ByteLedger()
    compress_activations(raw_model, RawCodec(), ledger=raw_ledger, min_numel=1)
    ref = step(raw_model, x)
    assert_same_grads(ref, step(make_resnet(), x))  # the raw run is plain autograd

    model = make_resnet()
    codec = CountingCodec(bits=8, generator=torch.Generator().manual_seed(0))
    ledger = ByteLedger()
    compress_activations(model, codec, ledger=ledger, min_numel=1)
    got = step(model, x)

    for led, name in ((ledger, "division"), (raw_ledger, "raw")):
        conv1 = [e for e in led.entries if e.layer == "conv1" and e.shape == (4, 8, 16, 16)]
        down = [e for e in led.entries if e.layer == "down" and e.shape == (4, 8, 16, 16)]
        assert len(conv1) == len(down) == 1
        assert conv1[0].codec == name and conv1[0].stored_bytes > 0
        assert down[0].codec == "shared" and down[0].stored_bytes == 0 and down[0].plain_bytes == 0
    assert codec.encodes == sum(e.codec == "division" for e in ledger.entries)
    assert cosine(got, ref) > 0.99
    for n in ("conv.weight", "down.weight", "conv1.weight"):
        assert F.cosine_similarity(got[n].reshape(-1), ref[n].reshape(-1), dim=0) > 0.98, n


@pytest.mark.parametrize("make", [make_seq, make_resnet], ids=["seq", "resnet"])
def test_ledger_matches_closed_form(make):
    """(c) every entry's stored_bytes is its codec's closed form; the total is their sum."""
    model = make()
    division = DivisionCodec(bits=2, generator=torch.Generator().manual_seed(0))
    ledger = ByteLedger()
    compress_activations(model, division, ledger=ledger, min_numel=256)
    step(model, images())
    closed = {"division": division, "raw": RawCodec(), "relu_mask": ReluMaskCodec(),
              "dropout_mask": DropoutMaskCodec(), "bool_mask": BoolMaskCodec(),
              "shape_only": ShapeOnlyCodec(),
              "maxpool_index": MaxPoolIndexCodec(2, 2, 0, 1, input_width=16)}
    total = 0
    for e in ledger.entries:
        expected = 0 if e.codec == "shared" else closed[e.codec].closed_form_nbytes(e.shape, getattr(torch, e.dtype))
        assert e.stored_bytes == expected, e
        total += expected
    assert ledger.stored_bytes == total
    assert "division" in {e.codec for e in ledger.entries}
    assert ledger.ratio > 3
    # parameters (and Linear's weight.t() view) are model memory, not in the ledger
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert not [e for e in ledger.entries if e.shape in (tuple(fc.weight.shape), tuple(fc.weight.t().shape))]


@pytest.mark.parametrize("make", [make_seq, make_resnet], ids=["seq", "resnet"])
def test_eval_and_no_grad_are_untouched(make):
    """(d) eval mode and no_grad: no encodes, nothing recorded, plain results."""
    plain = make()
    model = copy.deepcopy(plain)
    codec = CountingCodec()
    ledger = ByteLedger()
    comp = compress_activations(model, codec, ledger=ledger, min_numel=1)
    x = images()

    model.eval()
    plain.eval()
    assert_same_grads(step(plain, x), step(model, x))  # grad-enabled eval forward: plain autograd
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    assert codec.encodes == 0 and ledger.entries == [] and not comp._active()

    model.train()
    plain.train()
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(0)
        assert torch.equal(a, plain(x))
    assert codec.encodes == 0 and ledger.entries == [] and not comp._active()

    # a training step does record; a later eval forward leaves that record alone
    step(model, x)
    n_entries, n_encodes = len(ledger.entries), codec.encodes
    assert n_entries > 0 and n_encodes > 0 and not comp._active()
    model.eval()
    model(x).sum().backward()
    with torch.no_grad():
        model.train()
        model(x)
    assert len(ledger.entries) == n_entries and codec.encodes == n_encodes


def _hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("make", [make_seq, make_resnet], ids=["seq", "resnet"])
def test_state_dict_unchanged_and_remove(make):
    """(e) same state_dict keys and values; remove() brings plain behaviour back."""
    plain = make()
    model = copy.deepcopy(plain)
    keys = list(model.state_dict().keys())
    codec = CountingCodec()
    ledger = ByteLedger()
    comp = compress_activations(model, codec, ledger=ledger, min_numel=1)
    assert list(model.state_dict().keys()) == keys
    assert _hook_counts(model) > 0
    x = images()
    step(model, x)
    assert codec.encodes > 0
    # BN running stats were updated exactly as the plain model's would be
    step(plain, x)
    for (k, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        if "running" in k or "num_batches" in k:
            assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    comp.remove()
    assert _hook_counts(model) == 0
    assert list(model.state_dict().keys()) == keys
    n_entries, n_encodes = len(ledger.entries), codec.encodes
    assert_same_grads(step(plain, x, seed=3), step(model, x, seed=3))
    assert codec.encodes == n_encodes and len(ledger.entries) == n_entries
    # the context-manager form removes the hooks too
    with compress_activations(model, codec):
        assert _hook_counts(model) > 0
    assert _hook_counts(model) == 0


def gradient_cosines(make, bits: int, x: torch.Tensor, seed: int = 0):
    """Cosine between DIVISION's and exact parameter gradients: (all parameters, worst parameter)."""
    exact = step(make(), x)
    model = make()
    compress_activations(model, DivisionCodec(bits=bits, generator=torch.Generator().manual_seed(seed)),
                         min_numel=1)
    got = step(model, x)
    per = [F.cosine_similarity(got[n].reshape(-1), exact[n].reshape(-1), dim=0).item()
           for n in exact if n != "<input>"]
    return cosine(got, exact), min(per)


def test_division_gradient_quality():
    """(f) bits=8 gradients are close to exact; bits=8 is closer than bits=2.

    Measured (torch 2.14 CPU, generator seeds 0-2; random-noise images, the worst case for
    DIVISION since they have no low-frequency content): cnn overall / worst-parameter cosine
    bits=8 0.99998 / 0.99993, bits=4 0.993 / 0.98, bits=2 0.88 / 0.6-0.7, bits=1 0.49;
    resnet bits=8 0.99999 / 0.99994, bits=4 0.997, bits=2 0.93. The error falls with the step
    squared, as expected. Bounds below leave a wide margin.
    """
    x = images(n=8, hw=16)
    c8, w8 = gradient_cosines(make_cnn, 8, x)
    c2, w2 = gradient_cosines(make_cnn, 2, x)
    assert c8 > 0.999 and w8 > 0.99
    assert c8 > c2 and w8 > w2
    r8, _ = gradient_cosines(make_resnet, 8, images())
    r2, _ = gradient_cosines(make_resnet, 2, images())
    assert r8 > 0.999 and r8 > r2


def test_average_pooling_inputs_need_no_storage_and_gradients_stay_exact():
    """avg_pool backward reads only its input's shape: shape-only storage, bit-identical gradients."""
    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                             nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True), nn.AdaptiveAvgPool2d(3),
                             nn.Flatten(), nn.Linear(72, 10))
    x = torch.randn(4, 3, 33, 31)
    ref = make()
    ref(x).sum().backward()
    model, ledger = make(), ByteLedger()
    compress_activations(model, RawCodec(), ledger=ledger, min_numel=1)
    model(x).sum().backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        assert torch.equal(a.grad, b.grad), name
    pooled = [e for e in ledger.entries if e.kind == "avgpool"]
    assert len(pooled) == 3 and all(e.codec == "shape_only" and e.stored_bytes == 0 for e in pooled)
    # inputs (8, 33, 31), (8, 16, 15) and (8, 9, 8) per image, fp32, batch 4
    assert sum(e.plain_bytes for e in pooled) == 4 * (8 * 33 * 31 + 8 * 16 * 15 + 8 * 9 * 8) * 4


def make_pooled() -> nn.Module:
    """ReLU outputs read only by pooling: a max-pool after the stem, an average pool at the end."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 4))  # (an output size of 1 is a mean: it saves nothing)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_pooled_relu_outputs_decode_once_for_the_pool_and_the_relu(monkeypatch, channels_last):
    """A pooling input that is a ReLU output decodes to the ReLU mask's decode, in the output's
    memory format, and the ReLU's backward takes that same tensor: one unpack per ReLU, nothing else
    full-size, and gradients identical to plain autograd's."""
    unpacks, pooled = [], []
    real_mask, real_shape = ReluMaskCodec.decode_mask, ShapeOnlyCodec.decode
    monkeypatch.setattr(ReluMaskCodec, "decode_mask", lambda self, p: unpacks.append(p) or real_mask(self, p))
    monkeypatch.setattr(ShapeOnlyCodec, "decode", lambda self, p: pooled.append(real_shape(self, p)) or pooled[-1])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = images(hw=12).contiguous(memory_format=fmt)
    plain, model = make_pooled().to(memory_format=fmt), make_pooled().to(memory_format=fmt)
    compress_activations(model, RawCodec(), min_numel=1)
    assert_same_grads(step(plain, x), step(model, x), atol=0)
    assert len(unpacks) == 2 and len(pooled) == 2  # two ReLUs, each read by one pool
    for out in pooled:
        assert out.stride(0) > 0 and out.is_contiguous(memory_format=fmt)
        assert set(out.unique().tolist()) <= {0.0, 1.0}  # the mask's 0/1 decode


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gpu_pooled_relu_outputs_exact_gradients(channels_last):
    """On CUDA the max-pool backward picks its kernel by its input's memory format and reads the
    argmax indices in that format: the exact codecs' gradients equal plain autograd's in both formats."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        x = torch.randn(8, 3, 40, 40, device="cuda").contiguous(memory_format=fmt)
        grads = []
        for compressed in (False, True):
            model = make_pooled().cuda().to(memory_format=fmt)
            if compressed:
                compress_activations(model, RawCodec(), min_numel=1)
            model(x).square().sum().backward()
            grads.append([p.grad for p in model.parameters()])
    finally:
        torch.backends.cudnn.deterministic = deterministic
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_backend_torch_keeps_the_exact_codecs_on_the_pytorch_path(monkeypatch):
    """method.backend=torch is the reference everywhere: the masks and max-pool offsets too."""
    import division
    from division import exact
    calls = []
    monkeypatch.setattr(exact, "_fast_masks", lambda t: calls.append(t) or None)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 3, 16, 16)
    for backend, kernels in (("torch", False), ("auto", True)):
        method = division.build_method("division", backend=backend)
        method.attach(model)
        assert method.compressor._relu.kernels is kernels
        calls.clear()
        model(x).sum().backward()
        assert bool(calls) is kernels  # the kernel path is not even asked for under backend=torch
        method.detach()


class DecodeCountingCodec(DivisionCodec):
    """DIVISION that counts the decodes it runs (not the shared ones it hands out)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decodes = 0

    def _decode(self, packed, mask):
        self.decodes += 1
        return super()._decode(packed, mask)


def test_relu_zeros_serve_the_relu_backward(monkeypatch):
    """A ReLU output that is also a convolution's input (h feeds conv1 and down; relu1's output
    feeds conv2) is decoded with the mask's exact zeros, once per reader, and the last reader's
    decode serves the ReLU's backward: the mask's own 0/1 unpack runs only for relu2, whose output
    no codec keeps. The gradients of the convolutions reading those outputs get closer to exact
    backward."""
    from division.exact import shared_decode
    unpacks = []  # ReLU backward reads that decode their own mask (no shared decode left with it)
    real_decode = ReluMaskCodec.decode
    monkeypatch.setattr(ReluMaskCodec, "decode",
                        lambda self, p: unpacks.append(shared_decode(p) is None) or real_decode(self, p))
    x = images()
    reference = step(make_resnet(), x)
    results = {}
    for relu_zeros in (False, True):
        model = make_resnet()
        codec = DecodeCountingCodec(rounding="nearest", relu_zeros=relu_zeros)
        compress_activations(model, codec, min_numel=1)
        unpacks.clear()
        grads = step(model, x)
        results[relu_zeros] = (codec.decodes, sum(unpacks), grads)
    (paper_decodes, paper_unpacks, paper), (decodes, n_unpacks, zeros) = results[False], results[True]
    assert paper_unpacks == 3 and n_unpacks == 1
    assert decodes == paper_decodes
    # (conv2's input, one 8x8 block per map, already decodes its zeros as 0: no better, no worse)
    for name, better in (("conv1.weight", True), ("down.weight", True), ("conv2.weight", False)):
        err = lambda g: (g[name] - reference[name]).norm().item()  # noqa: E731
        assert err(zeros) < err(paper) if better else err(zeros) <= err(paper) * (1 + 1e-6), name


def test_relu_zeros_reference_decode():
    """Where the ReLU's output was 0 the decode is 0, where it was positive the decode is at least
    the dtype's smallest normal number; elsewhere it is the plain decode, so no element's error grows."""
    from division.exact import RELU_MASK, apply_relu_mask
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, 4, 12, 12).relu().to(dtype)
        x[:, :, :, :3] = 1e-30  # tiny positives (a subnormal or 0 in fp16): decoded positive still
        x = x.to(dtype)
        mask = ReluMaskCodec().encode(x)
        codec = DivisionCodec(rounding="nearest")
        plain = codec.decode(codec.encode(x))
        packed = codec.encode(x)
        packed.meta[RELU_MASK] = mask
        got = codec.decode(packed)
        assert torch.equal(got == 0, x == 0) and torch.equal(got > 0, x > 0), dtype
        assert (got[x > 0] >= torch.finfo(dtype).tiny).all(), dtype
        assert ((got.float() - x.float()).abs() <= (plain.float() - x.float()).abs()).all(), dtype
        assert torch.equal(got, apply_relu_mask(plain, mask)), dtype
        assert ReluMaskCodec().decode(mask) is got


def test_relu_zeros_keep_only_the_last_readers_decode():
    """With two readers (conv1 and down read h) the first decode is not kept with the mask (it
    would stay allocated through the other branch's backward); the second is; a second backward
    (retain_graph) counts again."""
    from division.exact import RELU_MASK, add_reader, shared_decode
    x = torch.randn(2, 4, 8, 8).relu()
    mask = ReluMaskCodec().encode(x)
    codec = DivisionCodec(rounding="nearest")
    packed = codec.encode(x)
    packed.meta[RELU_MASK] = mask
    add_reader(packed)
    for _ in range(2):
        first = codec.decode(packed)
        assert shared_decode(mask) is None
        second = codec.decode(packed)
        assert shared_decode(mask) is second and torch.equal(first, second)
        assert ReluMaskCodec().decode(mask) is second
