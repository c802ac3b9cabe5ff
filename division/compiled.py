"""DIVISION under ``torch.compile``: layers whose autograd functions save the codes themselves.

The eager path (``division.compressor``) works through ``saved_tensors_hooks`` and module hooks.
A compiled model runs as one autograd function built by AOTAutograd, which saves what its
partitioner chooses; hooks around it see that one function, so they can neither tell layers apart
nor decode one activation at a time in backward (pytorch#148222). So under compilation the known
layers run through the custom ``torch.autograd.Function``s below instead: each one's forward
computes the layer and *returns its storage* (codes, LFC, statistics, 1-bit masks) as what it
saves, and its backward rebuilds the input from them. Dynamo traces forward and backward of these
functions into the joint graph, so the compiled forward keeps only the small tensors, inductor
fuses each encode into the kernels that produce the activation, and each decode runs where the
layer's backward needs it.

``CompiledLayers.install`` puts a dispatching ``forward`` on every known leaf module: while Dynamo
traces (``torch.compiler.is_compiling()``) the module runs its compressing function; in eager
mode it runs its own forward, which the hooks already compress (where they are off, it warns: see
``CompiledLayers._ran_uncompressed``). The model's parameters, buffers
and ``state_dict`` do not change.

What is covered: convolutions (zero padding), BatchNorm in training mode, LayerNorm (its input
normalized, with exact statistics), Linear, ReLU, GELU / SiLU (their input as codes), Hardswish (its derivative as codes) and MaxPool2d (its argmax as a uint8 position in
the window, as the eager path keeps it), and torchvision's ConvNeXt block, whose layer scale's
product keeps the block's output as codes. The rest (average pooling, element-wise ops, modules this file does not know) is saved the way the compiler
chooses; the byte ledger (``SavedTensorCounter``) counts it and ``CompiledLayers.uncovered``
names those layers, so nothing is hidden.

On a GPU, the codec is the fused Triton kernels that eager DIVISION runs, as ``triton_op``s that
inductor launches from its own code (``division.compiled_ops``: one encode and one decode per
activation). With ``TensorCodec(fused_norm=True)`` (experimental, off by default) a training
BatchNorm on a channels_last map runs inside its input's encode and its backward reads the codes
(``_FusedBatchNorm``, the eager path's ``division.triton_norm`` kernels); where
``ConvInputChain.prove`` saw a ReLU module read its output alone, it applies that ReLU too.
Elsewhere (the CPU, shapes the kernels have no plan for, dynamic shapes) it is DIVISION's
PyTorch reference (``division.dual_precision``), written in tensor ops that inductor turns into
kernels. Its stochastic rounding takes its uniform draw from a hash
of each element's value bits and position (``hash_dither``) instead of a random-number op: the
encode is then a pure function of its input, so a graph that reads one tensor's codes twice reads
the same codes. A ResNet block's input, read by conv1 and by the downsample convolution, is encoded
once in the traced graph, as the eager path's cache keeps it once: the downsample convolution reads
conv1's codes (``share_conv_inputs``, ``division.compiled_rebuild``), where an eager forward proved
the tensor unchanged between the two reads. (The compiler's common-subexpression pass would merge
the two encodes of the CPU's reference op, but never the GPU's fused ones.)

With ``rebuild_conv_input``, a convolution that reads a BatchNorm's output (or the ReLU module's
after it) keeps nothing of its input: its backward rebuilds it from what the BatchNorm and the ReLU
keep; so does a Linear (or self-attention, or convolution) reading a GELU's, SiLU's or LayerNorm's
output, from what the activation or the LayerNorm keeps (``division.compiled_rebuild``).

The byte ledger of a compiled step (``SavedTensorCounter``) counts what the compiled graph really
saves, from autograd's own saved-tensor hooks around it: every tensor but the parameters.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import compiled_ops
from .activations import HardswishKeepingDerivative, hardswish_derivative
from .exact import MaxPoolIndexCodec, indices_from_offsets, window_offsets
from .ledger import COMPILED, RECOMPUTED, REBUILT, SHARED, LedgerEntry
from .dual_precision import (LAYOUT_RAW, Geometry, block_mean, canonical_geometry, dequantize, residual,
                             from_canonical, quantize, to_canonical, upsample)
from .layouts import CLS_GRID, fit, join_maps, split_maps, split_shape
from .packing import pack_bits, packed_nbytes, unpack_bits

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------- the codec as tensors
@dataclass(frozen=True)
class TensorCodec:
    """DIVISION's knobs as a hashable constant that a traced function can close over.

    ``fused``: where the fused GPU kernels have a plan for a tensor, encode and decode run them
    (``division.compiled_ops``) instead of tensor ops that inductor generates kernels for; set
    when the eager codec is the fused one (``tensor_codec_for``).

    ``encode`` returns a tuple of tensors (what is kept), ``decode`` rebuilds the activation from
    it; the shapes, dtype and memory format travel separately as a ``Layout``.
    """

    block_size: int = 8
    bits: int = 2
    rounding: str = "stochastic"
    keep_lfc: bool = True
    keep_hfc: bool = True
    fused: bool = False  # the fused GPU kernels as custom ops (division.compiled_ops) where they apply
    # with ``fused``: a channels_last BatchNorm runs inside its input's encode, its backward reads the
    # codes, and a ReLU module reading its output alone is folded in (``_FusedBatchNorm``;
    # ``method.fused_norm``). Off by default: on a GPU its tests pass on small models, but compiled
    # ResNet-50 stopped at Dynamo's recompile limit with it (a graph break at each BatchNorm), before
    # the in-place residual sum on its output was fixed; not re-run on a GPU since, not timed
    # (docs/results.md).
    fused_norm: bool = False

    @property
    def stochastic(self) -> bool:
        return self.rounding == "stochastic"

    def _fused_applies(self, x: torch.Tensor, geom: Geometry) -> bool:
        if not (self.fused and self.keep_lfc and self.keep_hfc) or geom.layout == LAYOUT_RAW:
            return False
        return compiled_ops.applies(x, self.block_size, self.bits, self.stochastic)

    def parts(self, geom: Geometry) -> tuple[bool, bool]:
        """(store the LFC, store the HFC): the same rule as ``DivisionCodec._parts``."""
        if not self.keep_lfc:
            return False, True
        return True, self.keep_hfc and geom.h * geom.w > 1

    def encode(self, x: torch.Tensor, feature_last: Optional[bool] = None
               ) -> tuple["Layout", tuple[torch.Tensor, ...]]:
        """x's layout and what is kept. ``feature_last`` (True for a Linear or LayerNorm input,
        False for an activation function's): code x through the view that fits its shape, as the
        eager path does (``division.layouts.fit``: a token grid as B x B blocks, an (N, H, W, C)
        map per channel, flattened rows in groups); None: the canonical view (maps as they are)."""
        view = None if feature_last is None else _fitted_view(x, feature_last)
        if view is None:
            return self._encode(x)
        maps, head = split_maps(x, view, self.block_size)
        layout, stored = self._encode(maps)
        layout = dataclasses.replace(layout, view=view, view_shape=tuple(x.shape))
        return layout, tuple(stored) + ((head,) if head is not None else ())

    def _encode(self, x: torch.Tensor) -> tuple["Layout", tuple[torch.Tensor, ...]]:
        geom = canonical_geometry(x.shape, x.dtype, self.block_size)
        layout = Layout(tuple(x.shape), x.dtype, _memory_format(x), geom)
        if self._fused_applies(x, geom):
            stored = compiled_ops.fused_encode(x, self.block_size, self.bits, self.stochastic)
            return dataclasses.replace(layout, fused=True), tuple(stored)
        if geom.layout == LAYOUT_RAW:
            return layout, (x,)
        # one opaque op (division.compiled_ops.encode_reference), not tensor ops the compiler sees:
        # its partitioner would otherwise keep a full-size tensor and redo the encodes in backward
        stored = torch.ops.division.encode_reference(x, self.block_size, self.bits, self.rounding,
                                                     self.keep_lfc, self.keep_hfc)
        return layout, tuple(stored)

    def encode_tensors(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The reference encode in tensor ops (a canonical, not raw, geometry): what
        ``division::encode_reference`` runs."""
        geom = canonical_geometry(x.shape, x.dtype, self.block_size)
        has_lfc, has_hfc = self.parts(geom)
        x4 = to_canonical(x, geom)
        stored = []
        hfc = x4
        if has_lfc:
            lfc = block_mean(x4, geom.kh, geom.kw).to(torch.bfloat16)
            stored.append(lfc)
            if has_hfc:
                hfc = residual(x4, lfc, geom)
        if has_hfc:
            noise = hash_dither(x4) if self.rounding == "stochastic" else None
            codes, mn, step = quantize(hfc, self.bits, self.rounding, None, noise, owned=hfc is not x4)
            stored += [pack_bits(codes, self.bits), mn, step]
        return tuple(stored)

    def decode(self, layout: "Layout", stored: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if layout.view is None:
            return self._decode(layout, stored)
        head = stored[-1] if layout.view == CLS_GRID else None  # kept exactly, after the codes
        codes = stored[:-1] if head is not None else stored
        return join_maps(self._decode(layout, codes), head, layout.view, layout.view_shape)

    def _decode(self, layout: "Layout", stored: tuple[torch.Tensor, ...]) -> torch.Tensor:
        geom = layout.geometry
        if layout.fused:
            return compiled_ops.fused_decode(*stored, list(layout.shape), layout.dtype,
                                             layout.memory_format == "channels_last",
                                             self.block_size, self.bits)
        if geom.layout == LAYOUT_RAW:
            return stored[0]
        has_lfc, has_hfc = self.parts(geom)
        x4 = None
        rest = list(stored)
        if has_lfc:
            x4 = upsample(rest.pop(0), geom.kh, geom.kw, geom.h, geom.w)
        if has_hfc:
            packed, mn, step = rest
            codes = unpack_bits(packed, self.bits, geom.numel).view(geom.n, geom.c, geom.h, geom.w)
            hfc = dequantize(codes, mn, step)
            x4 = hfc if x4 is None else x4 + hfc
        return from_canonical(x4, geom, layout.shape, layout.dtype, layout.memory_format)

    def nbytes(self, shape, dtype: torch.dtype, feature_last: Optional[bool] = None) -> int:
        """What ``encode`` keeps for a tensor of this shape and dtype (``feature_last`` as there)."""
        view = None if feature_last is None else _fitted_view(torch.empty(shape, device="meta"), feature_last)
        if view is not None:
            maps, head = split_shape(shape, view, self.block_size)
            return self.nbytes(maps, dtype) + head * dtype.itemsize
        geom = canonical_geometry(shape, dtype, self.block_size)
        if geom.layout == LAYOUT_RAW:
            return math.prod(shape) * dtype.itemsize
        return sum(math.prod(size) * kind.itemsize for size, kind in self.stored_shapes(geom))

    def stored_shapes(self, geom: Geometry) -> list[tuple[tuple, torch.dtype]]:
        """(shape, dtype) of each tensor ``encode_tensors`` keeps for a canonical geometry: the
        LFC, then the packed codes, minimum and step of each map (``parts`` says which)."""
        has_lfc, has_hfc = self.parts(geom)
        out = [((geom.n, geom.c, geom.hb, geom.wb), torch.bfloat16)] if has_lfc else []
        if has_hfc:
            out += [((packed_nbytes(geom.numel, self.bits),), torch.uint8),
                    ((geom.n, geom.c), torch.bfloat16), ((geom.n, geom.c), torch.bfloat16)]
        return out


_LOW31 = 0x7FFFFFFF
_MIX = 0x45D9F3B  # an odd 27-bit multiplier with good avalanche (a well-known 32-bit integer hash's)


def hash_dither(x: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in [0, 1), one per element of fp32 ``x``, from a hash of its bits and index.

    Three rounds of xorshift-multiply over 31-bit words held in int64: every product stays below
    2**58, so no backend's overflow rule matters, and every constant fits in int32, which the
    compiler's kernels may use for an index. The draws are uncorrelated with the fraction being
    rounded for practical purposes, so rounding stays unbiased on average, and they change
    whenever the value does (each step's activations).
    """
    index = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
    h = (x.view(torch.int32).to(torch.int64) ^ index) & _LOW31
    for _ in range(3):
        h = h ^ (h >> 15)
        h = (h * _MIX) & _LOW31
    h = h ^ (h >> 15)
    return (h >> 7).to(torch.float32) * (1.0 / (1 << 24))


def tensor_codec_for(codec, fused_norm: bool = False) -> Optional[TensorCodec]:
    """The compiled form of an eager codec: DIVISION's (reference or fused kernels), except its
    ``simulate`` debugging mode; None for any other codec (the baselines have none). ``fused_norm``:
    ``TensorCodec.fused_norm`` where the codec is the fused kernels'."""
    from .dual_precision import DivisionCodec
    if not isinstance(codec, DivisionCodec) or codec.simulate:
        return None
    fused = type(codec).__name__ == "TritonDivisionCodec"
    return TensorCodec(codec.block_size, codec.bits, codec.rounding, codec.keep_lfc, codec.keep_hfc,
                       fused=fused, fused_norm=fused_norm and fused)


@dataclass(frozen=True)
class Layout:
    """What decode needs besides the stored tensors: the activation's shape, dtype and format."""

    shape: tuple
    dtype: torch.dtype
    memory_format: Optional[str]
    geometry: Geometry
    fused: bool = False  # coded by division.compiled_ops' custom ops (decode with them too)
    view: Optional[str] = None  # coded through this view of the tensor (division.layouts), or as it is
    view_shape: tuple = ()      # the tensor's own shape, when coded through a view (``shape``: the view's)


def _fitted_view(x: torch.Tensor, feature_last: bool) -> Optional[str]:
    """``division.layouts.fit`` for a tensor of static shape (a dynamic one keeps the canonical view)."""
    if not all(type(size) is int for size in x.shape) or not x.is_floating_point() or x.numel() == 0:
        return None
    return fit(x, feature_last)


def _memory_format(x: torch.Tensor) -> Optional[str]:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return None


def _pack_mask(y: torch.Tensor) -> torch.Tensor:
    """``y > 0`` at 1 bit per element, in y's storage order (channels_last stays NHWC)."""
    flat = y.permute(0, 2, 3, 1) if _memory_format(y) == "channels_last" else y
    return pack_bits((flat > 0).reshape(-1).to(torch.uint8), 1)


def _unpack_mask(bits: torch.Tensor, shape: tuple, channels_last: bool) -> torch.Tensor:
    """Inverse of ``_pack_mask``: 0/1 (uint8) of ``shape``, in the format the mask was taken in."""
    mask = unpack_bits(bits, 1, math.prod(shape))
    if channels_last:
        n, c, h, w = shape
        return mask.view(n, h, w, c).permute(0, 3, 1, 2)
    return mask.view(shape)


def _compute_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype that a layer on x's device would compute in, or None outside autocast."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


# ---------------------------------------------------------------------------------- the layers
class _Conv(torch.autograd.Function):
    """A convolution whose backward reads its input from DIVISION's codes."""

    @staticmethod
    def forward(ctx, x, weight, bias, codec: TensorCodec, stride, padding, dilation, transposed,
                output_padding, groups):
        y = torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, transposed,
                                       output_padding, groups)
        layout, stored = codec.encode(x)
        ctx.save_for_backward(weight, *stored)
        ctx.codec, ctx.layout = codec, layout
        ctx.args = (stride, padding, dilation, transposed, output_padding, groups)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, *stored = ctx.saved_tensors
        x = ctx.codec.decode(ctx.layout, tuple(stored))
        stride, padding, dilation, transposed, output_padding, groups = ctx.args
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.bias_shape is not None
                and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, ctx.bias_shape, stride, padding, dilation, transposed, output_padding,
            groups, mask)
        return gx, gw, gb, None, None, None, None, None, None, None


class _Linear(torch.autograd.Function):
    """A linear layer whose backward reads its input from DIVISION's codes."""

    @staticmethod
    def forward(ctx, x, weight, bias, codec: TensorCodec):
        y = F.linear(x, weight, bias)
        layout, stored = codec.encode(x, feature_last=True)
        ctx.save_for_backward(weight, *stored)
        ctx.codec, ctx.layout, ctx.has_bias = codec, layout, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, *stored = ctx.saved_tensors
        return linear_gradients(ctx, grad, weight, lambda: ctx.codec.decode(ctx.layout, tuple(stored))) + (None,)


def linear_gradients(ctx, grad, weight, read_input) -> tuple:
    """(d input, d weight, d bias) of ``F.linear`` at ``grad``, the input read (``read_input()``:
    decoded or rebuilt) only for the weight's gradient; ``ctx.needs_input_grad`` says which."""
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = grad @ weight
    if ctx.needs_input_grad[1]:
        x = read_input()
        gw = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, gw, gb


def batch_norm_affine(weight, bias, mean, invstd) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of training-mode batch normalization, fp32: y = x * scale + shift."""
    scale = invstd if weight is None else invstd * weight.float()
    shift = -mean * scale if bias is None else bias.float() - mean * scale
    return scale, shift


class _BatchNorm(torch.autograd.Function):
    """Training-mode batch normalization with the batch statistics given; its backward (the full
    one, through the statistics) reads the input from DIVISION's codes."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, eps: float, codec: TensorCodec,
                layout: Optional["Layout"] = None, *encoded):
        """``layout`` and ``encoded``: x's codes, when the caller encoded x itself (a rebuilt
        convolution input reads them too, ``division.compiled_rebuild``)."""
        y = batch_norm_output(x, weight, bias, mean, invstd)
        if layout is None:
            layout, encoded = codec.encode(x)
        ctx.save_for_backward(weight, mean, invstd, *encoded)
        ctx.codec, ctx.layout, ctx.eps = codec, layout, eps
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, mean, invstd, *stored = ctx.saved_tensors
        x = ctx.codec.decode(ctx.layout, tuple(stored))
        gx, gw, gb = batch_norm_gradients(ctx, grad, x, weight, mean, invstd)
        return (gx, gw, gb, None, None, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 8)


class _FusedBatchNorm(torch.autograd.Function):
    """Training-mode batch normalization run by the fused encode of its input (``compiled_ops.
    norm_encode``: statistics, output and x's codes from two reads of x), whose backward computes
    the gradients from the codes (``norm_backward``: no decoded input written). Returns (y as an
    (N, H, W, C) tensor, the batch's mean, invstd and unbiased variance (for the running
    statistics), the ReLU's mask (empty without ``relu``), x's stored codes), all but y
    non-differentiable. ``relu``: y is the output of a ReLU applied to the BatchNorm's, whose mask
    this function keeps (the ReLU module then returns y as it is: ``compiled_rebuild.ConvInputChain``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, codec: "TensorCodec", relu: bool):
        y, mean, invstd, batch_var, mask, *encoded = compiled_ops.fused_norm_encode(
            x, weight, bias, eps, codec.block_size, codec.bits, codec.stochastic, relu)
        ctx.save_for_backward(weight, mean, invstd, *encoded, *((mask,) if relu else ()))
        ctx.codec, ctx.shape, ctx.bias_dtype, ctx.relu = codec, list(x.shape), bias.dtype, relu
        ctx.mark_non_differentiable(mean, invstd, batch_var, mask, *encoded)
        return (y, mean, invstd, batch_var, mask, *encoded)

    @staticmethod
    def backward(ctx, grad, *_):
        weight, mean, invstd, *stored = ctx.saved_tensors
        mask = stored.pop() if ctx.relu else None
        dy = grad.permute(0, 3, 1, 2)  # (the NHWC gradient of y as returned, seen as (N, C, H, W))
        gx, gw, gb = compiled_ops.fused_norm_backward(dy, *stored, mask, weight, mean, invstd, ctx.shape,
                                                      ctx.codec.block_size, ctx.codec.bits)
        return gx, gw, gb.to(ctx.bias_dtype), None, None, None


def fused_batch_norm(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, codec: "TensorCodec",
                     relu: bool = False) -> Optional[tuple]:
    """The BatchNorm through ``_FusedBatchNorm`` where it applies (``fused_norm_applies``): (y, x's
    layout and stored codes, the batch mean and invstd as the other functions' recipes hold them,
    the ReLU's mask); the running statistics updated. ``relu``: y is ReLU(BN(x))
    (``fused_relu_applies``). None elsewhere."""
    if not fused_norm_applies(module, x, codec):
        return None
    y, mean, invstd, batch_var, mask, *encoded = _FusedBatchNorm.apply(x, module.weight, module.bias, module.eps,
                                                                      codec, relu)
    y = y.permute(0, 3, 1, 2)  # (the function returns the NHWC buffer: its view could not be changed in place)
    _update_running_statistics(module, x, mean, batch_var, unbiased=True)
    geom = canonical_geometry(x.shape, x.dtype, codec.block_size)
    layout = Layout(tuple(x.shape), x.dtype, "channels_last", geom, fused=True)
    return y, layout, tuple(encoded), mean, invstd, mask


def fused_norm_applies(module: nn.Module, x: torch.Tensor, codec: "TensorCodec") -> bool:
    """The fused codec with ``fused_norm``, an affine BatchNorm and a channels_last map the fused
    kernels take."""
    return (codec.fused and codec.fused_norm and codec.keep_lfc and codec.keep_hfc and module.affine
            and compiled_ops.norm_applies(x, codec.block_size, codec.bits, codec.stochastic))


def fused_relu_applies(module: nn.Module, x: torch.Tensor, codec: "TensorCodec") -> bool:
    """Can ``fused_batch_norm`` apply the ReLU after this BatchNorm too?"""
    return fused_norm_applies(module, x, codec) and \
        compiled_ops.mask_words_fit(x, codec.block_size, codec.bits, codec.stochastic)


def batch_norm_output(x, weight, bias, mean, invstd) -> torch.Tensor:
    """Training-mode batch normalization of ``x`` with the batch statistics given, in x's dtype."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    scale, shift = batch_norm_affine(weight, bias, mean, invstd)
    y = x.float() * scale.view(shape) + shift.view(shape)
    # no .to() when the dtype already matches: torch 2.11's Dynamo gave a function whose output
    # is such a no-op cast zero gradients
    return y if y.dtype == x.dtype else y.to(x.dtype)


def batch_norm_gradients(ctx, grad, x, weight, mean, invstd) -> tuple:
    """(d input, d weight, d bias) of training-mode batch normalization, the formula written out
    (what aten.native_batch_norm_backward's decomposition computes: torch 2.11's compiler returned
    zero gradients for that op here); ``ctx.needs_input_grad``'s first three say which."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    g = grad.float()
    x_hat = (x.float() - mean.view(shape)) * invstd.view(shape)
    grad_bias = g.sum(dims)
    grad_scale = (g * x_hat).sum(dims)  # d loss / d weight
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        count = x.numel() // x.shape[1]
        scale = invstd if weight is None else invstd * weight.float()
        gx = scale.view(shape) * (g - (grad_bias / count).view(shape)
                                  - x_hat * (grad_scale / count).view(shape))
        gx = gx if gx.dtype == grad.dtype else gx.to(grad.dtype)
    if weight is not None and ctx.needs_input_grad[1]:
        gw = grad_scale.to(weight.dtype)
    if ctx.needs_input_grad[2]:
        gb = grad_bias.to(weight.dtype if weight is not None else grad.dtype)
    return gx, gw, gb


class _Relu(torch.autograd.Function):
    """ReLU keeping ``output > 0`` as 1 bit per element (exact for its backward)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.relu(x)
        _Relu.keep_mask(ctx, y)
        return y

    @staticmethod
    def keep_mask(ctx, y: torch.Tensor) -> torch.Tensor:
        """Save ``y > 0`` (packed) for backward, and return it."""
        bits = _pack_mask(y)
        ctx.save_for_backward(bits)
        ctx.shape, ctx.channels_last = tuple(y.shape), _memory_format(y) == "channels_last"
        return bits

    @staticmethod
    def backward(ctx, grad):
        (bits,) = ctx.saved_tensors
        return grad * _unpack_mask(bits, ctx.shape, ctx.channels_last).to(grad.dtype)


class _LayerNorm(torch.autograd.Function):
    """LayerNorm whose input is kept as the codes of its normalized form (x - mean) * rstd, with
    mean and rstd exact (fp32, one pair per row), as the eager path's ``NormalizedCodec`` keeps it:
    the quantization step then follows each row's own spread, not the largest channel's."""

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps: float, codec: TensorCodec,
                layout: Optional["Layout"] = None, mean=None, rstd=None, *encoded):
        """``layout``, ``mean``, ``rstd``, ``encoded``: the statistics and the normalized input's
        codes, when the caller encoded it itself (``layer_norm_codes``: a rebuilt Linear input reads
        them too, ``division.compiled_rebuild``)."""
        if layout is None:
            y, mean, rstd = torch.ops.aten.native_layer_norm(x, normalized_shape, weight, bias, eps)
            layout, encoded = codec.encode(normalized(x, mean, rstd), feature_last=True)
        else:  # from the statistics given (one reduction in the graph, not two)
            y = layer_norm_affine(normalized(x, mean, rstd), weight, bias)
        ctx.save_for_backward(weight, bias, mean, rstd, *encoded)
        ctx.codec, ctx.layout, ctx.normalized_shape = codec, layout, normalized_shape
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, bias, mean, rstd, *stored = ctx.saved_tensors
        x_hat = ctx.codec.decode(ctx.layout, tuple(stored))
        x = x_hat.float() / rstd + mean
        x = x if x.dtype == x_hat.dtype else x.to(x_hat.dtype)
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(grad, x, ctx.normalized_shape, mean, rstd,
                                                               weight, bias, mask)
        return (gx, gw, gb) + (None,) * (len(ctx.needs_input_grad) - 3)


def normalized(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """(x - mean) * rstd in x's dtype: what a LayerNorm's input is kept as."""
    x_hat = (x.float() - mean) * rstd
    return x_hat if x_hat.dtype == x.dtype else x_hat.to(x.dtype)


def layer_norm_affine(x_hat: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A LayerNorm's output from its normalized input: x_hat * weight + bias, in x_hat's dtype."""
    y = x_hat.float()
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y if y.dtype == x_hat.dtype else y.to(x_hat.dtype)


def layer_norm_codes(module: nn.LayerNorm, x: torch.Tensor, codec: TensorCodec) -> tuple:
    """(layout, mean, rstd, codes) of the LayerNorm module's input, computed outside its function:
    what ``_LayerNorm`` keeps, handed to it and to a reader of its output that rebuilds it."""
    dims = list(range(x.dim() - len(module.normalized_shape), x.dim()))
    var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + module.eps)
    layout, encoded = codec.encode(normalized(x.detach(), mean, rstd), feature_last=True)
    return layout, mean, rstd, tuple(encoded)


class _Activation(torch.autograd.Function):
    """GELU or SiLU whose backward takes the derivative at the input decoded from DIVISION's
    codes (what their own backward reads, kept as codes instead of the tensor); Hardswish keeps
    the codes of its derivative instead (``division.activations``: its derivative jumps)."""

    @staticmethod
    def forward(ctx, x, kind: str, approximate: str, codec: TensorCodec, layout: Optional["Layout"] = None,
                *encoded):
        """``layout`` and ``encoded``: x's codes, when the caller encoded x itself (a rebuilt
        Linear or convolution input reads them too, ``division.compiled_rebuild``)."""
        y = activation(x, kind, approximate)
        if layout is None:
            layout, encoded = codec.encode(hardswish_derivative(x) if kind == "hardswish" else x,
                                           feature_last=False)
        ctx.save_for_backward(*encoded)
        ctx.codec, ctx.layout, ctx.kind, ctx.approximate = codec, layout, kind, approximate
        return y

    @staticmethod
    def backward(ctx, grad):
        kept = ctx.codec.decode(ctx.layout, tuple(ctx.saved_tensors))
        if ctx.kind == "gelu":
            gx = torch.ops.aten.gelu_backward(grad, kept, approximate=ctx.approximate)
        elif ctx.kind == "silu":
            gx = torch.ops.aten.silu_backward(grad, kept)
        else:
            gx = grad * kept
        return (gx,) + (None,) * (len(ctx.needs_input_grad) - 1)


def activation(x: torch.Tensor, kind: str, approximate: str = "none") -> torch.Tensor:
    """GELU (``approximate``), SiLU or Hardswish of x."""
    if kind == "gelu":
        return F.gelu(x, approximate=approximate)
    return F.silu(x) if kind == "silu" else F.hardswish(x)


class _Scale(torch.autograd.Function):
    """x times a parameter broadcast over it (a ConvNeXt block's layer scale), keeping x's codes for
    the parameter's gradient (what the eager path's ``cover_all`` codes too)."""

    @staticmethod
    def forward(ctx, x, scale, codec: TensorCodec):
        y = x * scale
        layout, stored = codec.encode(x)
        ctx.save_for_backward(scale, *stored)
        ctx.codec, ctx.layout = codec, layout
        return y

    @staticmethod
    def backward(ctx, grad):
        scale, *stored = ctx.saved_tensors
        gx = gs = None
        if ctx.needs_input_grad[0]:
            gx = grad * scale
            gx = gx if gx.dtype == ctx.layout.dtype else gx.to(ctx.layout.dtype)
        if ctx.needs_input_grad[1]:
            x = ctx.codec.decode(ctx.layout, tuple(stored))
            gs = (grad.float() * x.float()).sum_to_size(scale.shape)
            gs = gs if gs.dtype == scale.dtype else gs.to(scale.dtype)
        return gx, gs, None


class _MaxPool2d(torch.autograd.Function):
    """MaxPool2d keeping each output's argmax as its uint8 position inside the pooling window (what
    the eager path's ``MaxPoolIndexCodec`` keeps), not the int64 indices and the input that
    ``max_pool2d_with_indices`` would save. The backward scatters the gradient to the exact argmax."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        y, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
        ctx.geometry = (kernel, stride, padding, dilation, x.shape[-1])
        ctx.input_shape, ctx.channels_last = tuple(x.shape), _memory_format(x) == "channels_last"
        ctx.save_for_backward(window_offsets(indices, *ctx.geometry))
        return y

    @staticmethod
    def backward(ctx, grad):
        (offset,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        indices = indices_from_offsets(offset, *ctx.geometry).reshape(n, c, -1)
        gx = grad.new_zeros(n, c, h * w).scatter_add_(2, indices, grad.reshape(n, c, -1)).view(n, c, h, w)
        gx = gx.contiguous(memory_format=torch.channels_last) if ctx.channels_last else gx
        return gx, None, None, None, None, None


# ------------------------------------------------------------------------ the modules' forwards
def _cast(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """What autocast would hand the layer: ``t`` in the autocast dtype (its backward casts back)."""
    return t if t is None or dtype is None else t.to(dtype)


def conv_forward(module: nn.modules.conv._ConvNd, x: torch.Tensor, codec: TensorCodec) -> torch.Tensor:
    dtype = _compute_dtype(x)
    return _Conv.apply(_cast(x, dtype), _cast(module.weight, dtype), _cast(module.bias, dtype), codec,
                       *conv_arguments(module))


def conv_arguments(module: nn.modules.conv._ConvNd) -> tuple:
    """(stride, padding, dilation, transposed, output_padding, groups) as aten.convolution takes them."""
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    output_padding = list(module.output_padding) if transposed else [0] * len(module.stride)
    return (list(module.stride), list(module.padding), list(module.dilation), transposed, output_padding,
            module.groups)


def conv_applies(module: nn.Module) -> bool:
    """Zero padding given as numbers (no 'same', no reflect/circular), no output size argument."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.padding_mode == "zeros" \
        and not isinstance(module.padding, str)


def linear_forward(module: nn.Linear, x: torch.Tensor, codec: TensorCodec) -> torch.Tensor:
    dtype = _compute_dtype(x)
    return _Linear.apply(_cast(x, dtype), _cast(module.weight, dtype), _cast(module.bias, dtype), codec)


def batch_norm_forward(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor,
                       codec: TensorCodec) -> torch.Tensor:
    fused = fused_batch_norm(module, x, codec)
    if fused is not None:
        return fused[0]
    mean, invstd = batch_statistics(module, x)
    return _BatchNorm.apply(x, module.weight, module.bias, mean, invstd, module.eps, codec)


def batch_statistics(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, invstd) of the batch, and the running-statistics update as ``nn.BatchNorm`` does it,
    outside the autograd graph: ``_BatchNorm``'s backward differentiates through them itself."""
    dims = [0] + list(range(2, x.dim()))
    # detach() rather than no_grad(): torch 2.11's Dynamo let a no_grad block before the
    # function's apply switch off its backward (zero gradients)
    var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0)
    invstd = torch.rsqrt(var + module.eps)
    _update_running_statistics(module, x, mean, var, unbiased=False)
    return mean, invstd


def _update_running_statistics(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, mean: torch.Tensor,
                               var: torch.Tensor, unbiased: bool) -> None:
    """The running-statistics update of ``nn.BatchNorm`` from the batch's mean and variance
    (``unbiased``: already the unbiased estimate)."""
    with torch.no_grad():
        if module.track_running_stats:
            module.num_batches_tracked.add_(1)
            if module.momentum is None:  # cumulative moving average
                factor = 1.0 / module.num_batches_tracked.float()
            else:
                factor = module.momentum
            count = x.numel() // x.shape[1]
            if not unbiased:
                var = var * (count / max(count - 1, 1))
            module.running_mean.mul_(1 - factor).add_(mean * factor)
            module.running_var.mul_(1 - factor).add_(var * factor)


def batch_norm_applies(module: nn.Module) -> bool:
    """BatchNorm1d/2d/3d that use batch statistics in training (not SyncBatchNorm, whose statistics
    span processes)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm)


def relu_forward(module: nn.ReLU, x: torch.Tensor, codec: TensorCodec) -> torch.Tensor:
    return _Relu.apply(x)


def layer_norm_forward(module: nn.LayerNorm, x: torch.Tensor, codec: TensorCodec) -> torch.Tensor:
    """In the dtype autocast gives ``layer_norm`` (fp32), as the module's own forward runs it."""
    dtype = torch.float32 if _compute_dtype(x) is not None else None
    return _LayerNorm.apply(_cast(x, dtype), _cast(module.weight, dtype), _cast(module.bias, dtype),
                            list(module.normalized_shape), module.eps, codec)


def layer_norm_applies(module: nn.Module) -> bool:
    """``nn.LayerNorm`` itself: a subclass may have its own forward, which this function would skip
    (torchvision's LayerNorm2d has its own function below)."""
    return type(module) is nn.LayerNorm


def layer_norm_2d_forward(module: nn.LayerNorm, x: torch.Tensor, codec: TensorCodec) -> torch.Tensor:
    """torchvision's LayerNorm2d (ConvNeXt): LayerNorm over the channels of an (N, C, H, W) map,
    written as its own forward writes it (channels moved last and back)."""
    return layer_norm_forward(module, x.permute(0, 2, 3, 1), codec).permute(0, 3, 1, 2)


def layer_norm_2d_applies(module: nn.Module) -> bool:
    return type(module).__name__ == "LayerNorm2d" and type(module).__module__ == "torchvision.models.convnext"


def layer_scale_block_forward(module: nn.Module, x: torch.Tensor, codec: TensorCodec) -> torch.Tensor:
    """torchvision's ConvNeXt block (CNBlock), written as its own forward writes it, its layer
    scale's product keeping the block's output as codes (compiled plain, that product keeps it raw)."""
    result = _Scale.apply(module.block(x), module.layer_scale, codec)
    return module.stochastic_depth(result) + x


def layer_scale_block_applies(module: nn.Module) -> bool:
    return type(module).__name__ == "CNBlock" and type(module).__module__ == "torchvision.models.convnext"


_ACTIVATIONS = {nn.GELU: "gelu", nn.SiLU: "silu", nn.Hardswish: "hardswish"}


def activation_forward(module: nn.Module, x: torch.Tensor, codec: TensorCodec) -> torch.Tensor:
    return _Activation.apply(x, _ACTIVATIONS[type(module)], getattr(module, "approximate", "none"), codec)


def activation_applies(module: nn.Module) -> bool:
    """GELU, SiLU and Hardswish modules; in-place ones (``inplace=True``) compute out of place."""
    return type(module) in _ACTIVATIONS


def max_pool_forward(module: nn.MaxPool2d, x: torch.Tensor, codec: TensorCodec) -> torch.Tensor:
    if x.dim() != 4:  # an unbatched map: the module's own forward
        return type(module).forward(module, x)
    pair = torch.nn.modules.utils._pair
    stride = module.stride if module.stride is not None else module.kernel_size
    return _MaxPool2d.apply(x, list(pair(module.kernel_size)), list(pair(stride)), list(pair(module.padding)),
                            list(pair(module.dilation)), module.ceil_mode)


def max_pool_applies(module: nn.Module) -> bool:
    """4-D MaxPool2d whose window fits a uint8 offset (256 positions); not return_indices."""
    return isinstance(module, nn.MaxPool2d) and not module.return_indices \
        and MaxPoolIndexCodec.fits(module.kernel_size)


# (applies, forward, the ledger's kind) for each family of module, first match wins
_LAYERS = (
    (conv_applies, conv_forward, "conv"),
    (batch_norm_applies, batch_norm_forward, "norm"),
    (lambda m: isinstance(m, nn.Linear), linear_forward, "linear"),
    (layer_norm_applies, layer_norm_forward, "norm"),
    (layer_norm_2d_applies, layer_norm_2d_forward, "norm"),
    (lambda m: isinstance(m, nn.ReLU), relu_forward, "relu"),
    (max_pool_applies, max_pool_forward, "maxpool"),
    (activation_applies, activation_forward, "other"),
    (layer_scale_block_applies, layer_scale_block_forward, "other"),
)


def layer_for(module: nn.Module):
    """The compressing forward for this module and its kind, or None if it has none."""
    for applies, forward, kind in _LAYERS:
        if applies(module):
            return forward, kind
    return None


# Modules without a compressing compiled function whose saves the eager path's cover_all compresses
_SAVING_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.Softmax,
                   nn.Mish, nn.ELU, nn.LeakyReLU, nn.MultiheadAttention)


class CompiledLayers:
    """The dispatching forwards put on a model's known leaf modules (see the module docstring).

    ``enabled`` can be switched off (the forwards then always run the module's own forward);
    ``remove`` restores the modules' own forwards.
    """

    def __init__(self, model: nn.Module, codec: TensorCodec, *, eager: bool = False,
                 attention: Optional[TensorCodec] = None, rebuild_conv_input: bool = False,
                 recompute_norm_input: bool = False, share_conv_inputs: bool = True):
        """``attention``: the codec of self-attention's query, key and value
        (``division.compiled_attention``); None leaves ``nn.MultiheadAttention`` to the compiler.
        ``rebuild_conv_input``: convolutions reading BN(x) or ReLU(BN(x)) rebuild their input
        (``division.compiled_rebuild``; ``chain.rebuilt`` names them once traced).
        ``recompute_norm_input``: BatchNorms reading a 1x1 or depthwise convolution's output recompute their
        input (``chain.recomputed``).
        ``share_conv_inputs``: a convolution reading the same tensor as a convolution before it (a
        ResNet block's input, read by conv1 and the downsample convolution) reads that one's codes
        (``chain.shared``), where ``ConvInputChain.prove`` has seen the tensor unchanged in between."""
        from .attention import attention_applies
        from .compiled_rebuild import ConvInputChain
        from .compiled_window_attention import applies as window_attention_applies, window_attention_forward
        self.codec = codec
        self.chain = ConvInputChain(rebuild_conv_input, recompute_norm_input, share_conv_inputs,
                                    fused_relu=codec.fused and codec.fused_norm) \
            if rebuild_conv_input or recompute_norm_input or share_conv_inputs else None
        self.attention = attention
        self.enabled = True
        self.eager = eager  # True: the compressing functions run in eager mode too (self_check)
        # Is the eager path compressing (the compressor's hooks active, or paused on purpose)?
        # Set by the method; None: not checked. See ``_ran_uncompressed``.
        self.eager_compressing: Optional[Callable[[], bool]] = None
        self.warned_uncompressed = False
        self.modules: dict[str, str] = {}  # name -> kind, the modules that compress when compiled
        self.uncovered: list[str] = []  # modules the eager path compresses and these functions do not
        self._patched: list[nn.Module] = []
        from .compressor import module_kind
        for name, module in model.named_modules():
            if attention is not None and attention_applies(module) and "forward" not in module.__dict__:
                module.forward = self._dispatch_attention(module, name)
                self._patched.append(module)
                self.modules[name] = "attention"
                continue
            if attention is not None and window_attention_applies(module) and "forward" not in module.__dict__:
                module.forward = self._dispatch(
                    module, lambda m, x, c: window_attention_forward(m, x, c, attention), name)
                self._patched.append(module)
                self.modules[name] = "attention"
                continue
            found = layer_for(module)
            if found is None or "forward" in module.__dict__:
                if isinstance(module, nn.modules.dropout._DropoutNd) and module.p == 0:
                    if rebuild_conv_input and "forward" not in module.__dict__:
                        module.forward = self._pass_through(module)
                        self._patched.append(module)
                    continue  # saves nothing
                if module_kind(module) in ("conv", "norm", "linear", "dropout") \
                        or isinstance(module, _SAVING_MODULES):
                    self.uncovered.append(f"{name} ({type(module).__name__})")
                continue
            forward, kind = found
            module.forward = self._dispatch(module, forward, name)
            self._patched.append(module)
            self.modules[name] = kind
        if self.chain is not None:
            self._end_chain_with(model)

    def _dispatch(self, module: nn.Module, compressed_forward, name: str):
        own_forward = type(module).forward.__get__(module)
        # eager training of a Hardswish: its derivative is saved (and coded by the hooks), not its input
        eager_forward = HardswishKeepingDerivative.apply if isinstance(module, nn.Hardswish) else None
        codec, chain = self.codec, self.chain

        def forward(x, *args, **kwargs):
            if self.enabled and module.training and torch.is_grad_enabled() and not args and not kwargs:
                if self.eager or torch.compiler.is_compiling():
                    if chain is not None:
                        return chain.forward(name, module, x, codec, compressed_forward)
                    return compressed_forward(module, x, codec)
                if self.eager_compressing is not None and not self.eager_compressing():
                    self._ran_uncompressed(name)
                if eager_forward is not None:
                    return eager_forward(x)
            return own_forward(x, *args, **kwargs)
        return forward

    def _ran_uncompressed(self, name: str) -> None:
        """A known layer trained eagerly while the eager path's hooks were off: outside any traced
        graph, yet not in an eager DIVISION step. That is torch.compile running a frame
        uncompiled (past its recompile limit, or a frame it skips), which would keep plain
        training's activations in silence. Warn once, naming the layer."""
        if self.warned_uncompressed:
            return
        self.warned_uncompressed = True
        message = (f"layer {name!r} of a DIVISION model trained outside a compiled graph and outside "
                   "DIVISION's eager hooks: its activations are kept UNCOMPRESSED. torch.compile ran it "
                   "uncompiled (past torch._dynamo.config.recompile_limit, or a frame it skips); compile "
                   "through the method (method.compile(model), which refuses that), call "
                   "torch._dynamo.reset() between models, or train without torch.compile")
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _pass_through(self, module: nn.modules.dropout._DropoutNd):
        """A dropout of p = 0 returns its input itself when traced, as it does eagerly (where
        ``torch.dropout`` returns its input when p is 0): a rebuilt input's link through it (an
        MLP's GELU, dropout, Linear) holds under Dynamo too, which would trace a new tensor."""
        own_forward = type(module).forward.__get__(module)

        def forward(x):
            if module.p == 0 and (self.eager or torch.compiler.is_compiling()):
                return x
            return own_forward(x)
        return forward

    def _dispatch_attention(self, module: nn.MultiheadAttention, name: str):
        from .attention import attention_call_applies, eager_self_attention
        from .compiled_attention import attention_forward
        own_forward = type(module).forward.__get__(module)
        chain = self.chain

        def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            if (self.enabled and module.training and torch.is_grad_enabled()
                    and attention_call_applies(query, key, value, key_padding_mask, need_weights, attn_mask,
                                               is_causal)):
                if self.eager or torch.compiler.is_compiling():
                    recipe = None if chain is None else chain.attention_input(name, module, query)
                    return attention_forward(module, query, self.codec, self.attention, recipe), None
                # eager training: the query, key and value alone, coded by the hooks (division.attention)
                return eager_self_attention(module, query), None
            return own_forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                               is_causal=is_causal)
        return forward

    def _end_chain_with(self, model: nn.Module) -> None:
        """The model's forward drops the chain's pending source when it returns (traced with it)."""
        inner = model.forward
        chain = self.chain

        def forward(*args, **kwargs):
            out = inner(*args, **kwargs)
            chain.clear()
            return out
        # A code object of its own: torch.compile traces this wrapper as the model's frame, and
        # Dynamo keeps its graphs per code object, so with one shared code every model the process
        # compiles would count against one recompile limit (division.recompile_limit)
        forward.__code__ = forward.__code__.replace()
        model.forward = forward
        if model not in self._patched:
            self._patched.append(model)

    def remove(self) -> None:
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched = []
        self.modules = {}


# ------------------------------------------------------------------------------------ coverage
@dataclass
class Coverage:
    """What plain autograd saves in one forward, split by who saves it (``plain_save_coverage``)."""

    fraction: Optional[float]           # share of the bytes saved inside modules that compress compiled
    raw_bytes: dict[str, int]           # the rest, by the type of the innermost module saving it


def plain_save_coverage(model: nn.Module, layers: "CompiledLayers", args: tuple) -> Coverage:
    """One eager forward of ``model`` on ``args`` with a saved-tensor hook that attributes every
    float tensor autograd saves (parameters and repeats left out) to the innermost module running;
    a save inside a module that ``layers`` compresses when compiled counts as covered.

    A compiled graph saves what its partitioner chooses, so its own bytes say nothing about what
    it left uncompressed; this is the same measure as the eager path's coverage (the share of the
    bytes plain autograd would keep), taken over the layers the compiled path covers. The forward
    leaves no trace (``traceless_forward``)."""
    covered = {id(m) for name, m in model.named_modules() if name in layers.modules}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack: list[nn.Module] = []
    seen: set[tuple] = set()
    totals = {"covered": 0, "all": 0}
    raw: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() or t.untyped_storage().data_ptr() in params:
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            return t
        seen.add(key)
        nbytes = t.numel() * t.element_size()
        totals["all"] += nbytes
        if stack and id(stack[-1]) in covered:
            totals["covered"] += nbytes
        else:
            owner = type(stack[-1]).__name__ if stack else "outside modules"
            raw[owner] = raw.get(owner, 0) + nbytes
        return t

    def enter(module, _args) -> None:
        stack.append(module)

    def leave(_module, _args, _output) -> None:  # (returning anything would replace the output)
        stack.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    with torch.autograd.graph.saved_tensors_hooks(pack, _identity):
        traceless_forward(model, args, handles)
    fraction = totals["covered"] / totals["all"] if totals["all"] else None
    return Coverage(fraction, dict(sorted(raw.items(), key=lambda kv: -kv[1])))


def traceless_forward(model: nn.Module, args: tuple, handles: list) -> None:
    """An eager forward of ``model`` that leaves no trace: buffers (BatchNorm's running statistics)
    and random-number states are restored, and the hooks in ``handles`` removed afterwards."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    devices = [a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda][:1]
    try:
        with torch.random.fork_rng(devices=devices):
            model(*args)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])


# ------------------------------------------------------------------------------- the byte ledger
class SavedTensorCounter:
    """A context that records every tensor autograd saves inside it into a ``ByteLedger``, as is.

    Around a compiled step it sees the compiled graph's saves: its codes, statistics, masks and
    whatever else the compiler chose to keep. Parameters (by storage) are left out, as the eager
    ledger leaves them out, and so are copies of a parameter in its own dtype (inductor saves a
    convolution's weight converted to another memory format for backward, as eager autograd saves
    the parameter itself): model memory, counted apart in ``ledger.parameter_copy_bytes``. An
    autocast copy (another dtype) stays an entry, as in the eager ledger. A tensor saved twice is
    counted once. Inside the eager compressor's own
    hooks (innermost wins) it sees nothing, so it can stay around either kind of step.
    Entries are labelled by dtype: ``packed`` (uint8 codes and masks), else the dtype's name.
    """

    def __init__(self, model: nn.Module, ledger, chain=None):
        """``chain``: the compiled layers' ``ConvInputChain`` (its ``rebuilt``, ``recomputed`` and
        ``shared`` inputs are filled while the forward is traced): each such input a ledger entry
        that stores nothing, as the eager ledger shows them."""
        self.model = model
        self.ledger = ledger
        self.chain = chain
        self.enabled = True  # False: ``install``ed hooks stop counting (the ledger keeps its last step)
        self._params: set[int] = set()
        self._by_shape: dict[tuple, list[torch.Tensor]] = {}  # (shape, dtype) -> parameters
        self._seen: set[tuple] = set()
        self._hooks = None

    def __enter__(self) -> "SavedTensorCounter":
        self._params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        self._by_shape = {}
        for p in self.model.parameters():
            if p.dim() >= 2:  # kernels and matrices: a vector's shape is also a batch statistic's
                self._by_shape.setdefault((tuple(p.shape), p.dtype), []).append(p)
        self._seen = set()
        self.ledger.reset()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _identity)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._seen = set()
        self._by_shape = {}
        chain = self.chain
        for names, inputs, codec, op in (() if chain is None else (
                (chain.rebuilt, chain.inputs, REBUILT, "Conv2d"),
                (chain.recomputed, chain.norm_inputs, RECOMPUTED, "BatchNorm2d"),
                (chain.shared, chain.shared_inputs, SHARED, "Conv2d"))):
            for reader, source in names.items():
                shape, dtype = inputs.get(reader, ((), ""))
                self.ledger.record(LedgerEntry(layer=reader, kind=COMPILED, codec=codec, shape=shape, dtype=dtype,
                                               plain_bytes=0, stored_bytes=0, op=chain.ops.get(reader) or op,
                                               rebuilt_from=source))

    def install(self, module: nn.Module) -> None:
        """Count every forward call of ``module`` (a compiled model: ``torch.compile`` runs the
        hooks of the module it returns outside the compiled graph)."""
        def enter(*_):
            if self.enabled and module.training and torch.is_grad_enabled():
                self.__enter__()

        def leave(*_):
            if self._hooks is not None:
                self.__exit__(None, None, None)
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave, always_call=True)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.data_ptr(), tuple(t.shape))
        if ptr in self._params or key in self._seen:
            return t
        self._seen.add(key)
        nbytes = t.numel() * t.element_size()
        if self._copies_parameter(t):
            self.ledger.parameter_copy_bytes += nbytes
            return t
        label = "packed" if t.dtype in (torch.uint8, torch.bool) else str(t.dtype).replace("torch.", "")
        self.ledger.record(LedgerEntry(layer="", kind=COMPILED, codec=label, shape=tuple(t.shape),
                                       dtype=str(t.dtype).replace("torch.", ""), plain_bytes=0,
                                       stored_bytes=nbytes))
        return t

    def _copies_parameter(self, t: torch.Tensor) -> bool:
        """Does ``t`` hold a parameter's values in its shape and dtype (any memory format)?"""
        with torch.no_grad():
            return any(torch.equal(t, p) for p in self._by_shape.get((tuple(t.shape), t.dtype), ()))


def _identity(t):
    return t


# ------------------------------------------------------------------------------- the self-check
_CHECKED: dict[tuple, Optional[str]] = {}


def self_check(device: torch.device, fused: bool = False, **compile_kwargs) -> Optional[str]:
    """Compile a small network through these functions and compare its gradients with the same
    functions run eagerly; return why compiled training cannot be trusted here, or None.

    Run once per device type, codec kernels (``fused``), compile options and PyTorch version. It guards against compilers
    that lose the functions' backward (torch 2.11 once returned zero gradients for one of them)
    or recompute instead of keeping the codes; either would train silently wrong or slow.
    """
    key = (torch.device(device).type, fused, tuple(sorted(compile_kwargs.items())), torch.__version__)
    if key not in _CHECKED:
        _CHECKED[key] = _check(torch.device(device), fused, compile_kwargs)
    return _CHECKED[key]


def _probe_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 4))


def _check(device: torch.device, fused: bool, compile_kwargs: dict) -> Optional[str]:
    codec = TensorCodec(block_size=4, bits=8, rounding="nearest", fused=fused)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=gen).to(device)
    target = torch.randint(0, 4, (4,), generator=gen).to(device)
    grads, saved = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        net = _probe_net().to(device)
        layers = CompiledLayers(net, codec, eager=not compiled)
        run = torch.compile(net, **compile_kwargs) if compiled else net
        kept: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, _identity):
            loss = F.cross_entropy(run(x), target)
        loss.backward()
        layers.remove()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        saved.append(sum(t.numel() for t in kept if t.dtype == torch.uint8))
    cosine = float(F.cosine_similarity(grads[0], grads[1], dim=0))
    if not cosine > 0.999:
        return (f"torch {torch.__version__} compiled the compressing layers wrongly on {device.type} "
                f"(gradient cosine {cosine:.3f} against eager)")
    # (the compiler may fold one small mask into another; recomputing layers drops most codes)
    if saved[1] < 0.8 * saved[0]:
        return (f"torch {torch.__version__} recomputes instead of keeping the codes on {device.type} "
                f"({saved[1]} of {saved[0]} bytes of codes and masks kept)")
    return None
