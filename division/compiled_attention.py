"""Self-attention under ``torch.compile``: ``nn.MultiheadAttention`` keeping codes, not tensors.

Compiled, a ``MultiheadAttention``'s saves are the compiler's: the input projection's input, the
fused attention kernel's query, key, value, output and log-sum-exp, and the output projection's
input, all full size. ``attention_forward`` computes the module's output as
``division.attention.self_attention`` does, from layers that keep codes (``division.compiled``):
both projections through ``_Linear`` (their inputs as DIVISION codes at the model's bits) and the
attention through ``_Attention``, which keeps the codes of the query, key and value at
``method.attention_bits`` and nothing else. Its backward is ``attention_backward``: the fused
attention kernels' forward and backward over the decoded query, key and value, as eager DIVISION
runs them (``division.attention.fused_attention_gradients``), as one opaque custom op. The
compiler sees neither kernel choice nor backward operator (those differ between devices and
PyTorch versions), and the probabilities are never written out: recomputed in tensor ops the
compiler fused, they were (N, heads, L, L) maps whose matrix products over ViT-B/16's 197 tokens
ran as unaligned GEMMs.
Calls ``division.attention`` does not cover run the module's own forward, saved as the compiler
chooses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import fused_attention_gradients, self_attention
from .compiled import TensorCodec, _Linear


@torch.library.custom_op("division::attention_backward", mutates_args=())
def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``F.scaled_dot_product_attention(q, k, v)`` at ``grad``, by its fused
    kernels, contiguous (the layout the fake implementation promises the compiler)."""
    return tuple(g.contiguous() for g in fused_attention_gradients(q, k, v, grad))


@attention_backward.register_fake
def _attention_backward_fake(q, k, v, grad):
    return tuple(torch.empty(t.shape, dtype=grad.dtype, device=grad.device) for t in (q, k, v))


class _Attention(torch.autograd.Function):
    """Scaled dot-product attention of (N, heads, L, E) query, key and value, keeping their codes."""

    @staticmethod
    def forward(ctx, q, k, v, codec: TensorCodec):
        out = F.scaled_dot_product_attention(q, k, v)
        ctx.layouts, stored = encode_each(codec, (q, k, v))
        ctx.save_for_backward(*stored)
        ctx.codec = codec
        return out

    @staticmethod
    def backward(ctx, grad):
        return (*attention_backward(*decode_each(ctx.codec, ctx.layouts, ctx.saved_tensors), grad), None)


def encode_each(codec: TensorCodec, tensors) -> tuple[list, list[torch.Tensor]]:
    """Each tensor's (layout, number of tensors kept), and all that is kept, one after the other."""
    layouts, stored = [], []
    for t in tensors:
        layout, kept = codec.encode(t)
        layouts.append((layout, len(kept)))
        stored += kept
    return layouts, stored


def decode_each(codec: TensorCodec, layouts: list, saved) -> list[torch.Tensor]:
    """The tensors ``encode_each`` kept, decoded (``saved`` may go on past them)."""
    decoded, at = [], 0
    for layout, size in layouts:
        decoded.append(codec.decode(layout, tuple(saved[at:at + size])))
        at += size
    return decoded


def attention_forward(module: nn.MultiheadAttention, x: torch.Tensor, codec: TensorCodec,
                      attention: TensorCodec, input_recipe=None) -> torch.Tensor:
    """The module's output for self-attention over x (N, L, E); its attention weights are not formed.
    ``input_recipe``: what the input projection rebuilds x from in backward, keeping nothing of it
    (``division.compiled_rebuild``, a LayerNorm's output); None: it keeps x's codes."""
    from .compiled_rebuild import linear_with_recipe

    def linear(t, weight, bias):
        if input_recipe is not None and t is x:
            return linear_with_recipe(t, weight, bias, codec, input_recipe)
        return _Linear.apply(t, weight, bias, codec)
    return self_attention(module, x, linear, lambda q, k, v: _Attention.apply(q, k, v, attention))
