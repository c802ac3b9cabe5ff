"""method.recompute_norm_input: a BatchNorm's input made by a pointwise (1x1) convolution is recomputed in
backward from the convolution's stored input: no bytes in the ledger, the same gradients as storing it
when the input is stored exactly, one decode of the convolution's input for both backwards; anything
the chain cannot prove is stored as before."""
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import division
from division.codec import RawCodec
from division.compressor import compress_activations
from division.ledger import RECOMPUTED, REBUILT, ByteLedger
from tests.helpers import decodes_in_one_step

pytestmark = pytest.mark.usefixtures("one_thread")


class Bottleneck(nn.Module):
    """1x1 (bias, stride 2, groups 2) -> BN -> ReLU -> 3x3 -> BN -> ReLU -> 1x1 -> BN, and a 1x1
    shortcut -> BN: three pointwise convolutions' outputs are BatchNorm inputs, the 3x3's is not."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 1, stride=2, groups=2)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 32, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.short = nn.Conv2d(8, 32, 1, stride=2, bias=False)
        self.bn_short = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.relu(self.bn3(self.conv3(y)) + self.bn_short(self.short(x)))
        return self.head(y.mean((2, 3)))


def _bottleneck() -> nn.Module:
    torch.manual_seed(0)
    return Bottleneck().train()


def _grads(model: nn.Module) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), torch.arange(x.shape[0], device=x.device) % 10)


def _step(model: nn.Module, x: torch.Tensor, recompute: bool, **knobs):
    """One training step under DIVISION: (ledger, parameter gradients)."""
    ledger = ByteLedger()
    method = division.build_method("division", seed=0, backend="torch", recompute_norm_input=recompute, **knobs)
    method.attach(model, ledger)
    _loss(model, x).backward()
    method.detach()
    return ledger, _grads(model)


def _plain_grads(model: nn.Module, x: torch.Tensor) -> dict:
    _loss(model, x).backward()
    return _grads(model)


def _cosine(got: dict, ref: dict) -> float:
    g = torch.cat([got[n].flatten() for n in ref]).double()
    r = torch.cat([ref[n].flatten() for n in ref]).double()
    return F.cosine_similarity(g, r, dim=0).item()


def _recomputed(ledger: ByteLedger) -> list:
    return [(e.layer, e.rebuilt_from, e.stored_bytes) for e in ledger.entries if e.codec == RECOMPUTED]


def test_pointwise_convolutions_outputs_are_recomputed_with_exact_bytes():
    x = torch.randn(4, 8, 16, 16)
    off, _ = _step(_bottleneck(), x, False)
    on, _ = _step(_bottleneck(), x, True)
    assert _recomputed(on) == [("bn1", "conv1", 0), ("bn3", "conv3", 0), ("bn_short", "short", 0)]
    assert RECOMPUTED not in off.by_codec()
    assert on.plain_bytes == off.plain_bytes  # the plain reference is the same; only storage changes
    codec = division.build_method("division", backend="torch").codec
    saved = sum(codec.closed_form_nbytes(shape, torch.float32)
                for shape in ((4, 16, 8, 8), (4, 32, 8, 8), (4, 32, 8, 8)))
    assert on.stored_bytes == off.stored_bytes - saved
    assert on.by_op()["BatchNorm2d"]["stored_bytes"] == off.by_op()["BatchNorm2d"]["stored_bytes"] - saved
    assert [(r["layer"], r["how"], r["rebuilt_from"], r["tensor_bytes"]) for r in on.rebuilt()] == [
        ("bn1", RECOMPUTED, "conv1", 4 * 16 * 8 * 8 * 4), ("bn3", RECOMPUTED, "conv3", 4 * 32 * 8 * 8 * 4),
        ("bn_short", RECOMPUTED, "short", 4 * 32 * 8 * 8 * 4)]


@pytest.mark.parametrize("channels_last, autocast", [(False, False), (True, False), (False, True)])
def test_with_exactly_stored_inputs_the_gradients_are_plain_autograds_bit_for_bit(channels_last, autocast):
    """A lossless codec isolates the recompute: stride, groups, bias and memory format must be
    the forward's, and under autocast its copies of the input and weight, or the BatchNorms'
    gradients differ."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 8, 16, 16).contiguous(memory_format=fmt)

    def grads(recompute: bool):
        model = _bottleneck().to(memory_format=fmt)
        ledger = ByteLedger()
        with compress_activations(model, RawCodec() if recompute else None, ledger=ledger,
                                  recompute_norm_input=recompute):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                _loss(model, x).backward()
        return ledger, _grads(model)

    _, plain = grads(False)
    ledger, got = grads(True)
    assert [layer for layer, _, _ in _recomputed(ledger)] == ["bn1", "bn3", "bn_short"]
    for name in plain:
        assert torch.equal(got[name], plain[name]), name


def test_a_depthwise_convolutions_output_is_recomputed_too():
    """Depthwise (one group per channel, as in MobileNet and EfficientNet blocks): kh * kw
    multiply-adds per output, cheap to run again; with exact storage, plain autograd's gradients."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(8, 8, 5, padding=2, stride=2, groups=8), nn.BatchNorm2d(8), nn.SiLU(),
                             nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(16, 10)).train()
    x = torch.randn(4, 8, 16, 16)
    plain = _plain_grads(model(), x)
    exact = model()
    ledger = ByteLedger()
    with compress_activations(exact, RawCodec(), ledger=ledger, recompute_norm_input=True):
        _loss(exact, x).backward()
    assert _recomputed(ledger) == [("1", "0", 0)]  # the 3x3 full convolution's BatchNorm ("4") is stored
    got = _grads(exact)
    for name in plain:
        assert torch.equal(got[name], plain[name]), name


def test_resnet50_recomputes_every_pointwise_convolutions_batchnorm_input():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    on, _ = _step(torchvision.models.resnet50(num_classes=10).train(), x, True, rebuild_conv_input=True)
    blocks = [(i, j) for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)]
    expected = []
    for i, j in blocks:
        expected += [(f"layer{i}.{j}.bn1", f"layer{i}.{j}.conv1"), (f"layer{i}.{j}.bn3", f"layer{i}.{j}.conv3")]
        if j == 0:
            expected.append((f"layer{i}.{j}.downsample.1", f"layer{i}.{j}.downsample.0"))
    assert [(layer, source) for layer, source, _ in _recomputed(on)] == expected
    # with rebuild_conv_input the 3x3 and the last 1x1 convolution read rebuilt inputs, and conv3's
    # BatchNorm input is recomputed from its rebuilt input: a chain of two
    rebuilt = [(e.layer, e.rebuilt_from) for e in on.entries if e.codec == REBUILT]
    assert rebuilt == [(f"layer{i}.{j}.conv{k}", f"layer{i}.{j}.bn{k - 1}") for i, j in blocks for k in (2, 3)]


@pytest.mark.parametrize("rebuild", [False, True])
def test_gradients_agree_with_plain_autograd_as_closely_as_storing_the_inputs(rebuild):
    torch.manual_seed(1)
    x = torch.randn(8, 8, 16, 16)
    plain = _plain_grads(_bottleneck(), x)
    for bits, floor in ((2, 0.9), (8, 0.999)):
        _, g_off = _step(_bottleneck(), x, False, bits=bits, rebuild_conv_input=rebuild)
        _, g_on = _step(_bottleneck(), x, True, bits=bits, rebuild_conv_input=rebuild)
        assert _cosine(g_on, plain) > floor, bits
        assert _cosine(g_on, plain) > _cosine(g_off, plain) - 0.02, bits


def test_one_decode_of_the_convolution_input_serves_the_recompute_and_the_convolution():
    """Backward decodes a pointwise convolution's input once for both readers, and never decodes the
    BatchNorm input it no longer stores: one decode fewer per recomputed tensor."""
    x = torch.randn(4, 8, 16, 16)
    counts = {on: decodes_in_one_step(_bottleneck(), lambda m: _loss(m, x), recompute_norm_input=on)
              for on in (False, True)}
    assert counts[True] == counts[False] - 3


class _FunctionalConv(nn.Module):
    """A 1x1 convolution called functionally, outside any Conv module: nothing proves its output."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8, 1, 1) * 0.3)
        self.bn, self.head = nn.BatchNorm2d(16), nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.bn(F.conv2d(x, self.w)).mean((2, 3)))


class _ChangedInPlace(nn.Module):
    """A 1x1 convolution's output changed in place (no grad) before the BatchNorm reads it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.Linear(16, 10)

    def forward(self, x):
        y = self.conv(x)
        with torch.no_grad():
            y.mul_(2)
        return self.head(self.bn(y).mean((2, 3)))


class _Spatial(nn.Module):
    """A 3x3 convolution before the BatchNorm: recomputing it would cost a full convolution."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("make", [_FunctionalConv, _ChangedInPlace, _Spatial])
def test_what_the_chain_cannot_prove_is_stored_as_before(make):
    x = torch.randn(2, 8, 16, 16)
    torch.manual_seed(0)
    off, g_off = _step(make().train(), x, False)
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="recompute_norm_input=true recomputed no normalization input"):
        on, g_on = _step(make().train(), x, True)
    assert RECOMPUTED not in on.by_codec()
    assert on.stored_bytes == off.stored_bytes
    for name in g_off:
        assert torch.equal(g_on[name], g_off[name]), name


def test_a_model_with_recomputes_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _step(_bottleneck(), torch.randn(2, 8, 16, 16), True)


def test_a_convolution_weight_changed_between_forward_and_backward_is_refused():
    model = _bottleneck()
    method = division.build_method("division", seed=0, backend="torch", recompute_norm_input=True)
    method.attach(model)
    loss = _loss(model, torch.randn(2, 8, 16, 16))
    with torch.no_grad():
        model.conv3.weight.mul_(2)
    with pytest.raises(RuntimeError, match="conv3 were modified in place between forward and backward"):
        loss.backward()
    method.detach()


# (the knob's validation and record: tests/test_rebuild.py, with rebuild_conv_input's)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_cudnns_batchnorm_is_rebuilt_and_pointwise_outputs_recomputed(dtype):
    """On a GPU (cuDNN's BatchNorm node, the fused codec, channels_last, autocast): both knobs find
    their chains, and with exactly stored inputs the gradients are plain autograd's to rounding."""
    x = torch.randn(8, 8, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)

    def model():
        return _bottleneck().cuda().to(memory_format=torch.channels_last)

    with autocast:
        plain = _plain_grads(model(), x)
    exact = model()
    ledger = ByteLedger()
    with compress_activations(exact, RawCodec(), ledger=ledger, recompute_norm_input=True, rebuild_conv_input=True):
        with autocast:
            _loss(exact, x).backward()
    assert [layer for layer, _, _ in _recomputed(ledger)] == ["bn1", "bn3", "bn_short"]
    assert [e.layer for e in ledger.entries if e.codec == REBUILT] == ["conv2", "conv3"]
    assert _cosine(_grads(exact), plain) > 0.99999
    for bits, floor in ((2, 0.9), (8, 0.999)):
        coded = model()
        ledger = ByteLedger()
        method = division.build_method("division", seed=0, bits=bits, recompute_norm_input=True,
                                       rebuild_conv_input=True)
        method.attach(coded, ledger)
        with autocast:
            _loss(coded, x).backward()
        method.detach()
        assert [layer for layer, _, _ in _recomputed(ledger)] == ["bn1", "bn3", "bn_short"], bits
        assert [e.layer for e in ledger.entries if e.codec == REBUILT] == ["conv2", "conv3"], bits
        assert _cosine(_grads(coded), plain) > floor, bits
