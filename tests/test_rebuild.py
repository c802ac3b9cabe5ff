"""method.rebuild_conv_input: a convolution's input that is ReLU(BN(x)) is rebuilt in backward from the
BatchNorm's stored input: no bytes in the ledger, exact ReLU zeros, gradients as close to plain
autograd's as without it; anything the chain cannot prove is stored as before."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import division
from division.ledger import ByteLedger
from division.rebuild import REBUILT
from tests.helpers import decodes_in_one_step

pytestmark = pytest.mark.usefixtures("one_thread")


def conv_bn_relu_conv(inplace: bool) -> nn.Sequential:
    """conv-BN-ReLU-conv, then BN-conv (no ReLU between), then a ReLU after a conv (not rebuilt)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=inplace),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=inplace),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).train()


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).train()


def _step(model: nn.Module, x: torch.Tensor, rebuild: bool, **knobs):
    """One training step under DIVISION: (ledger, parameter gradients, method)."""
    ledger = ByteLedger()
    method = division.build_method("division", seed=0, backend="torch", rebuild_conv_input=rebuild, **knobs)
    method.attach(model, ledger)
    labels = torch.arange(x.shape[0]) % 10
    F.cross_entropy(model(x), labels).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    method.detach()
    return ledger, grads


def _plain_grads(model: nn.Module, x: torch.Tensor) -> dict:
    labels = torch.arange(x.shape[0]) % 10
    F.cross_entropy(model(x), labels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _cosine(got: dict, ref: dict) -> float:
    g = torch.cat([got[n].flatten() for n in ref]).double()
    r = torch.cat([ref[n].flatten() for n in ref]).double()
    return F.cosine_similarity(g, r, dim=0).item()


def _bytes_saved(codec, ledger: ByteLedger) -> int:
    """What the codec would store for the rebuilt tensors."""
    return sum(codec.closed_form_nbytes(e.shape, getattr(torch, e.dtype)) for e in ledger.entries
               if e.codec == REBUILT)


@pytest.mark.parametrize("inplace", [False, True])
def test_small_net_ledger_rebuilds_the_conv_inputs_after_batchnorm_with_exact_bytes(inplace):
    x = torch.randn(4, 3, 16, 16)
    off, _ = _step(conv_bn_relu_conv(inplace), x, False)
    on, _ = _step(conv_bn_relu_conv(inplace), x, True)
    rebuilt = [e for e in on.entries if e.codec == REBUILT]
    # conv "3" reads ReLU(BN "1"), conv "5" reads BN "4"; the Linear reads a pooled map: stored
    assert [(e.layer, e.rebuilt_from, e.stored_bytes) for e in rebuilt] == [("3", "1", 0), ("5", "4", 0)]
    assert "rebuilt" not in off.by_codec()
    assert [(r["layer"], r["rebuilt_from"], r["tensor_bytes"]) for r in on.rebuilt()] == [
        ("3", "1", 4 * 16 * 16 * 16 * 4), ("5", "4", 4 * 16 * 16 * 16 * 4)]
    assert on.plain_bytes == off.plain_bytes  # the plain reference is the same; only storage changes
    codec = division.build_method("division", backend="torch").codec
    saved = _bytes_saved(codec, on)
    assert saved == 2 * codec.closed_form_nbytes((4, 16, 16, 16), torch.float32)
    assert on.stored_bytes == off.stored_bytes - saved
    # the ReLU output is counted once in plain bytes (at the ReLU's save), the BN output at the conv's
    assert [e.plain_bytes for e in rebuilt] == [0, 4 * 16 * 16 * 16 * 4]
    assert on.by_op()["Conv2d"]["stored_bytes"] == off.by_op()["Conv2d"]["stored_bytes"] - saved


def test_resnet18_rebuilds_each_basic_blocks_second_conv_input_with_exact_bytes():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    off, g_off = _step(_resnet18(), x, False)
    on, g_on = _step(_resnet18(), x, True)
    rebuilt = [(e.layer, e.rebuilt_from) for e in on.entries if e.codec == REBUILT]
    # a BasicBlock's ReLU module runs twice (after bn1, and after the residual sum): only the first
    # feeds a conv from a BatchNorm; the stem's ReLU feeds max pooling, which stores nothing anyway
    assert rebuilt == [(f"layer{i}.{j}.conv2", f"layer{i}.{j}.bn1") for i in range(1, 5) for j in range(2)]
    codec = division.build_method("division", backend="torch").codec
    assert on.stored_bytes == off.stored_bytes - _bytes_saved(codec, on)
    assert on.plain_bytes == off.plain_bytes
    assert on.coverage == off.coverage
    plain = _plain_grads(_resnet18(), x)
    # random images at 32x32 through an ImageNet ResNet, batch 2 (layer4's BatchNorm normalizes two
    # values per channel): both are far from plain here (measured 0.575 without, 0.565 with)
    assert _cosine(g_on, plain) > _cosine(g_off, plain) - 0.03


@pytest.mark.parametrize("inplace", [False, True])
def test_gradients_agree_with_plain_autograd_as_closely_as_without_rebuilds(inplace):
    torch.manual_seed(1)
    x = torch.randn(8, 3, 16, 16)
    plain = _plain_grads(conv_bn_relu_conv(inplace), x)
    for bits, floor in ((2, 0.9), (8, 0.999)):
        _, g_off = _step(conv_bn_relu_conv(inplace), x, False, bits=bits)
        _, g_on = _step(conv_bn_relu_conv(inplace), x, True, bits=bits)
        assert _cosine(g_on, plain) > floor, bits
        assert _cosine(g_on, plain) > _cosine(g_off, plain) - 0.02, bits


@pytest.mark.parametrize("inplace", [False, True])
def test_the_rebuilt_input_has_the_true_inputs_zeros_exactly(inplace):
    model = conv_bn_relu_conv(inplace)
    true = {}
    model[2].register_forward_hook(lambda m, args, out: true.update(relu=out.detach().clone()))
    model[3].register_forward_hook(lambda m, args, out: true.update(conv=out))
    method = division.build_method("division", seed=0, backend="torch", bits=8, rebuild_conv_input=True)
    ledger = ByteLedger()
    method.attach(model, ledger)
    loss = model(torch.randn(4, 3, 16, 16)).sum()
    assert [e.layer for e in ledger.entries if e.codec == REBUILT] == ["3", "5"]
    rebuilt = true["conv"].grad_fn._saved_input  # reading conv "3"'s saved input unpacks it: the rebuild
    assert torch.equal(rebuilt == 0, true["relu"] == 0)
    scale = (true["relu"].amax() - true["relu"].amin()).item()
    assert (rebuilt - true["relu"]).abs().max().item() < 0.02 * scale  # 8 bits: close to the true input
    loss.backward()  # and backward still runs through it
    method.detach()


def test_one_decode_of_the_batchnorm_input_serves_the_rebuild_and_the_batchnorm():
    """Backward decodes the BatchNorm input once for both readers: the rebuilt conv input costs no
    decode of its own (one decode fewer than storing it)."""
    x = torch.randn(4, 3, 16, 16)
    counts = {on: decodes_in_one_step(conv_bn_relu_conv(True), lambda m: m(x).sum(), rebuild_conv_input=on)
              for on in (False, True)}
    assert counts[True] == counts[False] - 2


class _FunctionalRelu(nn.Module):
    """BN then torch.relu outside any ReLU module: its mask is not kept exactly, so no rebuild."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x)))).mean((2, 3))


class _ChangedInPlace(nn.Module):
    """BN-ReLU, then the ReLU output changed in place (no grad) before the conv reads it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.relu, self.conv2 = (nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                      nn.ReLU(), nn.Conv2d(8, 8, 3))

    def forward(self, x):
        y = self.relu(self.bn(self.conv1(x)))
        with torch.no_grad():
            y.mul_(2)
        return self.conv2(y).mean((2, 3))


def _eval_norm() -> nn.Module:
    model = conv_bn_relu_conv(False)
    model[1].eval()  # running statistics: not what this step's batch statistics rebuild
    model[4].eval()
    return model


@pytest.mark.parametrize("make", [_FunctionalRelu, _ChangedInPlace, _eval_norm])
def test_what_the_chain_cannot_prove_is_stored_as_before(make):
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    off, g_off = _step(make().train() if make is not _eval_norm else make(), x, False)
    torch.manual_seed(0)
    on, g_on = _step(make().train() if make is not _eval_norm else make(), x, True)
    assert REBUILT not in on.by_codec()
    assert on.stored_bytes == off.stored_bytes
    for name in g_off:
        assert torch.equal(g_on[name], g_off[name]), name


def test_a_batchnorm_weight_changed_between_forward_and_backward_is_refused():
    model = conv_bn_relu_conv(False)
    method = division.build_method("division", seed=0, backend="torch", rebuild_conv_input=True)
    method.attach(model)
    loss = model(torch.randn(2, 3, 16, 16)).sum()
    with torch.no_grad():
        model[1].weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        loss.backward()
    method.detach()


KNOBS = ["rebuild_conv_input", "recompute_norm_input"]  # (recompute_norm_input: tests/test_recompute.py)


@pytest.mark.parametrize("knob", KNOBS)
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_the_knobs_must_be_bools(knob, value):
    with pytest.raises(ValueError, match=f"{knob} must be true or false"):
        division.build_method("division", **{knob: value})


@pytest.mark.parametrize("knob", KNOBS)
def test_the_knobs_are_off_by_default_and_recorded(knob):
    method = division.build_method("division", backend="torch")
    assert getattr(method, knob) is False
    assert method.describe()[knob] is False
    assert division.build_method("division", backend="torch", **{knob: True}).describe()[knob] is True


def test_a_model_with_nothing_to_rebuild_says_so_once():
    """The knob on and no chain proved (here a functional ReLU): a warning, not silence."""
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(RuntimeWarning, match="rebuild_conv_input=true rebuilt no convolution input"):
        _step(_FunctionalRelu().train(), x, True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a model whose chains are rebuilt: no warning
        _step(conv_bn_relu_conv(False), x, True)


def _mlp(activation: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), activation, nn.Linear(128, 10)).train()


@pytest.mark.parametrize("activation", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()],
                         ids=["gelu", "gelu_tanh", "silu"])
def test_an_activation_output_is_rebuilt_from_the_activation_stored_input(activation):
    """A GELU's or SiLU's output read by a Linear is not stored: its ledger row is rebuilt, zero
    bytes, from the activation's layer, and the step keeps exactly the bytes of its codes fewer.
    The gradients follow plain autograd as closely as with it stored (8 bits), and backward decodes
    the activation's input once for the rebuild and the activation's backward (one decode fewer)."""
    x = torch.randn(16, 32)
    plain = _plain_grads(_mlp(activation), x)
    (stored, grads_stored), (rebuilt, grads_rebuilt) = (
        _step(_mlp(activation), x, on, bits=8, rounding="nearest") for on in (False, True))
    rows = [e for e in rebuilt.entries if e.codec == REBUILT]
    assert [(e.layer, e.rebuilt_from, e.shape, e.stored_bytes) for e in rows] == [("2", "1", (16, 128), 0)]
    kept = [e.stored_bytes for e in stored.entries if e.layer == "2" and e.shape == (16, 128)]
    assert len(kept) == 1 and stored.stored_bytes - rebuilt.stored_bytes == kept[0] > 0
    assert _cosine(grads_rebuilt, plain) > 0.9999 and abs(_cosine(grads_rebuilt, plain) - _cosine(grads_stored, plain)) < 1e-4
    counts = {on: decodes_in_one_step(_mlp(activation), lambda m: m(x).sum(), rebuild_conv_input=on)
              for on in (False, True)}
    assert counts[True] == counts[False] - 1


def _small_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=4,
                                                hidden_dim=32, mlp_dim=128, num_classes=10)


def _small_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], num_classes=10)


@pytest.mark.parametrize("make, rebuilt", [
    (_small_vit, [(f"encoder.layers.encoder_layer_{i}.{reader}", f"encoder.layers.encoder_layer_{i}.{source}")
                  for i in range(2) for reader, source in (("self_attention", "ln_1"), ("mlp.0", "ln_2"),
                                                           ("mlp.3", "mlp.1"))]),
    (_small_convnext, [(f"features.{stage}.{block}.block.{reader}", f"features.{stage}.{block}.block.{source}")
                       for stage, block in ((1, 0), (1, 1), (3, 0)) for reader, source in ((3, 2), (5, 4))])],
    ids=["vit", "convnext"])
def test_each_transformer_and_convnext_block_rebuilds_its_layer_norm_and_gelu_outputs(make, rebuilt):
    """Every block of a ViT (LayerNorm -> attention, LayerNorm -> Linear, GELU -> Linear) and of a
    ConvNeXt (LayerNorm -> Linear, GELU -> Linear; their inputs flattened to rows) rebuilds those
    readers' inputs from the LayerNorm's and the GELU's stored inputs: exactly these rows, zero
    bytes each, and the step keeps fewer bytes by exactly what they would have stored. (ConvNeXt's
    downsampling LayerNorms are read through a permute: stored as before.)"""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    (stored, _), (rebuilt_ledger, _) = (_step(make().train(), x, on) for on in (False, True))
    rows = [e for e in rebuilt_ledger.entries if e.codec == REBUILT]
    assert [(e.layer, e.rebuilt_from) for e in rows] == rebuilt and all(e.stored_bytes == 0 for e in rows)
    # the two steps save the same tensors in the same order: a rebuilt row is a stored one there
    pairs = list(zip(stored.entries, rebuilt_ledger.entries, strict=True))
    assert all((a.layer, a.shape) == (b.layer, b.shape) for a, b in pairs)
    assert stored.stored_bytes - rebuilt_ledger.stored_bytes == sum(
        a.stored_bytes for a, b in pairs if b.codec == REBUILT) > 0


def test_a_layer_norm_output_follows_plain_gradients_and_a_changed_weight_is_refused():
    """LayerNorm -> Linear: the Linear's input is LayerNorm(x_hat) with the module's parameters;
    at 8 bits the gradients follow plain autograd as closely as with it stored. A LayerNorm weight
    changed in place between forward and backward is refused, not silently used."""
    def block():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 10)).train()
    x = torch.randn(16, 32)
    plain = _plain_grads(block(), x)
    (_, grads_stored), (ledger, grads_rebuilt) = (_step(block(), x, on, bits=8, rounding="nearest")
                                                  for on in (False, True))
    assert [(e.layer, e.rebuilt_from) for e in ledger.entries if e.codec == REBUILT] == [("2", "1")]
    assert _cosine(grads_rebuilt, plain) > 0.9999 and abs(_cosine(grads_rebuilt, plain) - _cosine(grads_stored, plain)) < 1e-4
    model = block()
    method = division.build_method("division", seed=0, backend="torch", rebuild_conv_input=True)
    method.attach(model)
    loss = model(x).sum()
    with torch.no_grad():
        model[1].weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        loss.backward()
    method.detach()
