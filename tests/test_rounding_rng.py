"""Stochastic rounding draws from the method's own generator, seeded from ``seed``: attaching DIVISION
(or ActNN) leaves every draw of the model's own (dropout, stochastic depth) as plain training has it;
and method=none installs no hooks once the ledger's first step is counted."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import efficientnet_b0

import division
from division.ledger import ByteLedger


def forward_loss(model, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 7])
    loss = nn.functional.cross_entropy(model(x), y)
    after = torch.randn(4)  # where the global generator stands after the forward pass
    return loss, after


@pytest.mark.parametrize("method", ["division", "actnn"])
def test_attaching_a_method_leaves_dropout_and_stochastic_depth_as_plain(method, one_thread):
    torch.manual_seed(0)
    plain = efficientnet_b0(num_classes=10).train()  # dropout and stochastic depth in every block
    compressed = copy.deepcopy(plain)
    division.build_method(method, seed=5).attach(compressed)
    loss_plain, after_plain = forward_loss(plain, seed=3)
    loss_method, after_method = forward_loss(compressed, seed=3)
    # The forward pass is exact for every method: the same masks give the same loss, bit for bit.
    assert torch.equal(loss_plain, loss_method)
    assert torch.equal(after_plain, after_method)
    loss_method.backward()  # the stored activations decode (the codec's own generator was used)


def test_rounding_is_reproducible_from_its_seed_and_changes_with_it(one_thread):
    def gradients(seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        division.build_method("division", seed=seed, bits=1).attach(model)
        x = torch.randn(4, 3, 16, 16)
        torch.manual_seed(123)  # the global generator's state must not matter
        model(x).square().sum().backward()
        return model[0].weight.grad.clone()
    assert torch.equal(gradients(1), gradients(1))
    assert not torch.equal(gradients(1), gradients(2))


def test_generator_follows_the_model_to_its_device(one_thread):
    method = division.build_method("division", seed=0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 38 * 38, 2)).to("meta")
    method.attach(model)  # attached before the weights exist on any device
    assert method.codec.generator is None
    model.to_empty(device="cpu")
    model(torch.randn(2, 3, 40, 40)).sum().backward()
    assert method.codec.generator.device.type == "cpu"
    hooks = len(model._forward_pre_hooks)
    assert method._generator._handle is None  # the one-shot device check removed itself
    model(torch.randn(2, 3, 40, 40))
    assert len(model._forward_pre_hooks) == hooks


def test_method_none_hooks_only_while_the_ledger_counts():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 2))

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    def saves_seen_outside() -> int:
        """Tensors autograd saves in a step, as a pack hook around the whole step sees them: a method
        whose own saved-tensor hooks are active inside the forward takes them before this one does."""
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            model(torch.randn(2, 3, 32, 32)).sum().backward()
        return len(seen)

    plain = saves_seen_outside()
    assert plain > 0
    method = division.build_method("none")
    method.attach(model)
    assert method.compressor is None and hooks() == 0  # no ledger asked for: nothing installed
    assert saves_seen_outside() == plain
    ledger = ByteLedger()
    method.attach(model, ledger=ledger)
    assert hooks() > 0
    assert saves_seen_outside() == 0  # the ledger's hooks take every save of the step
    assert ledger.plain_bytes > 0
    method.stop_ledger()
    assert method.compressor is None and hooks() == 0
    assert saves_seen_outside() == plain  # plain autograd again: no pack hook of the method's in the step
