"""Activation functions kept for backward by their derivative instead of their input.

Hardswish's derivative jumps at x = -3 (0 to -1/2) and x = 3 (3/2 to 1). Kept as its input in
DIVISION's codes (as autograd keeps it), a decoded input that lands on the other side of a jump
takes the wrong derivative branch: an error of half the gradient, whatever the bits. On
MobileNetV3-Large that alone held the gradient cosine at 8 bits to 0.9987 (0.9999 with
Hardswish's input kept exact; scripts/gradient_fidelity.py, 2 images at 224). Keeping the
derivative itself (``hardswish_backward`` at a gradient of ones) costs the same bytes once coded,
and its coding error is bounded by its own quantization step, with no branch to land in wrongly;
backward is one multiplication.

``HardswishKeepingDerivative`` saves the derivative as an ordinary tensor, which the eager
compressor's hooks code like any other save; the compiled path (``division.compiled``) encodes it
itself. Either way the output is computed out of place, also for ``Hardswish(inplace=True)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KEEPS_DERIVATIVE = (nn.Hardswish,)  # modules whose training forward saves their derivative


def hardswish_derivative(x: torch.Tensor) -> torch.Tensor:
    """d hardswish / dx at x, with PyTorch's own branch boundaries (its backward at a gradient of
    ones: a broadcast scalar, so no full-size tensor of ones is allocated)."""
    ones = torch.ones((), dtype=x.dtype, device=x.device).expand_as(x)
    return torch.ops.aten.hardswish_backward(ones, x)


class HardswishKeepingDerivative(torch.autograd.Function):
    """``F.hardswish`` whose backward reads its saved derivative (see the module docstring)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(hardswish_derivative(x))
        return F.hardswish(x)

    @staticmethod
    def backward(ctx, grad):
        (derivative,) = ctx.saved_tensors
        return grad * derivative
