"""DIVISION inside torch.compile (division/compiled.py): the compiled graph keeps the codes, not the
activations, and its gradients are those of the decoded activations.

Compiling costs seconds on the CPU, so one small residual network (a block input read by two
convolutions, BatchNorm, ReLU, pooling, a linear head) is compiled once per method and shared.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import division
from division.compiled import (CompiledLayers, TensorCodec, _Conv, _Linear, _Relu,
                               hash_dither)
from division.dual_precision import DivisionCodec
from division.methods import CompileUnsupported


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus a 1x1 convolution shortcut: the input is read by two convolutions."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                         Block(16, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def batch(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def step(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def cosine(a: dict, b: dict) -> float:
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])  # noqa: E731
    return float(F.cosine_similarity(flat(a), flat(b), dim=0))


# ------------------------------------------------------------------------------------- the codec
@pytest.mark.parametrize("shape", [(2, 3, 13, 10), (4, 6), (2, 5, 7), (2, 3, 1, 1)])
@pytest.mark.parametrize("bits", [1, 2, 8])
def test_tensor_codec_stores_what_the_eager_codec_stores(shape, bits):
    """Nearest rounding: the same tensors as DivisionCodec (the eager reference), the same bytes,
    and a decode within half a step of the input."""
    x = torch.randn(shape) * 3 + 1
    codec = TensorCodec(block_size=4, bits=bits, rounding="nearest")
    layout, stored = codec.encode(x)
    eager = DivisionCodec(block_size=4, bits=bits, rounding="nearest").encode(x)
    assert [t.dtype for t in stored] == [t.dtype for t in eager.tensors.values()]
    for mine, theirs in zip(stored, eager.tensors.values()):
        assert torch.equal(mine, theirs)
    assert sum(t.numel() * t.element_size() for t in stored) == codec.nbytes(x.shape, x.dtype) \
        == DivisionCodec(block_size=4, bits=bits).closed_form_nbytes(x.shape, x.dtype)
    x_hat = codec.decode(layout, stored)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    assert torch.allclose(x_hat, DivisionCodec(block_size=4, bits=bits).decode(eager))


@pytest.mark.parametrize("shape, feature_last, view", [
    ((2, 65, 32), True, "cls_grid"), ((2, 64, 32), True, "grid"), ((2, 7, 7, 32), True, "nhwc"),
    ((2, 10, 32), True, "tokens"), ((96, 24), False, "rows"), ((2, 65, 32), False, "cls_grid")])
def test_tensor_codec_codes_through_the_eager_paths_views(shape, feature_last, view):
    """Given who saves a tensor (a Linear or LayerNorm input: features last), the compiled codec
    codes it through the view the eager path fits (``division.layouts``): a token grid in B x B
    blocks with the class token exact, an (N, H, W, C) map per channel, flattened rows in groups.
    Same bytes as the eager LayoutCodec, the same decode (nearest rounding), the tensor's shape."""
    from division.layouts import LayoutCodec
    x = torch.randn(shape) * 3
    codec = TensorCodec(block_size=8, bits=2, rounding="nearest")
    layout, stored = codec.encode(x, feature_last=feature_last)
    eager = LayoutCodec(DivisionCodec(block_size=8, bits=2, rounding="nearest"), view)
    packed = eager.encode(x)
    assert layout.view == view
    assert sum(t.numel() * t.element_size() for t in stored) == packed.nbytes \
        == codec.nbytes(shape, x.dtype, feature_last)
    x_hat = codec.decode(layout, stored)
    assert x_hat.shape == x.shape and torch.equal(x_hat, eager.decode(packed))
    if view == "cls_grid":
        assert torch.equal(x_hat[:, 0], x[:, 0])  # the class token, exactly


@pytest.mark.parametrize("shape", [(3, 10), (2, 7, 5), (2, 3, 13, 10), (2, 3, 4, 5, 6), (2, 3, 1, 1), (1, 2, 9, 1)])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("parts", [(True, True), (True, False), (False, True)])
def test_reference_encode_fake_gives_the_real_outputs_shapes(shape, bits, parts):
    """The opaque reference encode's fake implementation (what tracing sees) computes its outputs'
    shapes instead of running the codec: they are the real outputs' shapes, dtypes and strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = torch.randn(shape)
    args = (8, bits, "stochastic", *parts)
    real = torch.ops.division.encode_reference(x, *args)
    with FakeTensorMode() as mode:
        fake = torch.ops.division.encode_reference(mode.from_tensor(x), *args)
    assert [(tuple(t.shape), t.dtype, t.stride()) for t in fake] == \
        [(tuple(t.shape), t.dtype, t.stride()) for t in real]


def test_tensor_codec_stochastic_error_is_below_one_step_and_unbiased():
    x = torch.randn(16, 8, 16, 16)
    codec = TensorCodec(block_size=8, bits=2)
    layout, stored = codec.encode(x)
    step = stored[-1].float()[:, :, None, None]
    err = codec.decode(layout, stored) - x
    assert (err.abs() < step * 1.001 + 1e-6).all()
    # unbiased on average: the mean error is a small fraction of the mean step
    assert err.mean().abs() < 0.01 * step.mean()


def test_hash_dither_is_uniform_and_a_function_of_value_and_position():
    x = torch.randn(64, 16, 32, 32)
    u = hash_dither(x)
    assert 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, 10, 0, 1) / u.numel()
    assert (counts - 0.1).abs().max() < 0.002
    assert torch.equal(u, hash_dither(x.clone()))              # pure: the same input, the same draws
    zeros = hash_dither(torch.zeros(100_000))                   # equal values at other positions differ
    assert zeros.unique().numel() > 99_000


def test_channels_last_and_bf16_round_trip():
    x = torch.randn(2, 8, 12, 12).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    codec = TensorCodec(block_size=4, bits=8, rounding="nearest")
    layout, stored = codec.encode(x)
    x_hat = codec.decode(layout, stored)
    assert x_hat.dtype == torch.bfloat16 and x_hat.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x_hat.float(), x.float(), atol=0.02, rtol=0.01)


# ------------------------------------------------------------------- the layers, run eagerly
def test_layer_functions_give_exact_backward_with_a_near_lossless_codec():
    """B = 1, Q = 8: the decode is within fp32/bf16 rounding of the input, so every layer's
    gradients match autograd's through the plain ops."""
    codec = TensorCodec(block_size=1, bits=8, rounding="nearest")
    torch.manual_seed(0)
    x = torch.randn(4, 6, 9, 9, requires_grad=True)
    w = torch.randn(5, 6, 3, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    cases = {
        "conv": (lambda x, w, b: _Conv.apply(x, w, b, codec, [2, 2], [1, 1], [1, 1], False, [0, 0], 1),
                 lambda x, w, b: F.conv2d(x, w, b, 2, 1)),
        "linear": (lambda x, w, b: _Linear.apply(x.flatten(1)[:, :45], w.flatten(1)[:, :45], b, codec),
                   lambda x, w, b: F.linear(x.flatten(1)[:, :45], w.flatten(1)[:, :45], b)),
        "relu": (lambda x, w, b: _Relu.apply(x) * 1.5, lambda x, w, b: torch.relu(x) * 1.5),
    }
    for name, (mine, reference) in cases.items():
        grads = []
        for fn in (mine, reference):
            out = fn(x, w, b)
            torch.manual_seed(3)
            (out * torch.randn_like(out)).sum().backward()
            grads.append([t.grad.clone() for t in (x, w, b) if t.grad is not None])
            for t in (x, w, b):
                t.grad = None
        for mine_g, ref_g in zip(*grads):
            assert torch.allclose(mine_g, ref_g, rtol=1e-3, atol=1e-3), name


def test_batch_norm_function_matches_batch_norm_and_its_running_statistics():
    torch.manual_seed(0)  # (unseeded, the draws followed whatever ran before)
    codec = TensorCodec(block_size=1, bits=8, rounding="nearest")
    ours, ref = nn.BatchNorm2d(6), nn.BatchNorm2d(6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    x = (torch.randn(4, 6, 7, 7) * 2 + 3).requires_grad_()
    from division.compiled import batch_norm_forward
    y = batch_norm_forward(ours, x, codec)
    y_ref = ref(x)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(ours.running_mean, ref.running_mean) and torch.allclose(ours.running_var, ref.running_var)
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, ours.weight, ours.bias), g)
    gx_ref, gw_ref, gb_ref = torch.autograd.grad(y_ref, (x, ref.weight, ref.bias), g)
    for a, b in ((gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
        # the input is coded at 8 bits: a sum over the batch moves by ~1e-5 of the gradient's scale
        # (an absolute 1e-4 failed on 8 of 200 seeds, on weight gradients near 30)
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


def test_dispatch_is_eager_outside_compilation_and_removable():
    model = small_net()
    layers = CompiledLayers(model, TensorCodec())
    assert set(layers.modules.values()) == {"conv", "norm", "relu", "linear"}
    x, y = batch()
    reference = small_net()
    assert torch.equal(model(x), reference(x))                 # eager: the modules' own forwards
    layers.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())


# ------------------------------------------------------------------------ compiled end to end
@pytest.fixture(scope="module")
def compiled_runs():
    """One compiled step per method (division Q=2, none), their ledgers, and the eager references."""
    x, y = batch()
    runs = {}
    for name in ("division", "none"):
        model = small_net()
        ledger = division.ByteLedger()
        method = division.build_method(name, rounding="nearest")
        method.attach(model, ledger=ledger)
        compiled = method.compile(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss, grads = step(compiled, x, y)
        assert not [w for w in caught if "UNCOMPRESSED" in str(w.message)]
        runs[name] = {"model": model, "method": method, "ledger": ledger, "loss": loss, "grads": grads,
                      "stored": ledger.stored_bytes, "by_codec": ledger.by_codec()}
    eager_ledger = division.ByteLedger()
    eager = small_net()
    division.build_method("division", rounding="nearest").attach(eager, ledger=eager_ledger)
    runs["eager_division"] = {"stored": (step(eager, x, y), eager_ledger.stored_bytes)[1],
                              "plain": eager_ledger.plain_bytes}
    plain = small_net()
    runs["plain"] = dict(zip(("loss", "grads"), step(plain, x, y)))
    runs["batch"] = (x, y)
    return runs


def test_compiled_division_keeps_codes_not_activations(compiled_runs):
    div, none = compiled_runs["division"], compiled_runs["none"]
    eager_stored = compiled_runs["eager_division"]["stored"]
    # within 3% of what eager DIVISION keeps, and several times less than compiled plain training
    assert abs(div["stored"] - eager_stored) <= 0.03 * eager_stored
    assert none["stored"] > 4 * div["stored"]
    assert div["by_codec"]["packed"]["stored_bytes"] > 0       # the codes and masks are what it keeps
    assert div["ledger"].compiled and div["ledger"].plain_bytes is None


def test_compiled_ledger_leaves_parameter_copies_out(compiled_runs):
    """The CPU kernels keep 3x3 kernels converted to another memory format for backward: model
    memory, counted apart (``parameter_copy_bytes``), the same with and without DIVISION; no entry
    is a kernel's copy."""
    div, none = compiled_runs["division"], compiled_runs["none"]
    kernels = [p for p in div["model"].parameters() if p.dim() == 4]
    copies = div["ledger"].parameter_copy_bytes
    assert copies == none["ledger"].parameter_copy_bytes
    assert copies in {sum(p.numel() * 4 for p in kernels if p.shape[-1] == 3),   # inductor's choice
                      sum(p.numel() * 4 for p in kernels)}                        # (converted or all)
    for run in (div, none):
        assert not [e for e in run["ledger"].entries if e.shape in {tuple(p.shape) for p in kernels}]


def test_compiled_division_stores_a_block_input_once(compiled_runs):
    """The block input is read by conv1 and the shortcut: one set of codes, as in eager mode."""
    div = compiled_runs["division"]
    # 16-channel LFCs (8, 16, 2, 2): the first BatchNorm's input and the block input, once
    lfcs = [e for e in div["ledger"].entries if e.dtype == "bfloat16" and e.shape == (8, 16, 2, 2)]
    assert len(lfcs) == 2
    # 8192-byte uint8 tensors: the Q=2 codes of the first BatchNorm's input and of the block input
    # (once), and the block's two 32-channel ReLU masks
    assert sum(e.dtype == "uint8" and math.prod(e.shape) == 8192 for e in div["ledger"].entries) == 4


def test_compiled_division_gradients_follow_plain_training(compiled_runs):
    div, plain = compiled_runs["division"], compiled_runs["plain"]
    assert torch.allclose(div["loss"], plain["loss"], atol=1e-4)  # forward is exact
    assert cosine(div["grads"], plain["grads"]) > 0.9
    none = compiled_runs["none"]
    assert cosine(none["grads"], plain["grads"]) > 0.9999


def test_compiled_batch_norm_updates_running_statistics(compiled_runs):
    x, y = compiled_runs["batch"]
    plain = small_net()
    step(plain, x, y)
    for (name, a), (_, b) in zip(compiled_runs["division"]["model"].named_buffers(), plain.named_buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_hook_only_methods_refuse_to_compile():
    model = small_net()
    method = division.build_method("blpa")
    method.attach(model)
    with pytest.raises(CompileUnsupported, match="torch.compile"):
        method.compile(model)


def test_compiled_division_compiles_static_shapes(monkeypatch):
    """DIVISION compiles one static graph per batch size: left to torch.compile, an epoch's short
    last batch would turn every later batch's graph symbolic, where the fused GPU kernels have no
    plan (on a GPU that failed in tracing). dynamic=True with the fused kernels is refused, not run."""
    model = small_net()
    method = division.build_method("division", block_size=4, bits=2)
    method.attach(model)
    seen = {}
    monkeypatch.setattr("division.methods.self_check", lambda *a, **kw: None)  # compiles a probe
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.update(kw) or m)
    method.compile(model)
    assert seen["dynamic"] is False
    method.compile(model, dynamic=None)  # torch.compile's own choice: automatic dynamic shapes
    assert seen["dynamic"] is False
    method.compile(model, dynamic=True)  # the tensor-op codec (CPU) traces symbolic shapes
    assert seen["dynamic"] is True
    method.tensor_codec = TensorCodec(block_size=4, bits=2, fused=True)  # as on a GPU
    with pytest.raises(CompileUnsupported, match="dynamic=False"):
        method.compile(model, dynamic=True)


def test_a_compiled_model_refuses_to_run_uncompiled_past_the_recompile_limit():
    """Past Dynamo's recompile limit a frame would run uncompiled, and compiled DIVISION with
    nothing compressed (a test session saw it once its models shared one code object: its 9th
    compiled model kept what plain training keeps). Here a new batch size needs one graph more
    than the limit allows: the call raises, naming the fix; the shape compiled before still runs."""
    from division.recompile_limit import RecompileLimitReached
    x, y = batch()
    model = small_net()
    method = division.build_method("division", rounding="nearest")
    method.attach(model)
    compiled = method.compile(model, backend="aot_eager")
    step(compiled, x, y)
    # (a user's suppress_errors would also run a frame uncompiled, and may not be on with the failure)
    with torch._dynamo.config.patch(recompile_limit=1, suppress_errors=True):
        with pytest.raises(RecompileLimitReached, match=r"method 'division'.*torch\._dynamo\.reset\(\)"):
            step(compiled, x[:4], y[:4])
        assert torch.isfinite(step(compiled, x, y)[0])


def test_compiled_models_do_not_share_one_recompile_limit(compiled_runs):
    """Each compiled DIVISION model is its own frame to Dynamo (the wrapper that ends its chain has
    a code object of its own): nine models in one process, one past the limit, all compile and
    all keep codes."""
    x, y = batch()
    stored = []
    for _ in range(torch._dynamo.config.recompile_limit + 1):
        model, ledger = small_net(), division.ByteLedger()
        method = division.build_method("division", rounding="nearest")
        method.attach(model, ledger=ledger)
        step(method.compile(model, backend="aot_eager"), x, y)
        stored.append(ledger.stored_bytes)
    assert len(set(stored)) == 1 and stored[0] < compiled_runs["none"]["stored"] / 4, stored


def test_a_layer_run_uncompiled_outside_the_eager_hooks_warns():
    """A user's own torch.compile (no refusal) past the recompile limit runs the model's frame
    uncompiled, and DIVISION's layers then keep plain training's activations: a batch of 4 saves
    several times what the compiled batch of 8 saved. A warning names it; compiled steps and eager
    DIVISION steps give none."""
    from division.compiled import SavedTensorCounter
    model = small_net()
    method = division.build_method("division", rounding="nearest")
    method.attach(model)
    compiled = torch.compile(model, backend="aot_eager")
    x, y = batch()

    def saved_bytes(n: int) -> int:
        ledger = division.ByteLedger()
        with SavedTensorCounter(model, ledger):
            loss = F.cross_entropy(compiled(x[:n]), y[:n])
        loss.backward()
        return ledger.stored_bytes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled_bytes = saved_bytes(8)
        step(model, x, y)  # eager DIVISION: the hooks compress
    assert not [w for w in caught if "UNCOMPRESSED" in str(w.message)]
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.warns(RuntimeWarning, match="layer '0' of a DIVISION model .* UNCOMPRESSED"):
            uncompiled_bytes = saved_bytes(4)
    assert uncompiled_bytes > 4 * compiled_bytes, (uncompiled_bytes, compiled_bytes)


def test_each_compiled_run_starts_from_a_clean_compiler_cache(monkeypatch):
    """The runs of a sweep share one process: each compiled run resets Dynamo first, so that their
    graphs do not add up to the recompile limit."""
    from omegaconf import OmegaConf
    from runners import distributed
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    cfg = OmegaConf.create({"compile": True, "train": {}})
    for expected in (1, 2):
        distributed.prepare_model(small_net(), division.build_method("none"), cfg, torch.device("cpu"))
        assert len(resets) == expected
    distributed.prepare_model(small_net(), division.build_method("none"), OmegaConf.create({"train": {}}),
                              torch.device("cpu"))
    assert len(resets) == 2  # eager runs keep the cache


def test_compile_config_is_validated():
    from runners.compiling import compile_mode, compile_problem
    from tests.helpers import compose_config
    assert compile_mode(compose_config([])) is None
    assert compile_mode(compose_config(["compile=true"])) == "default"
    assert compile_mode(compose_config(["compile=reduce-overhead"])) == "reduce-overhead"
    blpa = division.build_method("blpa")
    assert "method=blpa" in compile_problem(compose_config(["compile=true", "method=blpa"]), blpa)
    assert "cuda_graph" in compile_problem(compose_config(["compile=true", "cuda_graph=true"]),
                                           division.build_method("division"))
    assert "not allowed" in compile_problem(compose_config(["compile=fast"]), blpa)


@pytest.mark.gpu
def test_gpu_compiled_decodes_one_at_a_time():
    """Peak memory proves it: compiled DIVISION's peak over a step stays far below compiled plain
    training's, which it could not if backward decoded every activation at once."""
    x = torch.randn(64, 3, 64, 64, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    peaks = {}
    for name in ("none", "division"):
        model = nn.Sequential(small_net()[:3], *[Block(16, 16) for _ in range(6)], *small_net()[4:]).cuda()
        model[-1] = nn.Linear(16, 10).cuda()
        method = division.build_method(name)
        method.attach(model)
        compiled = method.compile(model)
        for _ in range(2):
            step(compiled, x, y)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(compiled, x, y)
        peaks[name] = torch.cuda.max_memory_allocated() - base
    assert peaks["division"] < 0.5 * peaks["none"], peaks


def test_self_check_refuses_a_compiler_that_loses_a_backward(monkeypatch):
    """The guard that stops compiled training when the compiled gradients disagree with the eager
    functions' (torch 2.11 once returned zeros for BatchNorm's): a ReLU whose backward drops the
    gradient stands in for such a compiler."""
    from division import compiled
    monkeypatch.setattr(compiled, "_CHECKED", {})  # (the passing check ran for compiled_runs' method.compile)
    real = _Relu.backward

    def broken(ctx, grad):
        return real(ctx, grad) * 0 if torch.compiler.is_compiling() else real(ctx, grad)
    monkeypatch.setattr(_Relu, "backward", staticmethod(broken))
    torch._dynamo.reset()  # no trace of the real backward may be reused
    problem = compiled.self_check(torch.device("cpu"))
    torch._dynamo.reset()
    assert problem is not None and "gradient cosine" in problem


def test_layers_without_a_compiled_form_are_named():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.GroupNorm(2, 8),
                          nn.ReLU(), nn.Dropout(0.1), nn.Flatten(), nn.LazyLinear(4))
    layers = CompiledLayers(model, TensorCodec())
    assert layers.uncovered == ["0 (Conv2d)", "1 (GroupNorm)", "3 (Dropout)"]
    assert set(layers.modules.values()) == {"relu", "linear"}


def test_plain_torch_compile_of_a_hook_only_method_warns_that_it_is_uncompressed():
    model = small_net()
    division.build_method("blpa").attach(model)
    compiled = torch.compile(model)
    x, _ = batch()
    with pytest.warns(RuntimeWarning, match="UNCOMPRESSED"):
        compiled(x)


def test_compiled_division_warns_about_layers_it_leaves_to_the_compiler():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 4))
    division.build_method("division").attach(model)
    x, _ = batch()
    with pytest.warns(RuntimeWarning, match=r"1 layer\(s\).*1 \(GroupNorm\)"):
        torch.compile(model)(x)


@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_function_keeps_uint8_window_positions_and_gives_the_exact_gradient(channels_last):
    """ResNet's stem pooling (3x3, stride 2, padding 1): int64 indices and the input would be 9x the
    uint8 positions it keeps; the gradient lands on exactly the argmax ``F.max_pool2d`` picks."""
    pool = nn.MaxPool2d(3, stride=2, padding=1)
    layers = CompiledLayers(pool, TensorCodec(), eager=True)
    assert layers.modules == {"": "maxpool"}
    x = torch.randn(2, 4, 11, 12).round(decimals=1)  # rounded: ties inside windows
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    x_ref = x.clone().requires_grad_(True)
    x = x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = pool(x)
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, y.numel())]
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    y_ref = F.max_pool2d(x_ref, 3, 2, 1)
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, g)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    assert gx.is_contiguous(memory_format=torch.channels_last) == channels_last


def _compiled_beside_plain(model: nn.Module, x: torch.Tensor, module: str, kind: str):
    """One step of ``model`` as is, then one compiled through the compressing layers (8 bits,
    nearest) with ``module`` checked to compress as ``kind``: (output, kept tensors, cosine of the
    gradients). The loss is sin(output).sum(), whose backward keeps the output itself."""
    from division.compiled import _identity
    expected = model(x)
    expected.sin().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    codec = TensorCodec(block_size=4, bits=8, rounding="nearest")
    layers = CompiledLayers(model, codec, attention=codec)
    assert layers.modules[module] == kind and not layers.uncovered
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, _identity):
        out = torch.compile(model)(x)
    out.sin().sum().backward()
    layers.remove()
    assert torch.allclose(out, expected, atol=1e-5)  # the forward is exact
    return out, kept, cosine({n: p.grad for n, p in model.named_parameters()}, plain)


def _full_size_fp32(model: nn.Module, kept: list, out: torch.Tensor, numel: int) -> list:
    """Shapes of the fp32 tensors of at least ``numel`` elements kept besides weights and the output."""
    shapes = {tuple(p.shape) for p in model.parameters()}
    return [tuple(t.shape) for t in kept if t.dtype == torch.float32 and t.numel() >= numel
            and tuple(t.shape) not in shapes and t.data_ptr() != out.data_ptr()]


@pytest.mark.parametrize("activation", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardswish()])
def test_activation_functions_keep_their_input_as_codes_when_compiled(activation):
    """A compiled MLP with GELU / SiLU / Hardswish keeps no hidden-size fp32 tensor: the activations'
    inputs are codes, and the gradients are those of the decoded inputs (8 bits: close to exact)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), activation, nn.Linear(256, 64))
    out, kept, grad_cosine = _compiled_beside_plain(mlp, torch.randn(32, 64), "1", "other")
    assert _full_size_fp32(mlp, kept, out, 32 * 256) == []  # the hidden activations are 32 x 256
    assert grad_cosine > 0.999


def test_layer_norm_keeps_its_normalized_input_as_codes_when_compiled():
    """A compiled pre-norm MLP block: LayerNorm keeps codes of its normalized input plus exact
    per-token statistics (no token-size fp32 tensor), and its gradients follow plain training."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    # a residual stream's outlier channel: one quantization step per channel would drown the rest
    x = torch.randn(8, 16, 64) * torch.logspace(-1, 1, 64)
    out, kept, grad_cosine = _compiled_beside_plain(block, x, "0", "norm")
    assert _full_size_fp32(block, kept, out, 8 * 16 * 64) == []
    assert sum(tuple(t.shape) == (8, 16, 1) and t.dtype == torch.float32 for t in kept) == 2  # mean, rstd
    assert grad_cosine > 0.999


def test_convnext_layer_norm_2d_is_compressed_with_its_own_permutes():
    """torchvision's LayerNorm2d normalizes channels of an (N, C, H, W) map: compiled, it keeps
    codes and gives the module's own output and, at 8 bits, close to its gradients."""
    from torchvision.models.convnext import LayerNorm2d
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), LayerNorm2d(16), nn.Conv2d(16, 4, 1))
    out, kept, grad_cosine = _compiled_beside_plain(model, torch.randn(4, 3, 16, 16), "1", "norm")
    assert _full_size_fp32(model, kept, out, 4 * 16 * 16 * 16) == []
    assert grad_cosine > 0.999


def test_convnext_block_keeps_its_layer_scale_input_as_codes_when_compiled():
    """torchvision's ConvNeXt block multiplies its branch's output by a layer scale: compiled, that
    product keeps the output as codes (compiled plain keeps it raw), the forward is the block's own,
    and at 8 bits the gradients follow plain training's, the layer scale's included."""
    from torchvision.models.convnext import CNBlock
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), CNBlock(16, layer_scale=0.5, stochastic_depth_prob=0.0),
                          nn.Conv2d(16, 4, 1))
    out, kept, grad_cosine = _compiled_beside_plain(model, torch.randn(4, 3, 8, 8), "1", "other")
    assert _full_size_fp32(model, kept, out, 4 * 16 * 8 * 8) == []
    assert grad_cosine > 0.999


class _SelfAttention(nn.Module):
    def __init__(self, embed: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_self_attention_keeps_query_key_and_value_as_codes_when_compiled(monkeypatch):
    """Compiled self-attention (nn.MultiheadAttention as torchvision's ViT calls it) keeps no
    token-size fp32 tensor: the projections' inputs and the query, key and value are codes, the
    attention output and log-sum-exp are not kept, and the gradients follow plain training. Its
    backward is the fused kernels' (``division::attention_backward``, once per call), not
    probabilities recomputed in the compiled graph."""
    from division import compiled_attention
    calls = []
    fused = compiled_attention.fused_attention_gradients
    monkeypatch.setattr(compiled_attention, "fused_attention_gradients",
                        lambda *tensors: calls.append(tensors[0].shape) or fused(*tensors))
    torch.manual_seed(0)
    model = _SelfAttention(64, 4)
    x = torch.randn(4, 16, 64) * 2  # sharper attention than unit logits
    out, kept, grad_cosine = _compiled_beside_plain(model, x, "attn", "attention")
    assert _full_size_fp32(model, kept, out, 4 * 16 * 64 // 4) == []  # a head's (N, L, E) is a quarter
    assert grad_cosine > 0.999
    assert calls == [(4, 4, 16, 16)]  # one backward, over (N, heads, L, E) maps


def test_a_compiled_vit_is_covered_without_a_warning():
    """A small torchvision ViT compiled with DIVISION: LayerNorm, attention, MLP and heads all
    compress (compiled coverage at least 90%, no warning), and what the graph keeps is several
    times less than compiled plain training keeps."""
    import torchvision
    from division.compiled import SavedTensorCounter
    from division.ledger import ByteLedger
    kept = {}
    for name in ("none", "division"):
        torch.manual_seed(0)
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=4,
                                                     hidden_dim=64, mlp_dim=128, num_classes=10).train()
        method = division.build_method(name, **({"rounding": "nearest"} if name == "division" else {}))
        method.attach(model)
        compiled = method.compile(model)
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        ledger = ByteLedger()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with SavedTensorCounter(model, ledger):
                loss = F.cross_entropy(compiled(x), y)
            loss.backward()
        kept[name] = ledger.stored_bytes
        if name == "division":
            assert method.compiled_coverage.fraction > 0.9, method.compiled_coverage
    assert kept["none"] > 3 * kept["division"], kept


def _small_swin() -> nn.Module:
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                              window_size=[4, 4], num_classes=10, stochastic_depth_prob=0.0).train()


def test_a_compiled_swin_keeps_its_window_attention_as_codes():
    """A small torchvision Swin (shifted windows, padding-free 4x4 windows) compiled with DIVISION:
    the window attention's projections keep codes of their inputs, the attention keeps codes of its
    query, key and value and recomputes its probabilities in backward, so nothing of a window's size
    is kept raw, coverage is complete (no warning; 59% before), and at 8 bits the gradients, the
    relative position bias tables' included, follow plain training's."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    _, plain = step(_small_swin(), x, y)
    torch._dynamo.reset()
    model = _small_swin()
    ledger = division.ByteLedger()
    method = division.build_method("division", bits=8, rounding="nearest")
    method.attach(model, ledger=ledger)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, grads = step(method.compile(model, backend="aot_eager"), x, y)
    assert method.compiled_layers.modules["features.1.0.attn"] == "attention"
    assert method.compiled_coverage.fraction == 1.0
    # stage 1: 16x16 tokens of 16 channels, 16 windows of 16 tokens per image; a quarter of that map
    # is larger than any exact statistic (LayerNorm's, one per token) or the shift mask (16 x 16 x 16)
    quarter = 4 * 16 * 16 * 16 // 4
    raw = [e.shape for e in ledger.entries if e.codec == "float32" and math.prod(e.shape) > quarter]
    assert raw == [], raw
    assert cosine(grads, plain) > 0.9999
    table = "features.1.1.attn.relative_position_bias_table"  # a shifted block's
    assert cosine({"b": model.get_parameter(table).grad}, {"b": plain[table]}) > 0.999


@pytest.mark.parametrize("size, shift", [(6, [2, 2]), (8, [2, 2]), (4, [2, 2])])
def test_window_attention_function_matches_torchvision_with_padding_and_shifts(size, shift):
    """The window attention's function against torchvision's module on one map: padded to whole
    windows (6 -> 8), shifted (the mask), and a map no larger than a window (no shift): the same
    output, and at 8 bits its gradients, the relative position bias table's included."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention
    from division.compiled_window_attention import window_attention_forward
    torch.manual_seed(0)
    module = ShiftedWindowAttention(16, window_size=[4, 4], shift_size=shift, num_heads=2)
    x = torch.randn(2, size, size, 16, requires_grad=True)
    g = torch.randn(2, size, size, 16)
    (module(x) * g).sum().backward()
    plain = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in module.named_parameters()}}
    module.zero_grad(set_to_none=True)
    x.grad = None
    codec = TensorCodec(block_size=4, bits=8, rounding="nearest")
    out = window_attention_forward(module, x, codec, codec)
    assert torch.allclose(out, module(x), atol=1e-5)
    (out * g).sum().backward()
    ours = {"x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}
    assert cosine(ours, plain) > 0.999
    assert cosine({"t": ours["relative_position_bias_table"]}, {"t": plain["relative_position_bias_table"]}) > 0.999


def test_compiled_coverage_is_measured_on_the_first_step_and_warns_when_low():
    """Compression is never silently partial: the first compiled training call measures which
    share of plain autograd's saved bytes lies in layers that compress compiled, without touching
    the BatchNorm statistics, and warns with the fraction when it is under 90%."""
    x, y = batch()
    model = small_net()
    method = division.build_method("division", rounding="nearest")
    method.attach(model)
    compiled = method.compile(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        step(compiled, x, y)
    assert method.compiled_coverage.fraction > 0.9
    assert int(model[1].num_batches_tracked) == 1  # the measuring forward left no trace
    from runners.build import method_record_fields
    assert method_record_fields(method)["ledger_coverage"] == method.compiled_coverage.fraction

    torch.manual_seed(0)
    tanh_heavy = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Tanh(), nn.Tanh(),
                               nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    method = division.build_method("division", rounding="nearest")
    method.attach(tanh_heavy)
    with pytest.warns(RuntimeWarning, match=r"compresses \d+\.\d% of the activation bytes.*Tanh"):
        step(method.compile(tanh_heavy), x, y)
    assert method.compiled_coverage.fraction < 0.5


# ------------------------------------------------------------- rebuilt convolution inputs, compiled
def _rebuilding_run(model: nn.Module, backend: str = "inductor", **knobs):
    """One compiled training step with rebuild_conv_input=true: (method, ledger, loss, grads)."""
    torch._dynamo.reset()  # (aot_eager after inductor in one process: start from a clean cache)
    ledger = division.ByteLedger()
    method = division.build_method("division", rounding="nearest", rebuild_conv_input=True, **knobs)
    method.attach(model, ledger=ledger)
    x, y = batch()
    loss, grads = step(method.compile(model, backend=backend), x, y)
    return method, ledger, loss, grads


def test_compiled_rebuild_keeps_nothing_of_conv_inputs_after_batch_norm(compiled_runs):
    """Under inductor the graph keeps exactly the codes of the two ReLU(BN(x)) outputs that
    convolutions read fewer (the block input, read by conv1 and the shortcut, and the block's
    relu1 output); the ledger names the three convolutions as rebuilt; the loss is compiled
    DIVISION's, and the gradients stay as close to plain training's as compiled DIVISION's."""
    method, ledger, loss, grads = _rebuilding_run(small_net())
    rebuilt = {"3.conv1": "1", "3.shortcut": "1", "3.conv2": "3.bn1"}
    assert method.compiled_layers.chain.rebuilt == rebuilt
    assert sorted((r["layer"], r["rebuilt_from"], r["shape"], r["tensor_bytes"]) for r in ledger.rebuilt()) == [
        ("3.conv1", "1", (8, 16, 16, 16), 4 * 8 * 16 * 16 * 16), ("3.conv2", "3.bn1", (8, 32, 16, 16), 4 * 8 * 32 * 16 * 16),
        ("3.shortcut", "1", (8, 16, 16, 16), 4 * 8 * 16 * 16 * 16)]
    assert ledger.compiled and ledger.plain_bytes is None  # still a compiled graph's ledger
    codec = method.tensor_codec
    saved = codec.nbytes((8, 16, 16, 16), torch.float32) + codec.nbytes((8, 32, 16, 16), torch.float32)
    div = compiled_runs["division"]
    assert div["stored"] - ledger.stored_bytes == saved
    assert torch.equal(loss, div["loss"])
    assert cosine(grads, compiled_runs["plain"]["grads"]) > 0.9  # the bound compiled DIVISION meets


def test_compiled_rebuilt_inputs_give_the_exact_gradient_at_8_bits():
    """At Q=8 the rebuilt inputs (BatchNorm's affine map of the decoded input, the ReLU's zeros
    from its mask) give plain training's gradients, channels_last under bf16 autocast (fp32 and
    NCHW: the test below)."""
    channels_last = True
    torch._dynamo.reset()  # (aot_eager after inductor in one process: start from a clean cache)
    grads = {}
    for name in ("plain", "rebuild"):
        model = small_net().to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        run = model
        if name == "rebuild":
            method = division.build_method("division", bits=8, rounding="nearest", rebuild_conv_input=True)
            method.attach(model)
            run = method.compile(model, backend="aot_eager")
        x, y = batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=channels_last):
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(run(x.contiguous(memory_format=torch.channels_last)).float(), y)
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert len(method.compiled_layers.chain.rebuilt) == 3
    # bf16: the CPU's bf16 kernels round differently from machine to machine (0.999982 on one,
    # above 0.99999 on another); a rebuild that drops the BatchNorm's shift gives 0.9927
    assert cosine(grads["plain"], grads["rebuild"]) > 0.9999


def test_compiled_rebuild_follows_tensors_not_module_order():
    """A convolution after a residual sum (the second block's conv1 and shortcut read
    ReLU(bn2 + shortcut)) keeps its input's codes; only direct BatchNorm (+ ReLU module) outputs
    are rebuilt. The traced chain leaves no recompilation behind."""
    torch.manual_seed(0)
    model = nn.Sequential(*small_net()[:4], Block(32, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    method, _, loss, _ = _rebuilding_run(model, backend="aot_eager")
    assert set(method.compiled_layers.chain.rebuilt) == {"3.conv1", "3.shortcut", "3.conv2", "4.conv2"}
    assert torch.isfinite(loss)


def test_compiled_rebuild_skips_a_batch_norm_output_changed_in_place():
    """torchvision's BasicBlock (a ResNet of one block per stage here) adds the shortcut into bn2's
    output in place, then applies ReLU, which the next block's convolutions read: identity alone
    would take that ReLU(bn2 + shortcut) for ReLU(bn2). The eager proof (version counters) leaves
    it out; each block's conv2 (reading ReLU(bn1)) is rebuilt, and at Q=8 the gradients are those
    of the same functions storing every input. (The compiled functions run eagerly here, with the
    chain's identity rule as traced; against plain training this 32x32 ResNet is too
    ill-conditioned to compare: its 1x1 maps are normalized over a batch of 2.)"""
    import torchvision
    codec = TensorCodec(block_size=8, bits=8, rounding="nearest")
    grads, chains = {}, {}
    for rebuild in (False, True):
        torch.manual_seed(0)
        model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
        g = torch.Generator().manual_seed(3)
        x, y = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([1, 7])
        layers = CompiledLayers(model, codec, eager=True, rebuild_conv_input=rebuild)
        if rebuild:
            layers.chain.prove(model, layers.modules, (x,))
        _, grads[rebuild] = step(model, x, y)
        chains[rebuild] = layers.chain
    assert chains[False].rebuilt == {}
    assert chains[True].rebuilt == {f"layer{i}.0.conv2": f"layer{i}.0.bn1" for i in range(1, 5)}
    assert cosine(grads[False], grads[True]) > 0.9999


class _NormReads(nn.Module):
    """conv-BN-ReLU-conv, where ``read`` says what else reads the BatchNorm's output."""

    def __init__(self, read: str, inplace: bool = True):
        super().__init__()
        self.conv1, self.bn, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.read = read

    def forward(self, x):
        y = self.bn(self.conv1(x))
        side = y.sum() if self.read == "before" else 0.0
        z = self.relu(y)
        if self.read == "after":
            side = y.mean()
        return self.conv2(z).mean() + side


@pytest.mark.parametrize("read,inplace,folded", [("none", True, True), ("none", False, True),
                                                 ("before", True, False), ("after", True, True),
                                                 ("after", False, False)])
def test_batch_norm_folds_in_the_relu_only_where_nothing_else_reads_its_output(read, inplace, folded):
    """``ConvInputChain.prove`` folds a ReLU into the BatchNorm before it (the fused kernel would
    write ReLU(BN(x)) in place of BN(x)) only where every read of BN(x) is the ReLU's: a sum read
    before the ReLU, or after a ReLU that is not in place (BN(x) itself then lives on), would see
    the ReLU's output instead. After an in-place ReLU the BatchNorm's output is the ReLU's."""
    model = _NormReads(read, inplace)
    layers = CompiledLayers(model, TensorCodec(fused=True, fused_norm=True))  # (the proof looks for the pairs)
    layers.chain.prove(model, layers.modules, (torch.randn(2, 3, 8, 8),))
    assert layers.chain.absorbed == ({"bn": "relu"} if folded else {})
    off = _NormReads(read, inplace)
    plain = CompiledLayers(off, TensorCodec(fused=True))  # fused_norm off, the default: nothing folded
    plain.chain.prove(off, plain.modules, (torch.randn(2, 3, 8, 8),))
    assert plain.chain.absorbed == {}


class _NormTwice(nn.Module):
    """A BatchNorm applied twice before the ReLU (a forward unlike the one that proved a fold)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.bn(self.conv(x)))).mean()


def test_a_batch_norm_folding_again_before_its_relu_read_the_first_output_is_an_error(monkeypatch):
    """A ReLU module that two BatchNorms fold into (torchvision shares one ReLU module per block)
    must read the first one's output before the second runs: otherwise the first's ReLU(BN(x))
    went to whatever read it, and the forward raises there, not at its end. (The fused BatchNorm
    stands in for the kernels, which this CPU process does not run.)"""
    from division import compiled_rebuild
    monkeypatch.setattr(compiled_rebuild, "fused_relu_applies", lambda *_: True)
    monkeypatch.setattr(compiled_rebuild, "fused_batch_norm",
                        lambda module, x, codec, relu: (x.relu(), None, (), None, None, None))
    model = _NormTwice()
    layers = CompiledLayers(model, TensorCodec(fused=True, fused_norm=True), eager=True)
    layers.chain.absorbed = {"bn": "relu"}  # as a proof of another forward would leave it
    with pytest.raises(RuntimeError, match="BatchNorm bn applied the ReLU after it \\(relu\\)"):
        model(torch.randn(2, 3, 8, 8))
    assert layers.chain._absorbed_outputs == {}


def test_method_fused_norm_reaches_the_compiled_codec_and_the_record():
    """``method.fused_norm=true`` turns on the compiled fused BatchNorm (``TensorCodec.fused_norm``)
    of the fused kernels' codec, and the method describes it for the record; with the tensor-op
    codec, which has no such BatchNorm, it is an error, not a knob silently ignored."""
    from division.methods import CodecMethod
    from division.triton_codec import TritonDivisionCodec
    fused = CodecMethod("division", TritonDivisionCodec(), fused_norm=True)
    assert fused.tensor_codec.fused and fused.tensor_codec.fused_norm
    assert fused.describe()["fused_norm"] is True
    assert not CodecMethod("division", TritonDivisionCodec()).tensor_codec.fused_norm
    with pytest.raises(ValueError, match="fused_norm=true runs the fused GPU kernels' BatchNorm"):
        division.build_method("division", backend="torch", fused_norm=True)
    with pytest.raises(ValueError, match="fused_norm must be true or false"):
        division.build_method("division", fused_norm="yes")


def test_a_folded_relu_that_does_not_read_its_batch_norm_output_is_an_error():
    """A forward unlike the proof's, where the ReLU folded into a BatchNorm never reads that
    BatchNorm's output: whatever read it got ReLU(BN(x)) in place of BN(x), so the forward's end
    raises, naming both, instead of training on."""
    model = _NormReads("none")
    layers = CompiledLayers(model, TensorCodec(fused=True, fused_norm=True))
    layers.chain._absorbed_outputs["relu"] = (torch.zeros(1), (), "bn")  # what the fused BatchNorm leaves
    with pytest.raises(RuntimeError, match="BatchNorm bn applied the ReLU after it \\(relu\\)"):
        model(torch.randn(2, 3, 8, 8))
    assert layers.chain._absorbed_outputs == {}


def test_compiled_rebuild_without_batch_norm_chains_warns():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with pytest.warns(RuntimeWarning, match="rebuilt no layer input of this compiled model"):
        method, ledger, _, _ = _rebuilding_run(model, backend="aot_eager")
    assert method.compiled_layers.chain.rebuilt == {}
    assert not [e for e in ledger.entries if e.codec == "rebuilt"]


# ------------------------------------------------ a block input's codes shared by two convolutions
def _encodes_traced(share: bool):
    """One compiled step of ``small_net`` (aot_eager, which merges nothing the trace did not):
    (method, ledger, grads, how many encodes the traced graphs hold)."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)
    model = small_net()
    ledger = division.ByteLedger()
    method = division.build_method("division", rounding="nearest")
    method.attach(model, ledger=ledger)
    method.compiled_layers.chain.share = share
    _, grads = step(method.compile(model, backend=backend), *batch())
    encodes = sum(str(node.target).startswith("division.encode") for gm in graphs for sub in gm.modules()
                  if isinstance(sub, torch.fx.GraphModule) for node in sub.graph.nodes)
    return method, ledger, grads, encodes


def test_compiled_convolutions_share_a_block_inputs_codes():
    """The block input, read by conv1 and by the shortcut, is encoded once in the traced graph, not
    left to the compiler's merging of two encodes (a GPU's fused encode is never merged); the
    shortcut's ledger entry names conv1's codes and stores nothing; the gradients are unchanged."""
    shared, ledger, grads, encodes = _encodes_traced(share=True)
    unshared, unshared_ledger, unshared_grads, unshared_encodes = _encodes_traced(share=False)
    assert shared.compiled_layers.chain.shared == {"3.shortcut": "3.conv1"}
    assert unshared.compiled_layers.chain.shared == {}
    assert encodes == unshared_encodes - 1
    assert [(e.layer, e.rebuilt_from, e.shape, e.stored_bytes, e.op) for e in ledger.entries if e.codec == "shared"] \
        == [("3.shortcut", "3.conv1", (8, 16, 16, 16), 0, "Conv2d")]
    assert ledger.stored_bytes == unshared_ledger.stored_bytes  # (merged on the CPU either way)
    for name, g in grads.items():
        assert torch.equal(g, unshared_grads[name]), name


class _InPlaceBetweenReads(nn.Module):
    """A tensor read by two convolutions and changed in place in between (``change``): an input
    that needs no gradient, and the first convolution's weight frozen, so that plain autograd
    allows the change."""

    def __init__(self, change: bool):
        super().__init__()
        self.change = change
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1).requires_grad_(False)
        self.shortcut = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        h = x.clone()
        a = self.conv1(h)
        if self.change:
            h.mul_(2.0)
        return (a + self.shortcut(h)).mean(dim=(2, 3))


@pytest.mark.parametrize("change", [False, True])
def test_shared_conv_input_codes_skip_a_tensor_changed_in_place(change):
    """The eager proof (version counters) links the two reads only when nothing changed the tensor
    in between; at Q=8 the gradients are plain autograd's either way (the compiled functions run
    eagerly here, with the chain's identity rule as traced)."""
    torch.manual_seed(0)
    model, plain = _InPlaceBetweenReads(change), _InPlaceBetweenReads(change)
    plain.load_state_dict(model.state_dict())
    x, y = batch()
    layers = CompiledLayers(model, TensorCodec(block_size=8, bits=8, rounding="nearest"), eager=True)
    layers.chain.prove(model, layers.modules, (x,))

    def gradients(m: nn.Module) -> dict:  # (conv1's weight is frozen: no gradient)
        F.cross_entropy(m(x), y % 8).backward()
        return {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    grads, plain_grads = gradients(model), gradients(plain)
    assert layers.chain.shared == ({} if change else {"shortcut": "conv1"})
    assert cosine(grads, plain_grads) > 0.9999
    if change:  # read as it was after the change: sharing conv1's codes would have halved the shortcut's input
        assert torch.allclose(grads["shortcut.weight"], plain_grads["shortcut.weight"], rtol=0.02, atol=1e-4)


# ------------------------------------- rebuilt Linear inputs (GELU, SiLU, LayerNorm outputs), compiled
def _tiny_vit(image_size: int = 16, hidden_dim: int = 32) -> nn.Module:
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=image_size, patch_size=4, num_layers=2, num_heads=4,
                                                hidden_dim=hidden_dim, mlp_dim=2 * hidden_dim, num_classes=10).train()


def _tiny_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    torch.manual_seed(0)
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10).train()


def _transformer_run(make, rebuild: bool, backend: str = "aot_eager", bits: int = 8, autocast: bool = False):
    """One compiled step: (method, ledger, loss, grads)."""
    torch._dynamo.reset()
    model = make()
    ledger = division.ByteLedger()
    method = division.build_method("division", bits=bits, rounding="nearest", rebuild_conv_input=rebuild)
    method.attach(model, ledger=ledger)
    run = method.compile(model, backend=backend)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(run(x).float(), y)
    loss.backward()
    return method, ledger, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_vit_rebuilds_its_linear_inputs_from_layer_norm_and_gelu():
    """Under inductor a ViT's attention projection and first MLP Linear keep nothing of their
    input (a LayerNorm's output: its normalized input's codes, times the weight, plus the bias) and
    its second MLP Linear nothing of its (GELU of the first's output, through a dropout of p = 0):
    the graph keeps exactly those six inputs' codes fewer (Q = 2), the ledger names each with its
    source, the loss is the same, and at Q = 8 the gradients are those of storing the inputs."""
    runs = {rebuild: _transformer_run(_tiny_vit, rebuild, backend="inductor", bits=2) for rebuild in (False, True)}
    method, ledger, loss, _ = runs[True]
    layers = [f"encoder.layers.encoder_layer_{i}" for i in range(2)]
    expected = {}
    for layer in layers:
        expected.update({f"{layer}.self_attention": f"{layer}.ln_1", f"{layer}.mlp.0": f"{layer}.ln_2",
                         f"{layer}.mlp.3": f"{layer}.mlp.1"})
    assert method.compiled_layers.chain.rebuilt == expected
    tokens = (4, 17, 32)  # 16 patches and the class token
    assert sorted((r["layer"], r["rebuilt_from"], r["shape"], r["tensor_bytes"]) for r in ledger.rebuilt()) == sorted(
        (reader, source, (4, 17, 64) if reader.endswith("mlp.3") else tokens,
         4 * 4 * 17 * (64 if reader.endswith("mlp.3") else 32)) for reader, source in expected.items())
    assert {e.layer: e.op for e in ledger.entries if e.codec == "rebuilt"} == {
        reader: "MultiheadAttention" if reader.endswith("attention") else "Linear" for reader in expected}
    codec = method.tensor_codec
    saved = 2 * (2 * codec.nbytes(tokens, torch.float32, feature_last=True)
                 + codec.nbytes((4, 17, 64), torch.float32, feature_last=True))
    assert runs[False][1].stored_bytes - ledger.stored_bytes == saved
    assert torch.equal(loss, runs[False][2])
    exact = {rebuild: _transformer_run(_tiny_vit, rebuild, bits=8)[3] for rebuild in (False, True)}
    assert cosine(exact[True], exact[False]) > 0.9999


def test_compiled_convnext_rebuilds_its_mlp_inputs_under_autocast():
    """A ConvNeXt block's first Linear reads its LayerNorm's output, its second the GELU's: both
    are rebuilt (bf16 autocast: the LayerNorm in fp32, the Linears in bf16), with plain training's
    gradients at Q = 8 as closely as storing them."""
    runs = {rebuild: _transformer_run(_tiny_convnext, rebuild, autocast=True) for rebuild in (False, True)}
    method, ledger, loss, grads = runs[True]
    assert method.compiled_layers.chain.rebuilt == {
        "features.1.0.block.3": "features.1.0.block.2", "features.1.0.block.5": "features.1.0.block.4",
        "features.3.0.block.3": "features.3.0.block.2", "features.3.0.block.5": "features.3.0.block.4"}
    assert ledger.stored_bytes < runs[False][1].stored_bytes
    assert torch.equal(loss, runs[False][2])
    assert cosine(grads, runs[False][3]) > 0.9999


class _GeluChangedInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.act2, self.fc3 = (nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16),
                                                             nn.GELU(), nn.Linear(16, 10))

    def forward(self, x):
        h = self.act(self.fc1(x))
        h.mul_(2)  # the GELU's output changed in place: fc2 must not rebuild it
        return self.fc3(self.act2(self.fc2(h)))


def test_compiled_rebuild_skips_an_activation_output_changed_in_place():
    """fc2 reads 2 * GELU(...) (changed in place): identity alone would rebuild it as GELU(...);
    the eager proof (version counters) leaves it out, and only fc3 (reading GELU directly) is rebuilt."""
    torch._dynamo.reset()
    grads = {}
    for rebuild in (False, True):
        torch.manual_seed(0)
        model = _GeluChangedInPlace().train()
        method = division.build_method("division", bits=8, rounding="nearest", rebuild_conv_input=rebuild)
        method.attach(model)
        run = method.compile(model, backend="aot_eager")
        x, y = torch.randn(6, 8, generator=torch.Generator().manual_seed(2)), torch.arange(6)
        _, grads[rebuild] = step(run, x, y)
    assert method.compiled_layers.chain.rebuilt == {"fc3": "act2"}
    assert cosine(grads[False], grads[True]) > 0.9999


# ----------------------------------------------------- recomputed BatchNorm inputs, compiled
def _recomputing_run(rebuild: bool, recompute: bool, bits: int = 8, channels_last: bool = False,
                     device: str = "cpu", backend: str = "aot_eager", size: int = 16):
    """One compiled step of the bottleneck of tests/test_recompute.py: (method, ledger, grads);
    channels_last: under bf16 autocast too."""
    from tests.test_recompute import Bottleneck
    torch._dynamo.reset()
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = Bottleneck().train().to(device=device, memory_format=fmt)
    ledger = division.ByteLedger()
    method = division.build_method("division", bits=bits, rounding="nearest", rebuild_conv_input=rebuild,
                                   recompute_norm_input=recompute)
    method.attach(model, ledger=ledger)
    run = method.compile(model, backend=backend)
    x, y = _bottleneck_batch(device, fmt, size)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=channels_last):
        loss = F.cross_entropy(run(x).float(), y)
    loss.backward()
    return method, ledger, {n: p.grad.clone() for n, p in model.named_parameters()}


def _bottleneck_batch(device: str, fmt, size: int):
    _, y = batch()
    x = torch.randn(8, 8, size, size, generator=torch.Generator().manual_seed(1))
    return x.to(device).contiguous(memory_format=fmt), y.to(device)


def _bottleneck_plain_grads(channels_last: bool, device: str = "cpu", size: int = 16) -> dict:
    from tests.test_recompute import Bottleneck
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = Bottleneck().train().to(device=device, memory_format=fmt)
    x, y = _bottleneck_batch(device, fmt, size)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=channels_last):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_recompute_keeps_nothing_of_batch_norm_inputs_after_1x1_convolutions():
    """Compiled, the BatchNorms after the three 1x1 convolutions keep nothing of their input (the
    graph keeps exactly their codes fewer, and with rebuild_conv_input the two rebuilt inputs' too);
    the ledger lists them as recomputed; at Q=8 the gradients are plain training's."""
    _, stored, _ = _recomputing_run(False, False)
    method, ledger, grads = _recomputing_run(False, True)
    chain = method.compiled_layers.chain
    assert chain.recomputed == {"bn1": "conv1", "bn3": "conv3", "bn_short": "short"} and chain.rebuilt == {}
    assert sorted((r["layer"], r["how"], r["rebuilt_from"], r["shape"]) for r in ledger.rebuilt()) == [
        ("bn1", "recomputed", "conv1", (8, 16, 8, 8)), ("bn3", "recomputed", "conv3", (8, 32, 8, 8)),
        ("bn_short", "recomputed", "short", (8, 32, 8, 8))]
    codec = method.tensor_codec
    inputs = [(8, 16, 8, 8), (8, 32, 8, 8), (8, 32, 8, 8)]
    assert stored.stored_bytes - ledger.stored_bytes == sum(codec.nbytes(s, torch.float32) for s in inputs)
    plain = _bottleneck_plain_grads(False)
    assert cosine(grads, plain) > 0.99999
    method, both, grads = _recomputing_run(True, True)
    assert method.compiled_layers.chain.rebuilt == {"conv2": "bn1", "conv3": "bn2"}  # conv3 then recomputes bn3's
    rebuilt = [(8, 16, 8, 8), (8, 16, 8, 8)]  # conv2's and conv3's inputs
    assert ledger.stored_bytes - both.stored_bytes == sum(codec.nbytes(s, torch.float32) for s in rebuilt)
    assert cosine(grads, plain) > 0.99999


def test_compiled_recompute_under_autocast_channels_last():
    method, _, grads = _recomputing_run(True, True, channels_last=True)
    assert len(method.compiled_layers.chain.recomputed) == 3 and len(method.compiled_layers.chain.rebuilt) == 2
    assert cosine(grads, _bottleneck_plain_grads(True)) > 0.9999


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_compiled_recompute_and_rebuild_with_the_fused_codec(channels_last):
    """On a GPU, inductor with the fused codec ops: both knobs find the same chain as on the CPU,
    keep the ledger's bytes fewer, and at Q=8 the gradients are plain training's."""
    _, stored, _ = _recomputing_run(False, False, device="cuda", backend="inductor", size=32,
                                    channels_last=channels_last)
    method, ledger, grads = _recomputing_run(True, True, device="cuda", backend="inductor", size=32,
                                             channels_last=channels_last)
    chain = method.compiled_layers.chain
    assert chain.recomputed == {"bn1": "conv1", "bn3": "conv3", "bn_short": "short"}
    assert chain.rebuilt == {"conv2": "bn1", "conv3": "bn2"}
    assert ledger.stored_bytes < 0.5 * stored.stored_bytes, (ledger.stored_bytes, stored.stored_bytes)
    assert cosine(grads, _bottleneck_plain_grads(channels_last, "cuda", 32)) > 0.999


def test_compiled_recompute_without_1x1_convolutions_warns():
    torch._dynamo.reset()
    model = small_net()  # 3x3 convolutions only
    method = division.build_method("division", rounding="nearest", recompute_norm_input=True)
    method.attach(model)
    with pytest.warns(RuntimeWarning, match="recomputed no BatchNorm input of this compiled model"):
        step(method.compile(model, backend="aot_eager"), *batch())
    assert method.compiled_layers.chain.recomputed == {}


def test_fused_codec_choice_specializes_symbolic_sizes(monkeypatch):
    """A plain ``torch.compile(model)`` of an attached model re-traces with symbolic sizes at the
    second batch size (automatic dynamic shapes). ``applies`` makes them static: the plan lookup gets
    plain ints and each batch size its own graph, with no graph break (a symbolic size broke the
    graph there, and the fused op then failed in tracing on a GPU)."""
    import torch._dynamo.utils as dynamo_utils
    from division import compiled_ops

    seen = []

    @torch.compiler.assume_constant_result
    def has_plan(shape, stride, *_):
        seen.append((shape, stride))
        return True

    monkeypatch.setattr(compiled_ops, "_has_plan", has_plan)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    scaled = torch.compile(lambda x: x * (2 if compiled_ops.applies(x, 8, 2, False) else 1),
                           backend="eager", dynamic=True)
    for n in (8, 6, 5):
        assert torch.equal(scaled(torch.ones(n, 3, 4, 4)), torch.full((n, 3, 4, 4), 2.0))
    breaks = sum(dynamo_utils.counters["graph_break"].values())
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert breaks == 0 and graphs == 3
    assert [shape for shape, _ in seen] == [(8, 3, 4, 4), (6, 3, 4, 4), (5, 3, 4, 4)]
    assert all(type(v) is int for shape, stride in seen for v in (*shape, *stride))


def test_fused_ops_read_symbolic_sizes_as_ints():
    """The fused op's fake run in tracing gets a symbolic graph's sizes as ``SymInt`` objects, which
    no plan lookup can hash; ``_specialized`` gives the same tensor with int sizes and strides."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from division.compiled_ops import _specialized

    mode = FakeTensorMode(shape_env=ShapeEnv())
    real = torch.empty(6, 3, 4, 4).to(memory_format=torch.channels_last)
    x = mode.from_tensor(real, source=ConstantSource("x"), symbolic_context=StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC] * 4))
    with mode:
        assert not all(type(size) is int for size in x.shape)  # the case at hand
        y = _specialized(x)
        assert all(type(v) is int for v in (*y.shape, *y.stride()))
        assert tuple(y.shape) == (6, 3, 4, 4) and tuple(y.stride()) == real.stride()
        assert _specialized(y) is y  # static tensors pass through


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["vit", "convnext", "swin"])
def test_gpu_compiled_architectures_rebuild_with_the_fused_codec(arch):
    """On a GPU, inductor with the fused codec ops: a ViT, a ConvNeXt and a Swin compiled with DIVISION
    and the rebuilds launch the fused kernels from inductor's code, keep fewer bytes than without the
    rebuilds, and at Q = 8 give plain training's gradients (the window attention's bias tables too)."""
    from torch._inductor.utils import run_and_get_code
    make = {"vit": lambda: _tiny_vit(32, 64), "convnext": _tiny_convnext, "swin": _small_swin}[arch]
    size = 32
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, size, size, generator=g).cuda(), torch.randint(0, 10, (8,), generator=g).cuda()
    _, plain = step(make().cuda(), x, y)
    stored = {}
    for rebuild in (False, True):
        torch._dynamo.reset()
        model = make().cuda()
        ledger = division.ByteLedger()
        method = division.build_method("division", bits=8, rounding="nearest", rebuild_conv_input=rebuild)
        method.attach(model, ledger=ledger)
        run = method.compile(model)
        (_, grads), code = run_and_get_code(step, run, x, y)
        stored[rebuild] = ledger.stored_bytes
    code = "\n".join(code)
    assert "_encode_kernel" in code and "_decode_kernel" in code
    assert method.compiled_layers.chain.rebuilt
    assert stored[True] < stored[False], stored
    assert cosine(grads, plain) > 0.999


@pytest.mark.slow
def test_graph_breaks_script_finds_none_in_a_torchvision_resnet_with_the_fused_batch_norm():
    """scripts/graph_breaks.py on torchvision's ResNet-18 (channels_last, the fused kernels under
    Triton's interpreter, the fused BatchNorm and the rebuilds on): one graph, no break, the ReLUs
    after the stem's and each block's first BatchNorm folded (9: a BasicBlock's ReLU module runs
    twice, after bn1 and after the residual sum) and each block's conv2 input rebuilt."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "scripts" / "graph_breaks.py"), "--model", "resnet18",
                           "--interpret", "--size", "32", "--batch", "2", "--steps", "1",
                           "--knobs", "fused_norm=true", "rebuild_conv_input=true"],
                          capture_output=True, text=True, timeout=900, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "graph breaks: 0" in done.stdout and "folded ReLUs: 9, rebuilt inputs: 8" in done.stdout, done.stdout
