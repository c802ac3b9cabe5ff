"""Self-attention under ``torch.compile``: ``nn.MultiheadAttention`` keeping codes, not tensors.

Compiled, a ``MultiheadAttention``'s saves are the compiler's: the input projection's input, the
fused attention kernel's query, key, value, output and log-sum-exp, and the output projection's
input, all full size. ``attention_forward`` runs the same computation from layers that keep
codes (``division.compiled``): both projections through ``_Linear`` (their inputs as DIVISION
codes at the model's bits) and the attention itself through ``_Attention``, which keeps the codes
of the query, key and value at ``method.attention_bits`` and nothing else.

``_Attention``'s forward is ``F.scaled_dot_product_attention`` (flash or memory-efficient kernels
where they apply). Its backward recomputes the attention probabilities from the decoded query and
key and takes the gradients by the softmax's closed form, in tensor ops the compiler fuses: the
same on every device and PyTorch version (the fused kernels' own backward operators differ
between them), with nothing kept but the three codes; the log-sum-exp is recomputed too, so the
forward's probabilities are not mixed with decoded inputs. The probabilities are one (L, L) map
per head, formed in backward only: transient, like the math path's.

Covered: self-attention (query, key and value the same tensor), ``batch_first``, one packed input
projection with biases, no masks, no attention dropout, ``need_weights=False`` (how torchvision's
ViT calls it). Any other call runs the module's own forward, saved as the compiler chooses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .compiled import TensorCodec, _Linear


class _Attention(torch.autograd.Function):
    """Scaled dot-product attention of (N, heads, L, E) query, key and value, keeping their codes."""

    @staticmethod
    def forward(ctx, q, k, v, codec: TensorCodec):
        out = F.scaled_dot_product_attention(q, k, v)
        stored, ctx.layouts, ctx.sizes = [], [], []
        for t in (q, k, v):
            layout, kept = codec.encode(t)
            ctx.layouts.append(layout)
            ctx.sizes.append(len(kept))
            stored += kept
        ctx.save_for_backward(*stored)
        ctx.codec = codec
        return out

    @staticmethod
    def backward(ctx, grad):
        saved, decoded, at = ctx.saved_tensors, [], 0
        for layout, size in zip(ctx.layouts, ctx.sizes):
            decoded.append(ctx.codec.decode(layout, tuple(saved[at:at + size])))
            at += size
        q, k, v = decoded
        dtype, scale = grad.dtype, q.shape[-1] ** -0.5
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        # matrix products in the activations' precision, the softmax and its gradient in fp32
        p = torch.softmax((q @ k.transpose(-2, -1)).float() * scale, dim=-1)
        dv = p.to(dtype).transpose(-2, -1) @ grad
        dp = (grad @ v.transpose(-2, -1)).float()
        ds = (p * (dp - (dp * p).sum(-1, keepdim=True)) * scale).to(dtype)
        return ds @ k, ds.transpose(-2, -1) @ q, dv, None


def attention_applies(module: nn.Module) -> bool:
    """The ``nn.MultiheadAttention`` configurations ``attention_forward`` computes (module docstring)."""
    return (type(module) is nn.MultiheadAttention and module.batch_first and module._qkv_same_embed_dim
            and module.in_proj_bias is not None and module.out_proj.bias is not None
            and module.bias_k is None and not module.add_zero_attn and module.dropout == 0.0)


def attention_call_applies(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal) -> bool:
    """A call ``attention_forward`` can serve: batched self-attention with no mask and no weights."""
    return (query is key and key is value and query.dim() == 3 and key_padding_mask is None
            and attn_mask is None and not need_weights and not is_causal)


def attention_forward(module: nn.MultiheadAttention, x: torch.Tensor, codec: TensorCodec,
                      attention: TensorCodec) -> torch.Tensor:
    """The module's output for self-attention over x (N, L, E); its attention weights are not formed."""
    n, length, embed = x.shape
    heads = module.num_heads
    qkv = _Linear.apply(x, module.in_proj_weight, module.in_proj_bias, codec)
    # contiguous (N, heads, L, E) maps: what the fused kernels code (a strided view would take
    # the tensor-op codec) and what the attention kernels read best
    q, k, v = qkv.view(n, length, 3, heads, embed // heads).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    out = _Attention.apply(q, k, v, attention).transpose(1, 2).reshape(n, length, embed)
    return _Linear.apply(out, module.out_proj.weight, module.out_proj.bias, codec)
