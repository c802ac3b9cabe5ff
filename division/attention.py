"""Self-attention whose backward recomputes the attention probabilities from its query, key and value.

The fused attention kernels (flash, memory-efficient) save the query, key, value, output and
log-sum-exp, and their backward recomputes the probabilities as exp(q.k - lse) and cancels dO.V
against dO.O. With the query, key and value decoded from codes but the log-sum-exp and output
exact, those no longer agree: the probabilities do not sum to one and the cancellation leaves the
decode error, amplified once attention is sharp. ``RecomputedAttention`` keeps only the query, key
and value; its backward forms the probabilities from them (a softmax: they sum to one) and takes
the softmax's closed-form gradient, the exact gradient of attention at the decoded inputs.
Measured on (4, 4, 65, 16) heads with logits sharpened 9x, gradient cosine of the query, key and
value against exact backward, flash-style against recomputed: 0.13 -> 0.66 at 4 bits, 0.988 -> 0.997
at 8 bits. It keeps two tensors fewer (output, log-sum-exp).

Eagerly, the backward runs the fused kernels twice over the decoded inputs
(``fused_attention_gradients``): their forward gives the output and log-sum-exp *of those inputs*,
and their backward, fed these, is the exact gradient at the decoded inputs, as the recompute
above, without forming any (L, L) map. The compiled path runs the same function as one opaque
custom op (``division.compiled_attention``). The tensor-op form (``attention_gradients``) is the
reference both are tested against.

``self_attention`` computes ``nn.MultiheadAttention``'s output the same way for the calls it
covers (``attention_applies``, ``attention_call_applies``: self-attention, ``batch_first``, one
packed input projection with biases, no masks, no attention dropout, ``need_weights=False``, as
torchvision's ViT calls it). Eager DIVISION runs it through ``RecomputedAttention``, whose saves
the compressor codes at ``method.attention_bits``; the compiled path through its own function
that keeps the codes (``division.compiled_attention``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def attention_gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor):
    """(dq, dk, dv) of ``scaled_dot_product_attention(q, k, v)`` (default scale, no mask) at ``grad``,
    the probabilities recomputed: matrix products in the activations' precision, the softmax and
    its gradient in fp32."""
    dtype, scale = grad.dtype, q.shape[-1] ** -0.5
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    p = torch.softmax((q @ k.transpose(-2, -1)).float() * scale, dim=-1)
    dv = p.to(dtype).transpose(-2, -1) @ grad
    dp = (grad @ v.transpose(-2, -1)).float()
    ds = (p * (dp - (dp * p).sum(-1, keepdim=True)) * scale).to(dtype)
    return ds @ k, ds.transpose(-2, -1) @ q, dv


def fused_attention_gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor):
    """``attention_gradients`` through ``F.scaled_dot_product_attention``'s own kernels (flash,
    memory-efficient or the CPU's, as it dispatches): its forward recomputed from q, k and v, so the
    output and log-sum-exp its backward reads are those of these inputs. In a ViT-B/16 step (bf16,
    batch 128, H200) the tensor-op form's matrix products over 197 tokens ran as unaligned GEMMs,
    10.6 ms of the 47 ms of GPU time DIVISION added (``scripts/profile_step.py``); this form runs
    one fused forward and one fused backward per layer. ``torch.func.vjp``, not ``autograd.grad``:
    it differentiates also where autograd's dispatch is off, inside the compiled path's custom op
    (``division.compiled_attention``)."""
    dtype = grad.dtype
    _, gradients = torch.func.vjp(F.scaled_dot_product_attention, *(t.detach().to(dtype) for t in (q, k, v)))
    return gradients(grad)


class RecomputedAttention(torch.autograd.Function):
    """``F.scaled_dot_product_attention`` keeping only its query, key and value (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return fused_attention_gradients(*ctx.saved_tensors, grad)


def attention_applies(module: nn.Module) -> bool:
    """The ``nn.MultiheadAttention`` configurations ``self_attention`` computes (module docstring)."""
    return (type(module) is nn.MultiheadAttention and module.batch_first and module._qkv_same_embed_dim
            and module.in_proj_bias is not None and module.out_proj.bias is not None
            and module.bias_k is None and not module.add_zero_attn and module.dropout == 0.0)


def attention_call_applies(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal) -> bool:
    """A call ``self_attention`` can serve: batched self-attention with no mask and no weights."""
    return (query is key and key is value and query.dim() == 3 and key_padding_mask is None
            and attn_mask is None and not need_weights and not is_causal)


def self_attention(module: nn.MultiheadAttention, x: torch.Tensor, linear, attend) -> torch.Tensor:
    """The module's output for self-attention over x (N, L, E), its projections run by
    ``linear(x, weight, bias)`` and the attention of (N, heads, L, E) maps by ``attend(q, k, v)``."""
    n, length, embed = x.shape
    heads = module.num_heads
    qkv = linear(x, module.in_proj_weight, module.in_proj_bias)
    # contiguous (N, heads, L, E) maps: what the attention kernels read best, and what the fused
    # codec kernels code (a strided view would take the tensor-op codec)
    q, k, v = qkv.view(n, length, 3, heads, embed // heads).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    out = attend(q, k, v).transpose(1, 2).reshape(n, length, embed)
    return linear(out, module.out_proj.weight, module.out_proj.bias)


def eager_self_attention(module: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """``self_attention`` in eager training: plain projections, ``RecomputedAttention``."""
    return self_attention(module, x, F.linear, RecomputedAttention.apply)
