"""Training steps replayed from a CUDA graph (``cuda_graph=true``, ``runners.graph_step``).

The refusals run everywhere; the captures need a GPU (``pytest -m gpu``).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import division
from models import build_model
from runners.build import forward_loss
from runners.checks import ConfigError
from runners.graph_step import CudaGraphError, GraphedStep, check_cuda_graph
from runners.job import run_job

from .helpers import compose_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cfg_for(*overrides: str):
    return compose_config(["model=resnet20", "dataset=synthetic", "logger=none", *overrides])


# ------------------------------------------------------------------------------------ refusals
def test_refuses_cpu_with_the_fix():
    with pytest.raises(CudaGraphError, match="needs a CUDA device.*drop cuda_graph=true"):
        check_cuda_graph(cfg_for(), division.build_method("division"), torch.device("cpu"), 1)


@pytest.mark.parametrize("name", ["acgc", "checkpoint", "swap"])
def test_refuses_methods_that_cannot_be_captured(name):
    method = division.build_method(name)
    assert not method.cuda_graph_safe
    with pytest.raises(CudaGraphError, match=f"method={name} cannot be captured"):
        check_cuda_graph(cfg_for(), method, torch.device("cuda"), 1)


def test_refuses_ddp():
    with pytest.raises(CudaGraphError, match="single-process only"):
        check_cuda_graph(cfg_for(), division.build_method("none"), torch.device("cuda"), 2)


@pytest.mark.parametrize("name", ["none", "division", "blpa", "actnn"])
def test_capturable_methods_say_so(name):
    assert division.build_method(name).cuda_graph_safe


def test_train_with_cuda_graph_on_cpu_is_refused_before_any_work(tmp_path):
    cfg = cfg_for("mode=train", "device=cpu", "cuda_graph=true", "train.epochs=1",
                  "train.max_steps_per_epoch=2", f"results_dir={tmp_path}/store")
    with pytest.raises(ConfigError, match="cuda_graph=true is not allowed: .*drop cuda_graph=true"):
        run_job(cfg, tmp_path / "run")
    assert not (tmp_path / "store").exists() and not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("name", ["acgc", "checkpoint", "swap"])
def test_speed_times_methods_that_cannot_be_captured_eagerly_and_says_so(name, monkeypatch, caplog):
    """cuda_graph=true over every method: the capturable ones replay a graph, the others are timed
    eagerly and recorded as eager runs (their own table), so the sweep completes."""
    import runners.speed as speed
    timed_with_graph = []

    def time_steps(cfg, device):
        timed_with_graph.append(cfg.cuda_graph)
        return [1.0]
    monkeypatch.setattr(speed, "time_steps", time_steps)
    env = SimpleNamespace(device=torch.device("cpu"))
    fields = speed.run(cfg_for("mode=speed", f"method={name}", "cuda_graph=true"), env)
    assert timed_with_graph == [False] and fields["cuda_graph"] is False
    assert f"method={name} cannot be captured in a CUDA graph: timed eagerly" in caplog.text
    fields = speed.run(cfg_for("mode=speed", "method=actnn", "cuda_graph=true"), env)
    assert timed_with_graph == [False, True] and fields["cuda_graph"] is True


def test_cuda_graph_must_be_a_bool(tmp_path):
    with pytest.raises(ConfigError, match="cuda_graph='yes' is not allowed: use true or false"):
        run_job(cfg_for("cuda_graph=yes", f"results_dir={tmp_path}/store"), tmp_path / "run")


# -------------------------------------------------------------------------- captures (GPU)
def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _eager_grads(model, images, target) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(images).float(), target).backward()
    return _grads(model)


def _models_and_batch(method_name: str, **knobs):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10).cuda().train()
    plain = copy.deepcopy(model)
    method = division.build_method(method_name, **knobs)
    method.attach(model)
    images = torch.randn(32, 3, 32, 32, device="cuda")
    target = torch.randint(0, 10, (32,), device="cuda")
    return model, plain, method, images, target


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float(F.cosine_similarity(x, y, dim=0))


def _other_batch(images, target, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(images.shape, device="cuda", generator=g),
            torch.randint(0, 10, target.shape, device="cuda", generator=g))


@pytest.mark.gpu
@needs_cuda
def test_gpu_graphed_plain_step_matches_eager():
    model, plain, method, images, target = _models_and_batch("none")
    graphed = GraphedStep(model, method, cfg_for(), torch.device("cuda"), warmup=2)
    for _ in range(3):  # 2 eager, then capture + replay
        graphed(images, target)
    # a replay on another batch computes that batch's step: nothing is left over from the capture
    images, target = _other_batch(images, target, seed=1)
    loss, logits = graphed(images, target)
    assert graphed.captured and graphed.replays == 2
    expected = _eager_grads(plain, images, target)  # train-mode BatchNorm: batch statistics only
    got = _grads(model)
    # the same kernels, but cuDNN may pick other (TF32) algorithms for the captured stream
    assert _cosine(got, expected) > 0.99999
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(loss, F.cross_entropy(plain(images).float(), target), rtol=1e-4, atol=1e-5)
    assert logits.shape == (32, 10)


@pytest.mark.gpu
@needs_cuda
def test_gpu_graphed_division_draws_new_numbers_each_replay():
    model, plain, method, images, target = _models_and_batch("division")
    graphed = GraphedStep(model, method, cfg_for(), torch.device("cuda"), warmup=1)
    from division.triton_codec import graph_seed_counter
    counter = graph_seed_counter(torch.device("cuda"))
    graphed(images, target)            # eager
    before = int(counter)
    graphed(images, target)            # capture + first replay
    first = _grads(model)
    per_replay = int(counter) - before
    assert per_replay > 0              # one advance per captured encode
    graphed(images, target)
    second = _grads(model)
    assert int(counter) - before == 2 * per_replay
    assert graphed.replays == 2
    # same batch, same weights: only the rounding noise differs, and it must differ
    assert any(not torch.equal(a, b) for a, b in zip(first, second))
    # as close to exact backward as an eager DIVISION step on the same model state, also on a
    # batch the graph was not captured with
    eager = copy.deepcopy(plain)
    division.build_method("division").attach(eager)
    exact = _eager_grads(plain, images, target)  # train-mode BatchNorm: batch statistics only
    reference = _eager_grads(eager, images, target)
    floor = _cosine(reference, exact) - 0.02
    assert _cosine(first, exact) > floor and _cosine(second, exact) > floor
    images, target = _other_batch(images, target, seed=2)
    graphed(images, target)
    exact = _eager_grads(plain, images, target)
    floor = _cosine(_eager_grads(eager, images, target), exact) - 0.02
    assert _cosine(_grads(model), exact) > floor


@pytest.fixture
def deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = saved


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method_name, knobs", [("none", {}), ("division", {"rounding": "nearest"})])
@pytest.mark.parametrize("fast", [False, True], ids=["fp32", "bf16_channels_last"])
def test_gpu_graphed_training_follows_eager_training(method_name, knobs, fast, deterministic_cudnn):
    """SGD with momentum and weight decay over changing batches: the graph's steps and eager steps
    end at the same weights and BatchNorm statistics, bit for bit. DIVISION with nearest rounding is
    deterministic, so a difference would come from the replay, not from the rounding noise (or from
    the graph's encodes, which run on a side stream, against the eager model's inline ones); bf16
    with channels_last runs the kernels of the throughput and accuracy runs. cuDNN runs its
    deterministic algorithms: with the default ones, fp32 weight gradients differ in the last bits
    from run to run (atomics), and eight SGD steps on this small model grow that to 1e-2 in the
    weights, between two eager runs as much as between graph and eager."""
    model, plain, method, images, target = _models_and_batch(method_name, **knobs)
    if method_name != "none":
        division.build_method(method_name, **knobs).attach(plain)
    cfg = cfg_for(*(["precision=bf16", "channels_last=true"] if fast else []))
    if fast:
        for m in (model, plain):
            m.to(memory_format=torch.channels_last)
    graphed = GraphedStep(model, method, cfg, torch.device("cuda"), warmup=2)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for m in (model, plain)]
    for step in range(8):
        x, y = _other_batch(images, target, seed=10 + step)
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        graphed(x, y)
        opts[0].step()
        plain.zero_grad(set_to_none=True)
        forward_loss(plain, x, y, cfg, torch.device("cuda"))[1].backward()
        opts[1].step()
    assert graphed.replays == 6
    for a, b in zip(list(model.parameters()) + list(model.buffers()),
                    list(plain.parameters()) + list(plain.buffers())):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), _models_and_batch("none")[0].parameters()))


@pytest.mark.gpu
@needs_cuda
def test_gpu_other_batch_shape_runs_eagerly_into_the_same_grads():
    model, _, method, images, target = _models_and_batch("division")
    graphed = GraphedStep(model, method, cfg_for(), torch.device("cuda"), warmup=1)
    graphed(images, target)
    graphed(images, target)
    static = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)  # what an optimizer's zero_grad does; the step must recover
    loss, _ = graphed(images[:7], target[:7])
    assert torch.isfinite(loss) and graphed.replays == 1
    assert all(p.grad is g for p, g in zip(model.parameters(), static))
    graphed(images, target)
    assert graphed.replays == 2 and all(p.grad is g for p, g in zip(model.parameters(), static))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["none", "division", "blpa", "actnn"])
def test_gpu_speed_and_train_modes_with_cuda_graph(tmp_path, method):
    common = [f"method={method}", "device=cuda", "cuda_graph=true", f"results_dir={tmp_path}/store"]
    speed = run_job(cfg_for("mode=speed", "batch_size=64", "speed.warmup=1", "speed.steps=5", *common),
                    tmp_path / "speed")
    assert speed["status"] == "ok", speed["error"]
    assert speed["cuda_graph"] is True and speed["warmup_steps"] == 4 and speed["images_per_sec"] > 0
    # 100 images in batches of 32: the last batch of 4 runs eagerly
    train = run_job(cfg_for("mode=train", "batch_size=32", "dataset.train_size=100", "dataset.val_size=64",
                            "train.epochs=2", "train.progress=false", *common), tmp_path / "train")
    assert train["status"] == "ok", train["error"]
    assert all(h["train_loss"] == h["train_loss"] for h in train["history"])  # finite, not NaN
