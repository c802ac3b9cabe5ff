"""Encodes on a side CUDA stream (``division.encode_stream``, ``method.side_stream``).

The knob (with ``method.prefetch_decode``'s, which moves decodes to a side stream) and the CPU
behaviour are checked everywhere; that a side-stream step computes exactly what an inline one does
needs a GPU (``pytest -m gpu``; the CUDA-graph case is in test_graph_step).
"""
from __future__ import annotations

import pytest
import torch

import division
from division.encode_stream import SideStreamEncoder
from tests.helpers import train_side_by_side

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


# The two knobs that move codec work to a side stream, and the compressor attribute each sets.
STREAM_KNOBS = [("side_stream", "encode_stream"), ("prefetch_decode", "prefetcher")]


@pytest.mark.parametrize("knob", [knob for knob, _ in STREAM_KNOBS])
@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_stream_knobs_are_checked(knob, bad):
    with pytest.raises(ValueError, match=f"{knob} must be one of"):
        division.build_method("division", **{knob: bad})


@pytest.mark.parametrize("knob, attribute", STREAM_KNOBS)
@pytest.mark.parametrize("value, eager, graph", [("auto", False, True), (True, True, True), (False, False, False)])
def test_stream_knobs_decide_where_codec_work_runs(knob, attribute, value, eager, graph):
    """auto: a side stream only once the step is going to be captured in a CUDA graph."""
    method = division.build_method("division", **{knob: value})
    method.attach(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))
    assert (getattr(method.compressor, attribute) is not None) == eager
    method.use_cuda_graph()
    assert (getattr(method.compressor, attribute) is not None) == graph


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("lag", [1, 2, 8])
def test_gpu_side_stream_training_is_bit_identical(lag):
    """ResNet-20, bf16 channels_last, DIVISION with nearest rounding (deterministic), four SGD
    steps: encodes on a side stream (any lag) end at the weights of inline encodes, bit for bit.
    An encode reading its input after the main stream reused that memory would not."""
    methods = [division.build_method("division", rounding="nearest", side_stream=s) for s in (False, True)]

    def lagged(methods):
        methods[1].compressor.encode_stream = SideStreamEncoder(lag=lag)
    inline, side = train_side_by_side(methods, prepare=lagged)
    for a, b in zip(inline.values(), side.values()):
        assert torch.equal(a, b)
    assert not methods[1].compressor.encode_stream._in_flight  # joined at the end of forward
