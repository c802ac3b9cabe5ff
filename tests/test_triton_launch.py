"""division/triton_launch.py: the compiled-kernel cache that skips Triton's per-call argument binding.

Runs without a GPU: a stand-in kernel records how it was launched. The cache must launch through
the normal path once per key, then call the compiled kernel's launcher directly with the runtime
arguments followed by the constexprs in signature order (or the runtime arguments alone, for a
launcher that refuses them), and never cache what the interpreter returns (nothing).
"""
from __future__ import annotations

import pytest
import torch

from division import triton_launch
from division.triton_launch import CachedLaunch


class FakeCompiled:
    """What ``kernel[grid](...)`` returns on a GPU: handles plus a launcher with a fixed arity."""

    function = "fn-handle"
    packed_metadata = "meta"

    def __init__(self, arity):
        self.arity = arity
        self.runs = []

    def __getitem__(self, grid):  # loads the handles in real Triton
        return lambda *a, **k: None

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit, *args):
        if len(args) != self.arity:
            raise TypeError(f"expected {self.arity} kernel arguments, got {len(args)}")
        self.runs.append(((gx, gy, gz), function, metadata, args))


class FakeKernel:
    """A JIT function stand-in: ``arg_names`` in signature order, runtime arguments first."""

    arg_names = ["x", "n", "A", "B"]

    def __init__(self, arity, interpreted=False):
        self.compiled = None if interpreted else FakeCompiled(arity)
        self.normal = []

    def __getitem__(self, grid):
        def launch(*args, num_warps, **constexprs):
            self.normal.append((grid, args, constexprs, num_warps))
            return self.compiled
        return launch


@pytest.fixture
def fresh_style(monkeypatch):
    monkeypatch.setattr(triton_launch, "_style", None)
    monkeypatch.setattr(triton_launch, "_current_stream", lambda device: 7)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.parametrize("arity, style", [(4, "all"), (2, "runtime")])
def test_first_call_normal_then_direct_with_constexprs_in_signature_order(fresh_style, arity, style):
    kernel = FakeKernel(arity)
    launcher = CachedLaunch(kernel)
    args = ("tensor", 10)
    launcher.launch("k", (3,), args, {"B": 2, "A": 1}, 4)          # kwargs out of signature order
    assert len(kernel.normal) == 1 and kernel.compiled.runs == []
    built = []
    launcher.launch("k", (5,), args, lambda: built.append(1) or {"B": 2, "A": 1}, 4)
    launcher.launch("k", (6, 2), args, {"B": 2, "A": 1}, 4)
    assert len(kernel.normal) == 1 and not built                   # constexprs not even built
    expected = args + (1, 2) if style == "all" else args
    assert kernel.compiled.runs == [((5, 1, 1), "fn-handle", "meta", expected),
                                    ((6, 2, 1), "fn-handle", "meta", expected)]
    assert triton_launch.direct_launch_style() == style


def test_new_key_takes_the_normal_path(fresh_style):
    kernel = FakeKernel(4)
    launcher = CachedLaunch(kernel)
    launcher.launch("k1", (1,), ("t", 1), {"A": 0, "B": 0}, 4)
    launcher.launch("k2", (1,), ("t", 1), {"A": 5, "B": 0}, 4)
    assert [c for _, _, c, _ in kernel.normal] == [{"A": 0, "B": 0}, {"A": 5, "B": 0}]
    launcher.launch("k2", (1,), ("t", 1), {"A": 5, "B": 0}, 4)
    assert kernel.compiled.runs[-1][3] == ("t", 1, 5, 0)


def test_interpreter_launches_are_never_cached(fresh_style):
    kernel = FakeKernel(4, interpreted=True)
    launcher = CachedLaunch(kernel)
    for _ in range(3):
        launcher.launch("k", (1,), ("t", 1), {"A": 0, "B": 0}, 4)
    assert len(kernel.normal) == 3 and triton_launch.direct_launch_style() is None


def test_a_launcher_that_takes_neither_style_falls_back_for_good(fresh_style):
    kernel = FakeKernel(3)
    launcher = CachedLaunch(kernel)
    for _ in range(3):
        launcher.launch("k", (1,), ("t", 1), {"A": 0, "B": 0}, 4)
    assert len(kernel.normal) == 3 and kernel.compiled.runs == []
    assert triton_launch.direct_launch_style() == "none"


def test_aligned():
    buf = torch.empty(64, dtype=torch.uint8)
    assert triton_launch.aligned(buf)
    assert not triton_launch.aligned(buf[1:])


def test_host_grid_arithmetic_matches_triton():
    """``cdiv`` and ``next_power_of_2`` stand in for Triton's constexpr functions in host code."""
    triton = pytest.importorskip("triton")
    for a in range(0, 2100):
        for b in (1, 2, 3, 8, 16, 64, 1024):
            assert triton_launch.cdiv(a, b) == triton.cdiv(a, b), (a, b)
        assert triton_launch.next_power_of_2(a) == triton.next_power_of_2(a), a
