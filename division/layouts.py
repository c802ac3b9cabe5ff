"""Fitting the DIVISION codec's blocks to tensors that are not (N, C, H, W) maps.

The codec pools 2-D maps (``division.dual_precision``: one mn / step pair per (n, c) map, LFC blocks
over its last two dims). A transformer or a channels-last CNN saves other shapes, and read as maps
those would pool across channels (whose scales differ by orders of magnitude in a transformer).
``LayoutCodec`` shows the codec a 4-D view of such a tensor in which the channels are C and the
blocks run over tokens or pixels, and gives backward the tensor back in its own shape:

==================  ==========================  ================================================
layout              saved tensor                view the codec encodes (N, C, H, W)
==================  ==========================  ================================================
``nhwc``            (N, H, W, C)                permute: (N, C, H, W), channels_last: 2-D blocks
``grid``            (N, k * k, C), k >= 4       (N, C, k, k), channels_last: 2-D blocks of the
                                                token grid (a Swin window, a ViT's patches)
``cls_grid``        (N, 1 + k * k, C), k >= 4   the first token (a class token) kept exactly,
                                                the other k * k tokens as ``grid``
``tokens``          (N, L, C), other L          (N, C, L, 1): blocks of B tokens per channel
``rows``            (M, C) (tokens, flattened)  (M / R, C, R, 1): groups of R rows (``row_group``),
                                                blocks of B rows per channel in each group
==================  ==========================  ================================================

A sequence whose tokens are a square grid (plus a class token in front, as in ViT) is coded over
that grid: an LFC block then covers B x B tokens, 16 bits per B * B elements, where blocks of B
tokens cost 16 bits per B elements (2 bits per element at B = 8, as much as 2-bit codes). The grid
view of a dense (N, k * k, C) tensor is a view; the class token's sequence is split, its grid part
copied once for the encode.

Flattened rows are cut into groups (each with its own mn / step per channel) rather than coded as one
(1, C, M, 1) map: a single map of M = N * H * W rows gives the codec one plane per channel and so C
programs for all of the tensor, and one quantization step per channel over the whole batch. Coded
so, the (401408, 384) rows of a ConvNeXt-T MLP at batch 128 took 32 ms per encode on an H100
(10 GB/s); the same tensor as (N, L, C) tokens codes at the kernels' usual ~1 TB/s.

Attention's (N, heads, L, E) tensors stay (N, C, H, W) maps (one mn / step per head, 2-D blocks of
tokens x head dims): per head dim they cost twice the bytes for no measured gain in gradient fidelity.

A LayerNorm's input is stored normalized (``NormalizedCodec``): its backward normalizes the decoded
input with the statistics of the exact one, so the error that counts is relative to each token's
own spread, and a channel with outlier values (a transformer's residual stream has them) would
make the per-channel quantization step far larger than that spread.

``fit`` picks one from the shape and who saves it (``feature_last``: a Linear or LayerNorm input,
whose last dim is the features by definition); for anything else the codec's own canonical view
applies. The views are strided views of the tensor, so the fused kernels read channels_last ones
in place; the reference path copies where it must.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .codec import ActivationCodec, Packed, SaveContext

NHWC, TOKENS, ROWS, GRID, CLS_GRID = "nhwc", "tokens", "rows", "grid", "cls_grid"
MIN_GRID_SIDE = 4  # a sequence of fewer than 4 x 4 (+ 1) tokens keeps blocks of tokens


MAX_ROW_GROUP = 2048  # rows per group of a ``rows`` view: a token sequence's length or a few image rows


def row_group(rows: int, block_size: int) -> int:
    """R, the rows of each group of a (rows, C) tensor's ``rows`` view: the largest divisor of
    ``rows`` up to ``MAX_ROW_GROUP``, preferring multiples of the block size (no block then spans
    two groups). Flattened activations have batch * tokens or batch * pixels rows, which have
    such divisors; a prime count of rows stays one group."""
    divisors = [r for r in range(min(rows, MAX_ROW_GROUP), 0, -1) if rows % r == 0]
    whole_blocks = [r for r in divisors if r % block_size == 0]
    best = (whole_blocks or divisors)[0]
    return best if best > 1 or rows == 1 else rows


def grid_side(tokens: int) -> Optional[int]:
    """k when ``tokens`` is k * k with k >= MIN_GRID_SIDE, else None."""
    k = math.isqrt(tokens)
    return k if k >= MIN_GRID_SIDE and k * k == tokens else None


def as_maps(x: torch.Tensor, layout: str, block_size: int = 8) -> torch.Tensor:
    """The (N, C, H, W) view of ``x`` that the codec encodes for ``layout`` (the table above)."""
    if layout == NHWC:
        return x.permute(0, 3, 1, 2)
    if layout == GRID:  # (N, k * k, C) as the channels_last map (N, C, k, k)
        n, tokens, c = x.shape
        k = grid_side(tokens)
        return x.reshape(n, k, k, c).permute(0, 3, 1, 2)
    if layout == TOKENS:
        return x.transpose(1, 2).unsqueeze(-1)
    # ROWS: (M, C) as M / R sequences of R tokens (a view when x's rows are dense)
    m, c = x.shape
    r = row_group(m, block_size)
    return x.reshape(m // r, r, c).transpose(1, 2).unsqueeze(-1)


def from_maps(y: torch.Tensor, layout: str, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``as_maps``: the decoded maps ``y`` as the tensor of ``shape``."""
    if layout == NHWC:
        return y.permute(0, 2, 3, 1)
    if layout == GRID:
        return y.permute(0, 2, 3, 1).reshape(shape)
    if layout == TOKENS:
        return y.squeeze(-1).transpose(1, 2)
    return y.squeeze(-1).transpose(1, 2).reshape(shape)  # ROWS


def split_maps(x: torch.Tensor, layout: str, block_size: int = 8,
               in_place=lambda maps: False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(the maps the codec encodes for ``layout``, what is kept exactly beside them or None): for
    ``cls_grid`` the class token (a copy: no view keeps x alive) and the grid's maps: the grid's
    view into x where ``in_place(maps)`` (the fused codec reads such sample-strided maps,
    ``TritonDivisionCodec.takes_sample_strided``), else made dense (the reference codec, the CPU)."""
    if layout == CLS_GRID:
        maps = as_maps(x[:, 1:], GRID)
        if not in_place(maps):
            maps = maps.contiguous(memory_format=torch.channels_last)
        return maps, x[:, :1].clone()
    return as_maps(x, layout, block_size), None


def join_maps(maps: torch.Tensor, head: Optional[torch.Tensor], layout: str, shape) -> torch.Tensor:
    """Inverse of ``split_maps``: the tensor of ``shape`` from its decoded maps (and class token)."""
    if layout == CLS_GRID:
        n, tokens, c = shape
        return torch.cat([head, from_maps(maps, GRID, torch.Size((n, tokens - 1, c)))], dim=1)
    return from_maps(maps, layout, torch.Size(shape))


def split_shape(shape, layout: str, block_size: int = 8) -> tuple[tuple, int]:
    """``split_maps`` on shapes: (the maps' shape, elements kept exactly)."""
    maps, head = split_maps(torch.empty(tuple(shape), device="meta"), layout, block_size)
    return tuple(maps.shape), 0 if head is None else head.numel()


def fit(t: torch.Tensor, feature_last: bool) -> Optional[str]:
    """The layout for ``t``, or None for the codec's own view (4-D (N, C, H, W) maps, (N, F) features).

    4-D: (N, H, W, C) when the features are last (a Linear / LayerNorm input) or dims 1 and 2 are the
    equal sides of a square grid and dim 3 is not; else maps ((N, C, H, W), attention's (N, h, L, E)).
    3-D: a grid of k * k tokens, or a class token and such a grid, else tokens. 2-D: rows, unless it
    is a Linear's own (N, F) input."""
    if t.dim() == 4:
        _, a, b, c = t.shape
        return NHWC if feature_last or (a == b and b != c) else None
    if t.dim() == 3:
        tokens = t.shape[1]
        if grid_side(tokens):
            return GRID
        return CLS_GRID if tokens > 1 and grid_side(tokens - 1) else TOKENS
    if t.dim() == 2 and not feature_last:
        return ROWS
    return None


class LayoutCodec(ActivationCodec):
    """``codec`` applied to the ``layout`` view of each tensor (see the module docstring)."""

    def __init__(self, codec: ActivationCodec, layout: str):
        self.codec = codec
        self.layout = layout
        self.name = codec.name

    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        # a ViT's tokens: the fused codec reads the grid where it lies, behind the class token
        # (a copy of it cost more GPU time than its encode, ViT-B/16 on an H100)
        maps, head = split_maps(x, self.layout, self._block_size(),
                                getattr(self.codec, "takes_sample_strided", lambda maps: False))
        inner = self.codec.encode(maps, ctx)
        kept = inner.tensors if head is None else {**inner.tensors, "cls": head}
        return Packed(self, kept, {"inner": inner, "shape": x.shape})

    def decode(self, packed: Packed) -> torch.Tensor:
        inner, head, shape = packed.meta["inner"], packed.tensors.get("cls"), packed.meta["shape"]
        decode_into = getattr(inner.codec, "decode_into", None)
        if head is not None and decode_into is not None:
            # the grid decoded into its place beside the class token: no concatenation
            tokens = torch.empty(tuple(shape), dtype=head.dtype, device=head.device)
            if decode_into(inner, as_maps(tokens[:, 1:], GRID)):
                tokens[:, :1] = head
                return tokens
        return join_maps(inner.unpack(), head, self.layout, shape)

    def closed_form_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        maps, head = split_shape(shape, self.layout, self._block_size())
        return self.codec.closed_form_nbytes(maps, dtype) + head * dtype.itemsize

    def _block_size(self) -> int:
        return getattr(self.codec, "block_size", 8)

    def describe(self) -> dict:
        return {**self.codec.describe(), "layout": self.layout}


def flattened_activation(t: torch.Tensor) -> Optional[tuple[int, ...]]:
    """One sample's shape of the activation whose flattened rows the 2-D ``t`` is, where coding
    ``t`` as that activation fits it better than ``rows`` does, else None. A Linear's input of more
    than two dims is saved flattened to (rows, C), a view of the input's dense storage (its matmul
    reads it so); the input was:
    - an (N, L, C) token sequence over a square grid (plus a class token): (L, C), coded as the
      grid (``grid``, ``cls_grid``), where ``rows`` would cut it into groups with LFC blocks of B tokens;
    - an (N, H, W, C) map, as ConvNeXt's and Swin's MLPs read theirs: (H, W, C), coded as the
      channels_last map (``nhwc``) with 2-D LFC blocks, 16 bits per B * B elements where blocks of
      B rows cost 16 bits per B. The fused kernels also code maps several times faster than long
      ``rows`` groups (whose programs read channel-strided columns): in a ConvNeXt-T step on an H200
      (bf16, batch 128) those encodes ran at 80-640 GB/s, the same step's maps at 1,100-1,400."""
    base = t._base
    if t.dim() != 2 or base is None or base.dim() not in (3, 4) or base.shape[-1] != t.shape[-1] \
            or base.numel() != t.numel() or not (t.is_contiguous() and base.is_contiguous()) \
            or t.data_ptr() != base.data_ptr():
        return None
    if base.dim() == 3 and fit(base, True) not in (GRID, CLS_GRID):
        return None
    return tuple(base.shape[1:])


class FlattenedRowsCodec(ActivationCodec):
    """(rows, C) flattened from an activation whose samples have ``sample_shape``
    (``flattened_activation``), coded through ``codec`` (a ``LayoutCodec`` fitted to that
    activation) as the (N, *sample_shape) tensor they are."""

    def __init__(self, codec: ActivationCodec, sample_shape: tuple[int, ...]):
        self.codec = codec
        self.sample_shape = tuple(sample_shape)
        self.name = codec.name

    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        inner = self.codec.encode(x.view(-1, *self.sample_shape), ctx)
        return Packed(self, inner.tensors, {"inner": inner, "shape": x.shape})

    def decode(self, packed: Packed) -> torch.Tensor:
        return packed.meta["inner"].unpack().reshape(packed.meta["shape"])

    def closed_form_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        rows = shape[0] * shape[1] // math.prod(self.sample_shape)
        return self.codec.closed_form_nbytes((rows, *self.sample_shape), dtype)

    def describe(self) -> dict:
        return {**self.codec.describe(), "sample_shape": list(self.sample_shape)}


class NormalizedCodec(ActivationCodec):
    """A LayerNorm input over its last ``dims`` dims, stored as ``(x - mean) * rstd`` through
    ``codec`` with mean and rstd kept exactly (fp32, one pair per normalized row); decode undoes it."""

    def __init__(self, codec: ActivationCodec, dims: int):
        self.codec = codec
        self.dims = dims
        self.name = codec.name

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        var, mean = torch.var_mean(x.float(), dim=tuple(range(-self.dims, 0)), keepdim=True, correction=0)
        return mean, (var + 1e-12).rsqrt()

    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        mean, rstd = self._stats(x)
        # (x - mean) * rstd as x * rstd - mean * rstd: one fused multiply-add over the full tensor
        # (in fp32 by type promotion), not a subtraction and a multiplication (ViT-B/16's 25
        # LayerNorm inputs per step: two full-size fp32 passes each, encoding and decoding)
        normalized = torch.addcmul(-mean * rstd, x, rstd)
        inner = self.codec.encode(normalized.to(x.dtype), ctx)
        return Packed(self, {**inner.tensors, "mean": mean, "rstd": rstd}, {"inner": inner, "shape": x.shape})

    def decode(self, packed: Packed) -> torch.Tensor:
        x_hat = packed.meta["inner"].unpack()
        t = packed.tensors
        return torch.addcmul(t["mean"], x_hat, t["rstd"].reciprocal()).to(x_hat.dtype)  # x_hat / rstd + mean

    def closed_form_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        rows = 1
        for size in shape[:len(shape) - self.dims]:
            rows *= size
        return self.codec.closed_form_nbytes(shape, dtype) + 2 * 4 * rows

    def describe(self) -> dict:
        return {**self.codec.describe(), "normalized": True}
