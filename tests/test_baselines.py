"""The baselines (BLPA, AC-GC, ActNN, checkpoint, swap): round-trip error within each codec's own
bound, BLPA's saturation, ActNN's group statistics, AC-GC's widths and refresh schedule, the ledger
against closed-form sizes, exact gradients for checkpoint and swap, and a few training steps each.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import division
from division import ByteLedger, SaveContext, build_method, compress_activations
from division.baselines import ACGCCodec, ActNNCodec, BLPACodec, CheckpointMethod
from division.baselines._numerics import bf16_down, bf16_up
from division.baselines.acgc import LayerPlan
from models import MODEL_INFO, build_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
BASELINES = ("blpa", "acgc", "actnn", "checkpoint", "swap")


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn(classes: int = 10) -> nn.Sequential:
    """conv-BN-ReLU-maxpool, conv-BN-ReLU-dropout, pool, linear: every kind the compressor handles."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Dropout(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))


def channel_spread(shape, seed: int = 0) -> torch.Tensor:
    """A tensor whose channels (dim 1) have different means and scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    view = [1, shape[1]] + [1] * (len(shape) - 2)
    return x * torch.linspace(0.2, 3.0, shape[1]).view(view) + torch.linspace(-1.0, 2.0, shape[1]).view(view)


# ------------------------------------------------------------------------------------------- BLPA
def blpa_range(x: torch.Tensor, range_std: float = 3.0):
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)
    lo = (mean - range_std * var.sqrt()).clamp(max=0)
    hi = (mean + range_std * var.sqrt()).clamp(min=0)
    return lo, hi


@pytest.mark.parametrize("bits", [4, 8])
def test_blpa_round_trip_within_half_a_bin_inside_the_range(bits):
    x = channel_spread((4, 6, 7, 5))
    codec = BLPACodec(bits)
    packed = codec.encode(x)
    x_hat = packed.unpack()
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    width = packed.tensors["width"].float().view(1, -1, 1, 1)
    lo, hi = blpa_range(x)
    inside = (x >= lo) & (x <= hi)
    err = (x_hat - x).abs()
    assert inside.float().mean() > 0.95
    assert (err[inside] <= (width / 2 * (1 + 1e-5)).expand_as(x)[inside]).all()
    # fewer bits, coarser grid
    if bits == 8:
        coarse = BLPACodec(4).encode(x).tensors["width"].float()
        assert (packed.tensors["width"].float() < coarse).all()


def test_blpa_saturates_and_keeps_zero_and_signs():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    x[0, :, 0, 0] = 100.0   # far beyond +3 std
    x[1, :, 0, 0] = -100.0  # far beyond -3 std
    x[0, :, 1, 1] = 0.0
    codec = BLPACodec(4)
    packed = codec.encode(x)
    x_hat = packed.unpack()
    width = packed.tensors["width"].float()
    zero = packed.tensors["zero"].float()
    top = (15 - zero) * width       # the outermost bin centres
    bottom = -zero * width
    assert torch.equal(x_hat[0, :, 0, 0], top)
    assert torch.equal(x_hat[1, :, 0, 0], bottom)
    lo, hi = (r.flatten() for r in blpa_range(x))
    # the outer centres: within half a bin of +-3 std, plus w's bf16 round-up over the 15 bins
    slack = width / 2 + 15 * (width - (hi - lo) / 15) + 1e-5
    assert ((top - hi).abs() <= slack).all() and ((bottom - lo).abs() <= slack).all()
    assert (x_hat[0, :, 1, 1] == 0).all()
    assert (x_hat * x >= 0).all()  # no value changes sign


def test_blpa_keeps_memory_format_and_dtype():
    x = channel_spread((2, 4, 6, 6)).contiguous(memory_format=torch.channels_last).to(torch.bfloat16)
    x_hat = BLPACodec(4).encode(x).unpack()
    assert x_hat.dtype == torch.bfloat16 and x_hat.is_contiguous(memory_format=torch.channels_last)
    assert (x_hat.float() - x.float()).abs().max() < 1.0


# ------------------------------------------------------------------------------------------ ActNN
@pytest.mark.parametrize("bits,group_size", [(2, 256), (4, 64), (1, 100)])
def test_actnn_round_trip_within_one_step_per_group(bits, group_size):
    x = channel_spread((3, 5, 10, 11))  # 550 elements per sample: a partial last group
    codec = ActNNCodec(bits, group_size, generator=torch.Generator().manual_seed(1))
    packed = codec.encode(x)
    x_hat = packed.unpack()
    groups = math.ceil(550 / group_size)
    assert packed.tensors["step"].shape == (3, groups)
    step = packed.tensors["step"].float().repeat_interleave(group_size, dim=1)[:, :550]
    assert ((x_hat - x).reshape(3, -1).abs() < step).all()


def test_actnn_stochastic_rounding_is_unbiased():
    x = channel_spread((2, 3, 4, 4))
    codec = ActNNCodec(2, 16, generator=torch.Generator().manual_seed(0))
    mean = torch.stack([codec.encode(x).unpack() for _ in range(400)]).mean(0)
    step = codec.encode(x).tensors["step"].float().max()
    assert (mean - x).abs().max() < 0.15 * step


def test_actnn_group_statistics_with_partial_last_group():
    x = channel_spread((2, 3, 10, 10))  # 300 per sample: groups of 256 and 44
    packed = ActNNCodec(2, 256).encode(x)
    rows = x.reshape(2, 300)
    for n in range(2):
        for g, (start, end) in enumerate([(0, 256), (256, 300)]):
            part = rows[n, start:end]
            mn = bf16_down(part.min().reshape(1))
            step = bf16_up(((part.max() - mn.float()) / 3).reshape(1))
            assert packed.tensors["min"][n, g] == mn[0]
            assert packed.tensors["step"][n, g] == step[0]
            assert packed.tensors["min"].dtype == packed.tensors["step"].dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- ACGC
@pytest.mark.parametrize("plan", [LayerPlan(2), LayerPlan(4), LayerPlan(8), LayerPlan(16),
                                  LayerPlan.per_channel([2, 16, 3, 8, 5, 2])])
def test_acgc_round_trip_within_half_a_step(plan):
    x = channel_spread((4, 6, 5, 5))
    codec = ACGCCodec()
    codec.plans["layer"] = plan
    packed = codec.encode(x, SaveContext("layer", "norm"))
    x_hat = packed.unpack()
    widths = [plan.bits] * 6 if plan.groups is None else \
        [next(b for b, idx in plan.groups if c in idx.tolist()) for c in range(6)]
    levels = torch.tensor([2.0 ** (b - 1) - 1 for b in widths]).view(1, -1, 1, 1)
    step = packed.tensors["scale"].float().view(1, -1, 1, 1) / levels
    assert ((x_hat - x).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert packed.nbytes == codec.closed_form_nbytes(tuple(x.shape), x.dtype, SaveContext("layer", "norm"))


def train_steps(model, method, steps: int, batch: int = 8, size: int = 16, lr: float = 0.05, seed: int = 0,
                ledger: ByteLedger | None = None, on_step=None) -> list[float]:
    """``steps`` SGD steps on one fixed batch, as the runner orders them; returns the losses."""
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    method.attach(model, ledger=ledger)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for step in range(steps):
        with method.step_context():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        method.after_step(model, step)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
    return losses


def test_acgc_tighter_bound_gives_more_bits():
    results = {}
    for bound in (1.0, 0.01):
        torch.manual_seed(0)
        method = build_method("acgc", refresh_every=2, error_bound=bound)
        train_steps(small_cnn(), method, steps=2)
        assert method.refresh_steps == [2]
        results[bound] = method
    loose, tight = results[1.0], results[0.01]
    loose_req, tight_req = loose.required_bits_by_layer(), tight.required_bits_by_layer()
    assert set(loose_req) == {"0", "1", "4", "5", "10"}
    assert all(tight_req[name] > loose_req[name] for name in loose_req if loose_req[name] < 16)
    assert tight.describe()["bits"] > loose.describe()["bits"]
    assert isinstance(tight.describe()["bits"], float)


def test_acgc_refreshes_on_schedule_and_measures_exactly():
    torch.manual_seed(0)
    method = build_method("acgc", refresh_every=5, error_bound=0.5)
    ledger = ByteLedger()
    history = []
    exact_steps = []

    def on_step(step):
        history.append(method.bits_by_layer())
        if any(e.codec == "acgc" for e in ledger.entries):
            stored = sum(e.stored_bytes for e in ledger.entries if e.codec == "acgc")
            plain = sum(e.plain_bytes for e in ledger.entries if e.codec == "acgc")
            if stored == plain:
                exact_steps.append(step + 1)

    train_steps(small_cnn(), method, steps=12, ledger=ledger, on_step=on_step)
    assert all(bits == 8.0 for bits in history[0].values())  # before the first refresh
    changed_after = [i + 1 for i in range(1, len(history)) if history[i] != history[i - 1]]
    assert set(changed_after) <= {5, 10} and 5 in changed_after
    assert method.refresh_steps == [5, 10]
    assert exact_steps == [5, 10]  # the measured steps keep their activations exact


# ------------------------------------------------------------------------------ ledger vs closed form
@pytest.mark.parametrize("codec", [BLPACodec(4), BLPACodec(8), ActNNCodec(2, 256), ActNNCodec(4, 100), "acgc"])
def test_ledger_matches_closed_form(codec):
    torch.manual_seed(0)
    model = small_cnn()
    ctx_arg = {}
    if codec == "acgc":
        codec = ACGCCodec()
        codec.plans.update({"0": LayerPlan(16), "1": LayerPlan.per_channel([2, 4, 8, 16] * 2),
                            "4": LayerPlan(2), "5": LayerPlan(4)})
    ledger = ByteLedger()
    with compress_activations(model, codec, ledger=ledger):
        model(torch.randn(4, 3, 16, 16)).sum().backward()
    rows = [e for e in ledger.entries if e.codec == codec.name]
    assert len(rows) >= 3
    for e in rows:
        if isinstance(codec, ACGCCodec):
            ctx_arg = {"ctx": SaveContext(e.layer, e.kind)}
        assert e.stored_bytes == codec.closed_form_nbytes(e.shape, getattr(torch, e.dtype), **ctx_arg), e


# ---------------------------------------------------------------------- checkpoint and swap: exactness
def grads_and_state(model: nn.Module, method_name: str | None, x: torch.Tensor, y: torch.Tensor,
                    ledger: ByteLedger | None = None, **knobs):
    method = build_method(method_name or "none", **knobs)
    method.attach(model, ledger=ledger)
    model.train()
    torch.manual_seed(123)  # dropout draws the same masks in every run
    with method.step_context():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    method.detach()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.item(), grads, {k: v.clone() for k, v in model.state_dict().items()}, method


def torchvision_resnet18():
    from torchvision.models import resnet18
    return resnet18(weights=None, num_classes=10)


@pytest.mark.parametrize("builder", [small_cnn, torchvision_resnet18, lambda: build_model("resnet20", 10)],
                         ids=["sequential", "torchvision_resnet18", "cifar_resnet20"])
@pytest.mark.parametrize("method_name,knobs", [("checkpoint", {"segments": 4}), ("checkpoint", {"segments": 2}),
                                               ("swap", {})])
def test_checkpoint_and_swap_gradients_equal_plain_autograd(builder, method_name, knobs):
    torch.manual_seed(0)
    base = builder()
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 7])
    ref_loss, ref_grads, ref_state, _ = grads_and_state(copy.deepcopy(base), None, x, y)
    model = copy.deepcopy(base)
    keys = list(model.state_dict())
    ledger = ByteLedger()
    loss, grads, state, method = grads_and_state(model, method_name, x, y, ledger=ledger, **knobs)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)
    for name in ref_state:  # running statistics are updated once, as in plain training
        torch.testing.assert_close(state[name], ref_state[name], rtol=1e-6, atol=1e-7)
    assert list(model.state_dict()) == keys
    assert all("forward" not in vars(m) for m in model.modules())  # detach restored every forward
    # the ledger: plain autograd's bytes, and what the method keeps on the device
    plain_ledger = ByteLedger()
    grads_and_state(copy.deepcopy(base), None, x, y, ledger=plain_ledger)
    assert ledger.plain_bytes == plain_ledger.plain_bytes
    if method_name == "swap":
        assert ledger.stored_bytes == 0
    else:
        assert 0 < ledger.stored_bytes < ledger.plain_bytes


def test_checkpoint_stage_chains():
    method = CheckpointMethod(segments=4)
    method.attach(torchvision_resnet18())
    assert [len(g) for g in method.groups] == [3, 3, 2, 2]  # stem, 8 blocks, head
    assert method.checkpointed[0] == "stem..layer1.1" and len(method.checkpointed) == 3
    method.detach()
    model = build_model("resnet20", 10)
    method.attach(model)  # the body nn.Sequential (stages) holds the blocks
    assert "forward" in vars(model.stages) and sum(len(g) for g in method.groups) == 9
    method.detach()


class Residual(nn.Module):
    """A forward that is not a chain of its children: the fallback checkpoints each child."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 10)

    def forward(self, x):
        x = x + torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_checkpoint_fallback_wraps_each_child():
    torch.manual_seed(0)
    base = Residual()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    plain_ledger, ledger = ByteLedger(), ByteLedger()
    _, ref_grads, ref_state, _ = grads_and_state(copy.deepcopy(base), None, x, y, ledger=plain_ledger)
    _, grads, state, _ = grads_and_state(copy.deepcopy(base), "checkpoint", x, y, ledger=ledger)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name])
    torch.testing.assert_close(state["bn.running_mean"], ref_state["bn.running_mean"])
    # equal gradients alone would also hold if nothing were checkpointed: every child ran under
    # checkpoint (its inside recomputed, its input kept), and the ledger still counts plain autograd
    recomputed = {e.layer for e in ledger.entries if e.codec == "recomputed"}
    kept_inputs = {e.layer for e in ledger.entries if e.codec == "checkpoint_input"}
    assert recomputed == kept_inputs == {"conv", "bn", "head"}
    assert ledger.plain_bytes == plain_ledger.plain_bytes and ledger.stored_bytes < ledger.plain_bytes


# ------------------------------------------------------------------------------ training, configs
@pytest.mark.parametrize("name", BASELINES)
def test_every_method_trains(name):
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    knobs = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    knobs.pop("name")
    if name == "acgc":
        knobs["refresh_every"] = 2  # refresh within the few steps
    method = build_method(name, **knobs, unknown_knob="ignored")
    losses = train_steps(model, method, steps=6, batch=8, size=32, lr=0.02)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert method.describe()["method"] == name
    method.detach()


@pytest.mark.parametrize("name", BASELINES)
def test_configs_match_the_methods(name):
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert cfg["name"] == name and cfg["block_size"] is None
    assert cfg["bits"] == {"blpa": 4, "actnn": 2}.get(name)
    assert (CONF / f"{name}.yaml").read_text().startswith("#")
    assert name in division.method_names()
    record = build_method(**cfg).describe()
    assert record["method"] == name and record["block_size"] is None
    if name == "acgc":
        assert record["bits"] == 8.0  # before the first refresh
    else:
        assert record["bits"] == cfg["bits"]


def test_bad_knobs_are_refused():
    with pytest.raises(ValueError, match="method.bits"):
        build_method("blpa", bits=3)
    with pytest.raises(ValueError, match="method.group_size"):
        build_method("actnn", group_size=0)
    with pytest.raises(ValueError, match="method.error_bound"):
        build_method("acgc", error_bound=0)
    with pytest.raises(ValueError, match="method.segments"):
        build_method("checkpoint", segments=0)


ALL_MODELS_FAST = ["resnet20", "resnet18", "resnet164", "densenet121", "resnet50"]
ALL_MODELS_SLOW = ["wrn50_2", "densenet161"]


def _method_trains_model(method_name: str, model_name: str) -> None:
    """Two steps of one project model with one method, at a small input (CIFAR 32, ImageNet 64)."""
    torch.manual_seed(0)
    model = build_model(model_name, 10)
    size = 32 if MODEL_INFO[model_name]["family"] == "cifar" else 64
    method = build_method(method_name, backend="torch", refresh_every=1 if method_name == "acgc" else 100)
    losses = train_steps(model, method, steps=2, batch=2, size=size, lr=0.01)
    assert all(math.isfinite(v) for v in losses), (method_name, model_name, losses)
    method.detach()


@pytest.mark.parametrize("model_name", ALL_MODELS_FAST)
@pytest.mark.parametrize("method_name", ["none", "division", *BASELINES])
def test_every_method_trains_every_model(method_name, model_name):
    _method_trains_model(method_name, model_name)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ALL_MODELS_SLOW)
@pytest.mark.parametrize("method_name", ["none", "division", *BASELINES])
def test_every_method_trains_the_wide_models(method_name, model_name):
    _method_trains_model(method_name, model_name)
