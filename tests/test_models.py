"""Model zoo: published sizes, forward/backward at the native input size, hook visibility."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import division
from models import MODEL_INFO, MODEL_NAMES, build_model

# Published parameter counts and how exactly they are published.
# CIFAR models (10 classes): He et al. 2015 (ResNet-20: 0.27M), He et al. 2016 "Identity Mappings"
# (ResNet-164: 1.7M), the common CIFAR ResNet-18 (11.2M) and DenseNet-121 (7.0M).
# ImageNet models (1000 classes): torchvision's model documentation, exact.
PUBLISHED_CIFAR_10 = {"resnet20": 0.27e6, "resnet18": 11.2e6, "resnet164": 1.7e6, "densenet121": 7.0e6}
PUBLISHED_IMAGENET_1000 = {"resnet50": 25_557_032, "densenet161": 28_681_000, "wrn50_2": 68_883_240}
CIFAR_TOLERANCE = 0.02  # the papers round to two or three significant digits

# Exact counts of this implementation, for the README (10 / 100 classes).
EXACT = {
    "resnet20": (269_722, 275_572),
    "resnet18": (11_173_962, 11_220_132),
    "resnet164": (1_703_258, 1_726_388),
    "densenet121": (6_956_298, 7_048_548),
    "vit_cifar": (3_195_146, 3_218_276),
    "resnet50": (23_528_522, 23_712_932),
    "densenet161": (26_494_090, 26_692_900),
    "wrn50_2": (66_854_730, 67_039_140),
}

SLOW = {"densenet161", "wrn50_2"}  # over a second each on two CPU cores; marked slow
# Transformers: DIVISION stores only part of what they save (the CNNs: more than 8x less). Attention and
# GELU run as functional calls, which the compressor's module hooks do not see, and a Linear layer's
# (batch, tokens, features) input is saved as a flattened view, which is not the module's input tensor.
TRANSFORMERS = {"vit_cifar"}


def count_parameters(name: str, num_classes: int) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(name, num_classes)
    return sum(p.numel() for p in model.parameters())


def test_registry_is_consistent():
    assert set(MODEL_NAMES) == set(MODEL_INFO) == set(EXACT)
    for name, info in MODEL_INFO.items():
        assert info["family"] in ("cifar", "imagenet")
        assert info["image_size"] == (32 if info["family"] == "cifar" else 224)


def test_unknown_model_lists_the_choices():
    with pytest.raises(ValueError) as error:
        build_model("resnet-18", 10)
    for name in MODEL_NAMES:
        assert name in str(error.value)


@pytest.mark.parametrize("name", sorted(PUBLISHED_CIFAR_10))
def test_cifar_parameter_count_matches_the_paper(name):
    count = count_parameters(name, 10)
    print(f"{name}: {count:,} parameters (10 classes)")
    assert abs(count - PUBLISHED_CIFAR_10[name]) <= CIFAR_TOLERANCE * PUBLISHED_CIFAR_10[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_IMAGENET_1000))
def test_imagenet_parameter_count_matches_torchvision(name):
    assert count_parameters(name, 1000) == PUBLISHED_IMAGENET_1000[name]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_exact_parameter_counts(name):
    counts = (count_parameters(name, 10), count_parameters(name, 100))
    print(f"{name}: {counts[0]:,} (10 classes), {counts[1]:,} (100 classes)")
    assert counts == EXACT[name]


def _forward_backward(name: str, method: str, num_classes: int = 10) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes)
    ledger = division.ByteLedger()
    division.build_method(method, backend="torch").attach(model, ledger=ledger)
    size = MODEL_INFO[name]["image_size"]
    images = torch.randn(2, 3, size, size)
    start = time.perf_counter()
    logits = model(images)
    assert logits.shape == (2, num_classes)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    print(f"{name}: forward + backward at {size}x{size}, batch 2: {time.perf_counter() - start:.2f} s")
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    if method == "division":  # the activations really went through the codec
        factor = 1 if name in TRANSFORMERS else 8
        assert ledger.plain_bytes > factor * ledger.stored_bytes > 0


@pytest.mark.parametrize("method", ["none", "division"])
@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in SLOW])
def test_forward_backward(name, method):
    _forward_backward(name, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "division"])
@pytest.mark.parametrize("name", sorted(SLOW))
def test_forward_backward_large(name, method):
    _forward_backward(name, method)


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "resnet164", "densenet121", "resnet50"])
def test_every_relu_is_a_module(name, monkeypatch):
    """An activation compressor built on module hooks must see every ReLU: count the functional
    calls and check that each one happened inside an nn.ReLU module."""
    model = build_model(name, 10)
    module_calls, functional_calls = [0], [0]
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.register_forward_pre_hook(lambda *_: module_calls.__setitem__(0, module_calls[0] + 1))
    real_relu = nn.functional.relu

    def counting_relu(*args, **kwargs):
        functional_calls[0] += 1
        return real_relu(*args, **kwargs)

    monkeypatch.setattr(nn.functional, "relu", counting_relu)
    size = MODEL_INFO[name]["image_size"]
    model(torch.randn(2, 3, size, size))
    assert functional_calls[0] > 0
    assert functional_calls[0] == module_calls[0]


def test_hundred_classes_head():
    assert build_model("resnet20", 100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_any_torchvision_classification_model_by_name_and_clear_errors_for_unknown_names():
    import torchvision

    from runners.build import build_model as build_configured, model_image_size
    from runners.checks import ConfigError
    from tests.helpers import compose_config

    cfg = compose_config(["model=torchvision", "model.name=mobilenet_v3_small"])
    model = build_configured(cfg, num_classes=7, device=torch.device("cpu"))
    assert isinstance(model, torchvision.models.MobileNetV3) and model.classifier[-1].out_features == 7
    assert model_image_size(cfg) == 224
    cfg = compose_config(["model.name=squeeze", "+model._target_=torchvision.models.squeezenet1_1"])
    model = build_configured(cfg, num_classes=5, device=torch.device("cpu"))  # any callable, by import path
    assert isinstance(model, torchvision.models.SqueezeNet) and model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    for overrides, message in ((["model.name=mobilenet_v2"], "model=torchvision model.name=mobilenet_v2"),
                               (["model=torchvision", "model.name=fasterrcnn_resnet50_fpn"],
                                "not a torchvision classification model")):
        with pytest.raises(ConfigError, match=message):
            build_configured(compose_config(overrides), num_classes=10, device=torch.device("cpu"))


def test_unknown_model_name_is_one_message_without_traceback(tmp_path):
    from tests.helpers import run_main
    proc = run_main(["mode=memory", "model.name=mobilenet_v2", "logger=none", f"hydra.run.dir={tmp_path}/run",
                     f"results_dir={tmp_path}/store"])
    said = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in said and "KeyError" not in said
    assert "model.name='mobilenet_v2' is not allowed" in said
