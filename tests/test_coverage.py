"""Coverage of every saved activation (cover_all): transformers and modern CNNs are compressed, the
ledger names the operators and the coverage, statistics stay exact, and low coverage warns."""
import warnings

import pytest
import torch
import torchvision
from torch import nn

import division
from division.layouts import NHWC, ROWS, TOKENS, LayoutCodec, NormalizedCodec, fit
from division.ledger import ByteLedger


def _step(model, x, **knobs):
    ledger = ByteLedger()
    method = division.build_method("division", seed=0, backend="torch", **knobs)
    method.attach(model, ledger)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x).float().square().mean().backward()
    method.detach()
    return ledger, [str(w.message) for w in caught if "compresses" in str(w.message)]


def _small_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=4,
                                                hidden_dim=64, mlp_dim=128, num_classes=10).train()


def test_a_vit_is_compressed_by_operator_with_exact_statistics_and_no_warning():
    ledger, warned = _step(_small_vit(), torch.randn(4, 3, 32, 32))
    assert not warned
    assert ledger.coverage > 0.98
    ops = ledger.by_op()
    for op in ("MultiheadAttention", "Linear", "GELU", "LayerNorm"):
        assert ops[op]["plain_bytes"] > 0 and ops[op]["stored_bytes"] < ops[op]["plain_bytes"] / 4, op
    assert ledger.ratio > 6
    # LayerNorm's mean / rstd and attention's log-sum-exp are not differentiable outputs: kept exactly
    raw = [e for e in ledger.entries if not e.compressed]
    assert raw and all(e.codec == "raw" for e in raw)


def test_without_cover_all_a_vit_warns_with_the_fraction_and_the_operators_kept_raw():
    ledger, warned = _step(_small_vit(), torch.randn(4, 3, 32, 32), cover_all=False)
    assert ledger.coverage < 0.9
    assert len(warned) == 1 and f"{ledger.coverage:.1%}" in warned[0] and "GELU" in warned[0]


def test_parameters_and_their_copies_are_never_compressed():
    model = _small_vit()
    ledger, _ = _step(model, torch.randn(2, 3, 32, 32))
    param_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.t().shape) for p in model.parameters()
                                                                   if p.dim() == 2}
    # the class token expanded to the batch derives from a parameter alone: not an activation
    assert not any(e.shape in param_shapes and e.compressed and e.plain_bytes for e in ledger.entries
                   if e.shape[0] != 2 and len(e.shape) == 2)


@pytest.mark.parametrize("shape,feature_last,layout", [
    ((2, 7, 7, 96), False, NHWC), ((2, 96, 14, 14), True, NHWC), ((2, 96, 14, 14), False, None),
    ((2, 12, 197, 64), False, None), ((2, 197, 64), False, TOKENS), ((394, 64), False, ROWS),
    ((2, 64), True, None)])
def test_layouts_fit_shapes(shape, feature_last, layout):
    assert fit(torch.empty(shape), feature_last) == layout


@pytest.mark.parametrize("shape", [(2, 9, 9, 24), (3, 50, 16), (40, 24), (2 * 36 * 36, 24), (4099, 8)])
def test_layout_codec_round_trips_within_the_codec_bound(shape):
    from division.dual_precision import DivisionCodec as DualPrecisionCodec
    torch.manual_seed(0)
    x = torch.randn(shape)
    base = DualPrecisionCodec(block_size=4, bits=8, rounding="nearest")
    codec = LayoutCodec(base, fit(x, False))
    packed = codec.encode(x)
    y = codec.decode(packed)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (y - x).abs().max() < 0.05 * x.abs().max()
    assert packed.nbytes == codec.closed_form_nbytes(tuple(x.shape), x.dtype)


@pytest.mark.parametrize("rows,group", [(401408, 2048), (128 * 197, 1576), (394, 394), (2 * 36 * 36, 1296),
                                        (4099, 4099), (7, 7)])
def test_flattened_rows_are_coded_in_groups_of_rows(rows, group):
    """(M, C) rows are coded as M / R sequences (row_group): each group its own quantization step
    per channel, and as many maps as groups for the kernels, not one (1, C, M, 1) map."""
    from division.layouts import _view, row_group
    assert row_group(rows, 8) == group
    view = _view(torch.empty(rows, 24, device="meta"), ROWS, 8)
    assert tuple(view.shape) == (rows // group, 24, group, 1)
    x = torch.randn(rows if rows < 10000 else 16, 24)
    assert _view(x, ROWS, 8).data_ptr() == x.data_ptr()  # a view of x's storage, not a copy


def test_normalized_codec_bounds_the_error_relative_to_each_tokens_own_spread():
    """LayerNorm's backward divides by each token's spread: a quiet token beside loud ones must keep
    its small error, which one quantization step per channel over all tokens cannot give it."""
    from division.dual_precision import DivisionCodec
    torch.manual_seed(0)
    x = torch.randn(2, 64, 32) * torch.logspace(-2, 1, 64).view(1, 64, 1)  # token scales over 1000x
    base = LayoutCodec(DivisionCodec(block_size=8, bits=2, rounding="nearest"), TOKENS)

    def relative_error(codec):
        packed = codec.encode(x)
        return ((codec.decode(packed) - x).std(-1) / x.std(-1)).mean(), packed
    plain_err, _ = relative_error(base)
    normalized = NormalizedCodec(base, 1)
    norm_err, packed = relative_error(normalized)
    assert norm_err < plain_err / 3
    assert packed.nbytes == normalized.closed_form_nbytes(tuple(x.shape), x.dtype)


@pytest.mark.parametrize("name", ["convnext_tiny", "efficientnet_b0", "mobilenet_v3_large"])
def test_modern_cnns_reach_8x_with_full_coverage(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).train()
    ledger, warned = _step(model, torch.randn(2, 3, 64, 64))
    assert not warned and ledger.coverage > 0.95
    assert ledger.ratio > 5.5  # 64x64: small late maps cost more LFC per element (224: 10-13x, docs/results.md)


def test_gradients_match_exact_backward_at_8_bits():
    from division.fidelity import gradient_fidelity
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def make():
        model = _small_vit()
        nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialised: no gradient below it
        return model
    r = gradient_fidelity(make, "division", x, y, bits=8, backend="torch")
    assert r["overall_cosine"] > 0.999
