"""Decodes ahead of backward on a side CUDA stream (``division.decode_prefetch``,
``method.prefetch_decode``).

The save-order links and the CPU behaviour are checked everywhere (the knob with side_stream's, in
test_encode_stream); that a step with prefetched decodes computes exactly what one without does
needs a GPU (``pytest -m gpu``; the CUDA-graph case is in test_graph_step, where ``auto`` turns it
on).
"""
from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import nn

import division
from division.codec import Packed, RawCodec
from division.decode_prefetch import _READY, PREVIOUS, DecodePrefetcher
from tests.helpers import train_side_by_side

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_ahead_must_be_positive():
    with pytest.raises(ValueError, match="ahead must be at least 1"):
        DecodePrefetcher(ahead=0)


@pytest.mark.parametrize("ahead, started_at", [
    (1, {4: 5, 3: 4, 2: 3, 1: 2, 0: 1}),
    (2, {4: 5, 3: 5, 2: 4, 1: 3, 0: 2}),
    (3, {4: 5, 3: 5, 2: 5, 1: 4, 0: 3}),
])
def test_decodes_start_ahead_in_the_reverse_of_save_order(monkeypatch, ahead, started_at):
    """Six saves p0..p5 unpacked in reverse: p_k's decode starts at the unpack of p_{k+ahead}
    (at p5's for the first ones), nearest first, with never more than ``ahead`` waiting."""
    saved = []
    for k in range(6):
        saved.append(Packed(RawCodec(), {"x": torch.zeros(1)}, {PREVIOUS: weakref.ref(saved[-1]) if saved else None}))
    prefetcher = DecodePrefetcher(ahead)
    started, waiting = {}, []
    monkeypatch.setattr(prefetcher, "_queue_join", lambda: True)

    def launch(packed):
        packed.meta[_READY] = "decoded"
        waiting.append(packed)
        started[saved.index(packed)] = unpacking
        return True
    monkeypatch.setattr(prefetcher, "_launch", launch)
    peak = 0
    for unpacking in range(5, -1, -1):
        packed = saved[unpacking]
        if packed.meta.pop(_READY, None) is not None:  # the codec's decode takes it
            waiting.remove(packed)
        prefetcher.after_unpack(packed)
        peak = max(peak, len(waiting))
    assert started == started_at
    assert list(started) == sorted(started, reverse=True)  # nearest first
    assert peak == ahead and prefetcher.launched == 5


def _step(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_saves_link_to_the_previous_one_and_cpu_decodes_stay_inline():
    """Each activation-codec Packed links to the one saved before it (the first to none); a
    tensor saved twice keeps one link and counts its readers; on the CPU nothing runs ahead and
    the gradients are those of the step without a prefetcher."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 16 * 16, 4))
    x = torch.randn(4, 3, 16, 16)
    plain = division.build_method("division", rounding="nearest", prefetch_decode=False)
    plain.attach(copy.deepcopy(net))
    ahead = division.build_method("division", rounding="nearest", prefetch_decode=True)
    ahead.attach(net)
    saved = []
    encode = ahead.compressor._encode
    ahead.compressor._encode = lambda *args: saved.append(encode(*args)) or saved[-1]
    want = _step(plain.compressor.model, x)
    got = _step(net, x)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    linked = [p for p in saved if PREVIOUS in p.meta]
    assert len(linked) == 5  # conv, bn, conv, bn, linear inputs (the masks are not linked)
    assert linked[0].meta[PREVIOUS] is None
    assert all(b.meta[PREVIOUS]() is a for a, b in zip(linked, linked[1:]))
    assert ahead.compressor.prefetcher.launched == 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("ahead", [1, 2])
def test_gpu_prefetched_training_is_bit_identical(ahead):
    """ResNet-20, bf16 channels_last, DIVISION with nearest rounding (deterministic), four SGD
    steps: with decodes prefetched on a side stream the weights end where they end without,
    bit for bit, and decodes did run ahead. A prefetched decode read before it finished, or
    written into memory the main stream still read, would not give this."""
    methods = [division.build_method("division", rounding="nearest", prefetch_decode=p, prefetch_ahead=ahead)
               for p in (False, True)]
    inline, ahead = train_side_by_side(methods)
    for a, b in zip(inline.values(), ahead.values()):
        assert torch.equal(a, b)
    prefetcher = methods[1].compressor.prefetcher
    assert prefetcher.launched >= 4 * 10  # most of ResNet-20's ~40 codec saves per step
    assert not prefetcher._pending  # joined at the end of each backward
