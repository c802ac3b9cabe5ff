"""Swin's shifted-window attention under ``torch.compile``, keeping codes, not tensors.

torchvision's ``ShiftedWindowAttention`` runs a function of its own (``shifted_window_attention``):
F.linear, matmul and softmax, whose saves a compiled graph keeps raw (the windows' tokens, query, key,
value, the softmax probabilities and the projection's input). Compiled, ``window_attention_forward``
computes the same output from layers that keep codes: both projections through ``_Linear`` (their
inputs at the model's bits, in autocast's dtype), and the attention through ``_WindowAttention``, which keeps the codes of
the query, key and value at ``method.attention_bits`` and the (heads, L, L) relative position bias;
its backward decodes them and recomputes the probabilities (one window's L x L scores, L = 49 for
Swin-T) in fp32 rather than storing them.

The geometry (padding to whole windows, the cyclic shift and its mask, the window partition and its
reverse) follows torchvision's function step by step. Swin V2 (cosine attention, ``logit_scale``) and
attention or projection dropout in training keep the module's own forward, saved as the compiler
chooses (``applies``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .compiled import TensorCodec, linear_forward
from .compiled_attention import decode_each, encode_each


def applies(module: nn.Module) -> bool:
    """torchvision's ShiftedWindowAttention itself (not V2), without dropout in training."""
    return (type(module).__name__ == "ShiftedWindowAttention"
            and type(module).__module__ == "torchvision.models.swin_transformer"
            and module.attention_dropout == 0 and module.dropout == 0)


def shift_mask(pad_h: int, pad_w: int, window: list, shift: list, device) -> torch.Tensor:
    """(windows, L, L): 0 between tokens of one region of the shifted map, -100 between regions
    (torchvision's mask, whose regions are the three bands of rows and of columns the shift makes)."""
    regions = torch.zeros((pad_h, pad_w), device=device)
    count = 0
    for h0, h1 in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w0, w1 in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[h0:h1, w0:w1] = count
            count += 1
    regions = regions.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    regions = regions.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    differ = regions.unsqueeze(1) - regions.unsqueeze(2)
    return torch.where(differ != 0, -100.0, 0.0)


def window_attention_forward(module: nn.Module, x: torch.Tensor, codec: TensorCodec,
                             attention: TensorCodec) -> torch.Tensor:
    """The module's output for x (N, H, W, C), as ``shifted_window_attention`` computes it."""
    n, h, w, c = x.shape
    window, heads = list(module.window_size), module.num_heads
    pad_r, pad_b = (window[1] - w % window[1]) % window[1], (window[0] - h % window[0]) % window[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    pad_h, pad_w = x.shape[1], x.shape[2]
    shift = [0 if window[0] >= pad_h else module.shift_size[0], 0 if window[1] >= pad_w else module.shift_size[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = (pad_h // window[0]) * (pad_w // window[1])
    length = window[0] * window[1]
    x = x.view(n, pad_h // window[0], window[0], pad_w // window[1], window[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(n * windows, length, c)

    qkv = linear_forward(module.qkv, x, codec)
    q, k, v = qkv.reshape(n * windows, length, 3, heads, c // heads).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    mask = shift_mask(pad_h, pad_w, window, shift, x.device) if sum(shift) > 0 else None
    out = _WindowAttention.apply(q, k, v, module.get_relative_position_bias(), mask, windows, attention)
    out = out.transpose(1, 2).reshape(n * windows, length, c)
    out = linear_forward(module.proj, out, codec)

    out = out.view(n, pad_h // window[0], pad_w // window[1], window[0], window[1], c)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(n, pad_h, pad_w, c)
    if sum(shift) > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :h, :w, :].contiguous()


def _scores(q, k, bias, mask: Optional[torch.Tensor], windows: int) -> torch.Tensor:
    """softmax's input: (q / sqrt(E)) k^T + the relative position bias (+ the shift mask per window)."""
    s = (q * q.shape[-1] ** -0.5).matmul(k.transpose(-2, -1)) + bias
    if mask is not None:
        b, heads, length, _ = s.shape
        s = (s.view(b // windows, windows, heads, length, length) + mask.unsqueeze(1).unsqueeze(0)).view(b, heads, length, length)
    return s


class _WindowAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(E) + bias [+ mask]) v over (windows, heads, L, E) maps, keeping the codes
    of q, k and v; backward recomputes the probabilities from their decodes, in fp32."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, windows: int, codec: TensorCodec):
        out = F.softmax(_scores(q, k, bias, mask, windows), dim=-1).matmul(v)
        ctx.layouts, stored = encode_each(codec, (q, k, v))
        ctx.save_for_backward(bias, mask, *stored)
        ctx.codec, ctx.windows = codec, windows
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        bias, mask, *saved = ctx.saved_tensors
        q, k, v = (t.float() for t in decode_each(ctx.codec, ctx.layouts, saved))
        p = F.softmax(_scores(q, k, bias.float(), mask, ctx.windows), dim=-1)
        g = grad.float()
        dv = p.transpose(-2, -1).matmul(g)
        dp = g.matmul(v.transpose(-2, -1))
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))  # softmax's backward
        scale = q.shape[-1] ** -0.5
        dq = ds.matmul(k) * scale
        dk = ds.transpose(-2, -1).matmul(q) * scale
        dbias = ds.sum(0, keepdim=True) if bias.shape[0] == 1 else ds
        dq, dk, dv, dbias = (t.to(dtype) for t, dtype in zip((dq, dk, dv, dbias), ctx.dtypes))
        return dq, dk, dv, dbias, None, None, None
