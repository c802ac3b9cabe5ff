"""Encodes on a side CUDA stream (``division.encode_stream``, ``method.side_stream``).

The knob and the CPU behaviour are checked everywhere; that a side-stream step computes exactly
what an inline one does needs a GPU (``pytest -m gpu``; the CUDA-graph case is in test_graph_step).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import division
from division.encode_stream import SideStreamEncoder
from models import build_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cpu_tensors_are_encoded_inline():
    encoder = SideStreamEncoder(lag=2)
    x = torch.randn(4, 8)
    assert encoder.run(lambda t: t * 2, x).equal(x * 2)
    assert not encoder._in_flight  # nothing queued, nothing to wait for
    encoder.join()


def test_lag_must_be_positive():
    with pytest.raises(ValueError, match="lag must be at least 1"):
        SideStreamEncoder(lag=0)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_side_stream_knob_is_checked(bad):
    with pytest.raises(ValueError, match="side_stream must be one of"):
        division.build_method("division", side_stream=bad)


@pytest.mark.parametrize("knob, eager, graph", [("auto", False, True), (True, True, True), (False, False, False)])
def test_side_stream_knob_decides_where_encodes_run(knob, eager, graph):
    """auto: a side stream only once the step is going to be captured in a CUDA graph."""
    method = division.build_method("division", side_stream=knob)
    method.attach(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))
    assert (method.compressor.encode_stream is not None) == eager
    method.use_cuda_graph()
    assert (method.compressor.encode_stream is not None) == graph


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("lag", [1, 2, 8])
def test_gpu_side_stream_training_is_bit_identical(lag):
    """ResNet-20, bf16 channels_last, DIVISION with nearest rounding (deterministic), four SGD
    steps: encodes on a side stream (any lag) end at the weights of inline encodes, bit for bit.
    An encode reading its input after the main stream reused that memory would not."""
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        torch.manual_seed(0)
        base = build_model("resnet20", num_classes=10).cuda().to(memory_format=torch.channels_last).train()
        models = [copy.deepcopy(base), copy.deepcopy(base)]
        methods = [division.build_method("division", rounding="nearest", side_stream=s) for s in (False, True)]
        for model, method in zip(models, methods):
            method.attach(model)
        methods[1].compressor.encode_stream = SideStreamEncoder(lag=lag)
        opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
        g = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(4):
            x = torch.randn(64, 3, 32, 32, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (64,), device="cuda", generator=g)
            for model, opt in zip(models, opts):
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x).float(), y)
                loss.backward()
                opt.step()
        for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
            assert torch.equal(a, b)
        assert not methods[1].compressor.encode_stream._in_flight  # joined at the end of forward
    finally:
        torch.backends.cudnn.deterministic = saved
