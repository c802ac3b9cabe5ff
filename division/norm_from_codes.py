"""BatchNorm layers whose backward reads their input's DIVISION codes directly (``method.norm_from_codes``).

While a ``BatchNorm2d`` runs forward, the compressor holds a ``NormFromCodes`` mode (a
``TorchFunctionMode``, entered and left by the module's own hooks, so nothing else is
intercepted). The mode takes the module's ``F.batch_norm`` call, when it trains on an input the
fused kernels cover (channels_last, NHWC-ordered codes: ``triton_norm.applies``), and runs it as
``_BatchNormFromCodes``: the forward fused into the input's encode (``triton_norm.batch_norm_forward``,
where ``triton_norm.forward_applies``; else ``torch.native_batch_norm`` and the input stored through
the compressor's codec), and the backward of ``division/triton_norm.py``, which rebuilds the input
in registers instead of decoding it to memory. Any other call runs unchanged.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from .codec import Packed


_CODES = ("codes", "lfc", "mn", "step")


class _BatchNormFromCodes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, mode, plan):
        fused = mode.fused(x, plan, weight, bias, running_mean, running_var, momentum, eps)
        if fused is not None:
            y, mean, invstd, packed = fused
        else:
            y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True,
                                                      momentum, eps)
            packed: Packed = mode.store(x)
        ctx.plan = plan
        ctx.has_bias = bias is not None
        # Saved tensors, not ctx attributes: autograd frees them after backward (keeps them with
        # retain_graph), as it does the plain BatchNorm's input.
        codes = tuple(packed.tensors[k] for k in _CODES)
        mode.save(ctx, (weight, mean, invstd, *codes), codes)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        from .triton_norm import batch_norm_backward
        weight, mean, invstd, *codes = ctx.saved_tensors
        # (the fused encode that ``plan`` ran keeps the LFC in channels_last memory, as the kernels read it)
        dx, dw, db = batch_norm_backward(dy, dict(zip(_CODES, codes)), ctx.plan, weight, mean, invstd)
        return dx, dw, db if ctx.has_bias else None, None, None, None, None, None, None


class NormFromCodes(TorchFunctionMode):
    """Runs a training ``F.batch_norm`` whose input the codec can store in the fused kernels'
    format as ``_BatchNormFromCodes``. ``plan_for(x)``: the codec's plan for x if the fused
    backward reads it (else None); ``fused(x, plan, weight, bias, running_mean, running_var,
    momentum, eps)``: the batch norm fused into x's encode, (y, mean, invstd, x's Packed), or None
    where it does not run; ``store(x)``: encode x (the compressor's encode, ledger and side stream
    included), returning its Packed; ``save(ctx, tensors, stored)``: ``ctx.save_for_backward``
    with the tensors of ``stored`` kept as they are (the codes are stored already)."""

    def __init__(self, plan_for: Callable[[torch.Tensor], Optional[object]], fused: Callable[..., Optional[tuple]],
                 store: Callable[[torch.Tensor], Packed], save: Callable[..., None]):
        super().__init__()
        self.plan_for = plan_for
        self.fused = fused
        self.store = store
        self.save = save
        self.calls = 0  # batch norms run from codes so far

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            taken = self._from_codes(*args, **kwargs)
            if taken is not None:
                return taken
        return func(*args, **kwargs)

    def _from_codes(self, x, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5):
        if not (training and torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad):
            return None
        plan = self.plan_for(x)
        if plan is None:
            return None
        self.calls += 1
        return _BatchNormFromCodes.apply(x, weight, bias, running_mean, running_var, momentum, eps, self, plan)
