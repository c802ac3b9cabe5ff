"""A convolution's input rebuilt from the BatchNorm before it (``method.rebuild_conv_input``).

In conv-BN-ReLU-conv the second convolution saves ReLU(BN(x)), while the BatchNorm already keeps
x's codes, its batch statistics (exact: they are not differentiable outputs, so the compressor keeps
them raw) and reads its affine parameters (model memory). So the second convolution's input need
not be stored at all: backward rebuilds it as

    relu(x_hat * scale + shift),  scale = weight * invstd,  shift = bias - mean * scale

from the decoded BatchNorm input ``x_hat``, with the ReLU's zeros taken from the ReLU's exact 1-bit
mask (which the ReLU keeps anyway), so the rebuilt input is 0 exactly where the true one is.
A convolution (or Linear) reading BN(x) itself, with no ReLU between, is rebuilt the same way
without the mask.

``ChainTracker`` proves the chain during forward, from the module hooks' view of it:
- after a BatchNorm module: its output is BN(x) of the x whose codes the compressor stored for it,
  when autograd's node for the output is the native batch norm (training: batch statistics) and
  reads x's node; the node's saved statistics are the ones its backward reads;
- after a ReLU module (in place or not): its output is ReLU(BN(x)) when its input was such a
  BatchNorm output, unchanged since (its version counter), and its node is ReLU's on the BatchNorm's;
- at a convolution's save: the saved tensor is one of those, at the version recorded then.
Anything it cannot prove (a functional ReLU, a BatchNorm whose input was kept raw, SyncBatchNorm,
the fused ``norm_from_codes`` BatchNorm, a tensor changed in place) is stored as it was.

A rebuilt input holds no bytes: its ``Packed`` refers to the BatchNorm's own (the input's codes,
the statistics, the parameters), all kept for the BatchNorm's backward anyway, which runs after
the convolution's. Backward decodes x once for both: the rebuild leaves ``x_hat`` with the
BatchNorm's ``Packed`` (``take_decoded``), and the compressor hands it to the BatchNorm's backward.

The same knob rebuilds, in eager steps, a GELU's or SiLU's output from the activation's own input,
which its backward keeps (``output_source``): whoever saves the output (a transformer's or
ConvNeXt's second MLP Linear, a convolution after SiLU) holds no bytes for it, and backward computes
act(h_hat) from the input's decode, left with the input's ``Packed`` for the activation's backward,
which comes next. A LayerNorm module's output likewise (the attention projection's and first MLP
Linear's input): LayerNorm(x_hat) with the module's weight, bias and eps, one fused kernel, from the
decode its backward reads next. The link is proved on autograd's graph: the saved tensor's node is
the activation's or LayerNorm's (or a view or cast of its output), and that node's input is a
tensor stored this step (the LayerNorm's by that very module, whose weight the node saved). An
in-place activation overwrites its input, so nothing is matched.

``method.recompute_norm_input`` goes one link further up: in conv-BN the BatchNorm saves the
convolution's output, and the convolution already keeps its own input (codes, or itself a rebuild)
and reads its weight (model memory). Where the convolution is cheap to run again
(``cheap_to_recompute``: pointwise, whose recompute costs one pass of its own forward, the price of
the encode and decode it replaces, or depthwise, a few multiply-adds per output), the
BatchNorm's input is not stored but recomputed in backward, ``conv(u_hat)``, with the stride,
padding, dilation and groups autograd's node recorded. The BatchNorm's backward runs just before the
convolution's, so the decoded ``u_hat`` is left with the convolution's ``Packed`` for its own
backward (one decode for both). ``ChainTracker.after_conv`` proves the link: the output's node is
the convolution's (``ConvolutionBackward0``) on the saved input's node, its weight is the module's
(or autocast's copy of it), and the BatchNorm saves that output unchanged (its version).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .codec import ActivationCodec, Packed, SaveContext
from .compiled import batch_norm_affine
from .exact import RELU_MASK, _is_channels_last, apply_relu_mask, last_reader, share_decode
from .ledger import RECOMPUTED, REBUILT

_DECODED = "rebuild_decoded"  # Packed.meta of a BatchNorm input: its decode, left by a rebuild

# autograd's nodes of a training BatchNorm whose saved result1 / result2 are mean / invstd (CPU, CUDA
# with and without cuDNN). Other nodes (SyncBatchNorm's) save their statistics differently: their
# outputs are stored, not rebuilt.
# cuDNN's node saves the same two (its "save_var" is cuDNN's saved inverse standard deviation).
_NORM_NODES = ("NativeBatchNormBackward0", "CudnnBatchNormBackward0")
# the fused BatchNorm of ``norm_from_codes`` (division.norm_from_codes): it saves (weight, mean,
# invstd, *its input's codes), and trains only
_FUSED_NORM = "_BatchNormFromCodesBackward"
_RELU = "ReluBackward0"
_CONV = "ConvolutionBackward0"


@dataclass
class NormSource:
    """What a rebuild reads: a BatchNorm's stored input and its affine map at forward time."""

    layer: str              # the BatchNorm's name, for the ledger
    packed: Packed          # its input's codes (the BatchNorm's own saved Packed)
    mean: torch.Tensor      # its batch statistics, as its backward reads them
    invstd: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    versions: tuple[int, int]  # weight's and bias's versions at forward

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """BN(x) = x * scale + shift per channel, with the forward's statistics and parameters (fp32)."""
        # plain autograd refuses this too: the BatchNorm's own backward would read the new weight
        _check_unchanged(self.versions, self.weight, self.bias,
                         f"the affine parameters of {self.layer or 'a BatchNorm'}", "rebuilt", "rebuild_conv_input")
        return batch_norm_affine(_detached(self.weight), _detached(self.bias), self.mean.float(), self.invstd.float())

    def affine(self, x_hat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """BN(x_hat) with the forward's statistics and parameters, in ``dtype``."""
        scale, shift = self.scale_shift()
        view = (1, -1) + (1,) * (x_hat.dim() - 2)  # BatchNorm's channels are dim 1
        return torch.addcmul(shift.view(view), x_hat.float(), scale.view(view)).to(dtype)

    def rebuilt(self, dtype: torch.dtype, mask: Optional[Packed]) -> torch.Tensor:
        """BN(x_hat), with the zeros of ``mask`` (the ReLU's, for ReLU(BN(x))) if given. Where the
        codec decodes x's codes straight into it (one fused kernel: decode, affine map, mask), x_hat
        never exists in memory and the BatchNorm's backward reads the codes again (or its fused
        form reads them anyway); else x is decoded once for this and the BatchNorm's backward."""
        fused = getattr(self.packed.codec, "decode_affine", None)
        meta = self.packed.meta
        # (an input with zeros of its own, a ReLU's output linked to its mask, decodes with them first)
        if fused is not None and _DECODED not in meta and RELU_MASK not in meta and meta.get("dtype") == dtype:
            y = fused(self.packed, *self.scale_shift(), mask)
            if y is not None:
                return y
        y = self.affine(self.decoded_input(), dtype)
        return y if mask is None else apply_relu_mask(y, mask)  # exact zeros; positive where the output is

    def decoded_input(self) -> torch.Tensor:
        """x_hat, decoded once for every rebuild of this step and the BatchNorm's backward."""
        return decode_once(self.packed)


@dataclass
class ConvSource:
    """What a recompute reads: a cheap convolution's stored input and its call at forward time."""

    layer: str              # the convolution's name, for the ledger
    packed: Packed          # its input, as stored for its own backward (codes, raw, or a rebuild)
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    call: tuple             # stride, padding, dilation, transposed, output_padding, groups (autograd's node)
    versions: tuple[int, int]

    def output(self, dtype: torch.dtype) -> torch.Tensor:
        """conv(u_hat) with the forward's weight and call, in ``dtype``; u_hat stays with the
        convolution's ``Packed`` for its backward, which comes next."""
        _check_unchanged(self.versions, self.weight, self.bias,
                         f"the parameters of {self.layer or 'a convolution'}", "recomputed", "recompute_norm_input")
        u_hat = decode_once(self.packed)
        weight = self.weight.detach().to(u_hat.dtype)  # autocast ran the forward in the input's dtype
        bias = None if self.bias is None else self.bias.detach().to(u_hat.dtype)
        with torch.no_grad():
            return torch.ops.aten.convolution(u_hat, weight, bias, *self.call).to(dtype)


# autograd's nodes of activations whose backward keeps their input (so that a rebuild of their
# output reads what is stored anyway), and the function each applies
_ACTIVATIONS = {"GeluBackward0": "gelu", "SiluBackward0": "silu"}
_LAYER_NORM = "NativeLayerNormBackward0"
# nodes between an activation's (or LayerNorm's) output and the tensor a reader saves that keep its
# values in order: views, reshapes (a Linear's 3-D or 4-D input flattened to rows), a cast
# (autocast's copy). Not a permute: the rebuilt tensor is reshaped to the saved one's shape.
_SAME_VALUES = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0",
                "ToCopyBackward0")


@dataclass
class ActivationSource:
    """What a rebuild of an activation's output reads: the activation's own stored input."""

    layer: str              # the activation's module, for the ledger (or its autograd node's name)
    packed: Packed          # its input, as stored for its own backward
    function: str           # "gelu" or "silu"
    approximate: str        # GELU's: "none" or "tanh"
    shape: tuple            # the saved tensor's (the output, or a view of it)

    def rebuilt(self, dtype: torch.dtype, mask: Optional[Packed]) -> torch.Tensor:
        """act(h_hat) as the saved tensor, in ``dtype``; h_hat stays with the activation's
        ``Packed`` for its backward, which comes next (one decode for both)."""
        h_hat = decode_once(self.packed)
        with torch.no_grad():
            y = F.gelu(h_hat, approximate=self.approximate) if self.function == "gelu" else F.silu(h_hat)
        return y.to(dtype).reshape(self.shape)


@dataclass
class LayerNormSource:
    """What a rebuild of a LayerNorm's output reads: the LayerNorm's own stored input and module."""

    layer: str
    packed: Packed          # its input, as stored for its own backward (normalized codes and statistics)
    module: nn.LayerNorm    # normalized_shape, eps, weight and bias (model memory)
    shape: tuple
    versions: tuple[int, int]

    def rebuilt(self, dtype: torch.dtype, mask: Optional[Packed]) -> torch.Tensor:
        """LayerNorm(x_hat) with the module's parameters, as the saved tensor, in ``dtype``: one
        fused kernel over the decode that the LayerNorm's backward, next, reads too."""
        m = self.module
        _check_unchanged(self.versions, m.weight, m.bias, f"the parameters of {self.layer or 'a LayerNorm'}",
                         "rebuilt", "rebuild_conv_input")
        x_hat = decode_once(self.packed)
        with torch.no_grad():
            y = F.layer_norm(x_hat, m.normalized_shape, _detached(m.weight), _detached(m.bias), m.eps)
        return y.to(dtype).reshape(self.shape)


def output_source(t: torch.Tensor, stored: dict):
    """``t``'s ``ActivationSource`` if ``t`` holds the values of a GELU's or SiLU's output (itself,
    a view, a cast) whose input is stored, or its ``LayerNormSource`` if of a LayerNorm module's
    output whose input is stored; else None. ``stored`` maps (autograd node, output number) of each
    tensor saved this step to its (``Packed``, layer, module running). A tensor changed in place
    since has another node, so it is never matched."""
    node = t.grad_fn
    for _ in range(len(_SAME_VALUES) + 1):
        name = type(node).__name__
        if name in _ACTIVATIONS or name == _LAYER_NORM or name not in _SAME_VALUES or not node.next_functions:
            break
        node = node.next_functions[0][0]
    name = type(node).__name__
    if (name not in _ACTIVATIONS and name != _LAYER_NORM) or not node.next_functions \
            or node.next_functions[0][0] is None:
        return None
    found = stored.get(node.next_functions[0])
    if found is None:
        return None
    packed, layer, module = found
    shape = packed.meta.get("shape")
    if shape is None or math.prod(shape) != t.numel():
        return None
    if name == _LAYER_NORM:
        # the module that stored the input ran this LayerNorm: its parameters are the node's
        if not isinstance(module, nn.LayerNorm) or not module.elementwise_affine \
                or not _same(node._saved_weight, module.weight):
            return None
        return LayerNormSource(layer, packed, module, tuple(t.shape),
                               (_version(module.weight), _version(module.bias)))
    return ActivationSource(layer or name, packed, _ACTIVATIONS[name],
                            str(getattr(node, "_saved_approximate", "none")), tuple(t.shape))


def decode_once(packed: Packed) -> torch.Tensor:
    """``packed``'s decode, left with it until the next unpack of it takes it (``take_decoded``)."""
    decoded = packed.meta.get(_DECODED)
    if decoded is None:
        decoded = packed.meta[_DECODED] = packed.unpack()
    return decoded


def take_decoded(packed: Packed) -> Optional[torch.Tensor]:
    """The decode a rebuild left with a BatchNorm input's ``Packed`` (for its backward), or a
    recompute with a convolution input's (for the convolution's), or None."""
    return packed.meta.pop(_DECODED, None)


def _same(saved: Optional[torch.Tensor], t: Optional[torch.Tensor]) -> bool:
    """Is ``saved`` (autograd's unpacked copy of a saved tensor) ``t``'s memory?"""
    if saved is None or t is None:
        return saved is None and t is None
    return saved.data_ptr() == t.data_ptr() and saved.shape == t.shape and saved.dtype == t.dtype


def _version(t: Optional[torch.Tensor]) -> int:
    return -1 if t is None else t._version


def _detached(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach()


def _check_unchanged(versions: tuple[int, int], weight, bias, what: str, made: str, knob: str) -> None:
    """Refuse a rebuild or recompute whose parameters changed in place since forward."""
    if versions != (_version(weight), _version(bias)):
        raise RuntimeError(f"{what} were modified in place between forward and backward; its {made} "
                           f"output (method.{knob}) would be wrong")


def cheap_to_recompute(module: nn.Module) -> bool:
    """A convolution whose output costs little to compute again: pointwise (every kernel size 1: one
    pass of its own forward, the price of the encode and decode it replaces) or depthwise (one
    group per input channel: kh * kw multiply-adds per output, a pass over memory)."""
    if not isinstance(module, nn.modules.conv._ConvNd) or isinstance(module, nn.modules.conv._ConvTransposeNd):
        return False
    return all(k == 1 for k in module.kernel_size) or module.groups == module.in_channels


def _is_weight(saved: Optional[torch.Tensor], weight: torch.Tensor) -> bool:
    """Is ``saved`` (a convolution node's saved weight) the module's weight or autocast's copy of it?"""
    if _same(saved, weight):
        return True
    node = getattr(saved, "grad_fn", None)
    if type(node).__name__ != "ToCopyBackward0" or saved.shape != weight.shape:
        return False
    leaf = node.next_functions[0][0]
    return getattr(leaf, "variable", None) is weight


def _current(values: dict, t: torch.Tensor):
    """``values``' record of ``t``, if ``t`` is still the tensor (and version) recorded."""
    v = values.get(id(t))
    if v is None or v.ref() is not t or v.version != t._version:
        return None
    return v


@dataclass
class _Value:
    """A tensor known to be BN(x) (``relu`` False) or ReLU(BN(x)) at ``version``."""

    ref: weakref.ref
    version: int
    source: NormSource
    node: object   # the tensor's autograd node (held until forward ends, to check the next link)
    relu: bool


@dataclass
class _ConvValue:
    """A tensor known to be a cheap convolution's output at ``version`` (``cheap_to_recompute``)."""

    ref: weakref.ref
    version: int
    source: ConvSource


class ChainTracker:
    """The BN(x) and ReLU(BN(x)) tensors of the current forward, and the cheap convolutions'
    outputs (see the module docstring)."""

    def __init__(self) -> None:
        self._values: dict[int, _Value] = {}
        self._convs: dict[int, _ConvValue] = {}

    def clear(self) -> None:
        self._values.clear()
        self._convs.clear()

    def lookup(self, t: torch.Tensor) -> Optional[_Value]:
        """The chain ``t`` ends, if ``t`` is still the value recorded for it."""
        return _current(self._values, t)

    def lookup_conv(self, t: torch.Tensor) -> Optional[_ConvValue]:
        """The cheap convolution ``t`` is the output of, if ``t`` is still that output."""
        return _current(self._convs, t)

    def after_conv(self, module: nn.Module, layer: str, u: Optional[torch.Tensor],
                   u_packed: Optional[Packed], y) -> None:
        """A convolution module returned ``y``; its saved input was ``u`` (the module's input or
        autocast's copy of it), stored as ``u_packed``."""
        if not (cheap_to_recompute(module) and isinstance(y, torch.Tensor) and u is not None and u_packed is not None):
            return
        node = y.grad_fn
        if type(node).__name__ != _CONV or node.next_functions[0][0] is not u.grad_fn \
                or not _is_weight(node._saved_weight, module.weight):
            return
        bias = module.bias
        sizes = node._saved_bias_sym_sizes_opt  # (0,) (or None) where the call had no bias
        if (sizes is not None and tuple(sizes) != (0,)) != (bias is not None):  # a subclass's own bias
            return
        call = (list(node._saved_stride), list(node._saved_padding), list(node._saved_dilation),
                node._saved_transposed, list(node._saved_output_padding), node._saved_groups)
        source = ConvSource(layer, u_packed, module.weight, bias, call,
                            (_version(module.weight), _version(bias)))
        self._convs[id(y)] = _ConvValue(weakref.ref(y), y._version, source)

    def after_norm(self, module: nn.Module, layer: str, x: Optional[torch.Tensor],
                   x_packed: Optional[Packed], y) -> None:
        """A BatchNorm module returned ``y`` from ``x``, whose saved Packed is ``x_packed``."""
        if not (isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(y, torch.Tensor)
                and x_packed is not None and x is not None and x.grad_fn is not None):
            return
        node = y.grad_fn
        name = type(node).__name__
        if node is None or node.next_functions[0][0] is not x.grad_fn:
            return
        # reading a saved tensor unpacks it: the weight is returned as it is, the statistics are kept
        # raw (and the fused node's codes as they are), so these are the tensors themselves
        if name == _FUSED_NORM:
            saved_weight, mean, invstd = node.saved_tensors[:3]
        elif name in _NORM_NODES and getattr(node, "_saved_training", False):
            saved_weight, mean, invstd = node._saved_weight, node._saved_result1, node._saved_result2
        else:
            return
        weight = module.weight if module.affine else None
        if not _same(saved_weight, weight):  # a subclass that normalizes with something else
            return
        bias = module.bias if module.affine else None
        source = NormSource(layer, x_packed, mean, invstd, weight, bias, (_version(weight), _version(bias)))
        self._values[id(y)] = _Value(weakref.ref(y), y._version, source, node, relu=False)

    def after_relu(self, x: Optional[torch.Tensor], y) -> None:
        """A ReLU module returned ``y`` from ``x`` (``y is x`` in place)."""
        if x is None or not isinstance(y, torch.Tensor):
            return
        v = self._values.get(id(x))
        in_place = y is x
        # in place, ReLU's own write is the one version step since the BatchNorm
        if v is None or v.relu or v.ref() is not x or v.version != x._version - int(in_place):
            return
        node = y.grad_fn
        if type(node).__name__ != _RELU or node.next_functions[0][0] is not v.node:
            return
        self._values[id(y)] = _Value(weakref.ref(y), y._version, v.source, node, relu=True)


class RebuildCodec(ActivationCodec):
    """A tensor rebuilt in backward from a ``NormSource``: no storage of its own."""

    name = REBUILT

    def reference(self, t: torch.Tensor, source: NormSource, mask: Optional[Packed]) -> Packed:
        """The zero-byte Packed of ``t`` = BN(x) (``mask`` None) or ReLU(BN(x)) (``mask``: the
        ReLU's exact mask of ``t``)."""
        return Packed(self, {}, {"source": source, "mask": mask, "shape": t.shape, "dtype": t.dtype,
                                 "channels_last": _is_channels_last(t), "rebuilt_from": source.layer})

    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        raise TypeError("a rebuilt tensor is made by reference(), from the BatchNorm that produced it")

    def decode(self, packed: Packed) -> torch.Tensor:
        m = packed.meta
        mask = m["mask"]
        y = m["source"].rebuilt(m["dtype"], mask)
        if m["channels_last"] and not _is_channels_last(y):
            y = y.contiguous(memory_format=torch.channels_last)
        if mask is not None and last_reader(packed):
            share_decode(mask, y)  # the ReLU's backward, which comes next, reads it as its output
        return y

    def closed_form_nbytes(self, shape, dtype) -> int:
        return 0


class RecomputeCodec(ActivationCodec):
    """A cheap convolution's output recomputed in backward from a ``ConvSource``: no storage of
    its own."""

    name = RECOMPUTED

    def reference(self, t: torch.Tensor, source: ConvSource) -> Packed:
        """The zero-byte Packed of ``t``, the output of ``source``'s convolution."""
        return Packed(self, {}, {"source": source, "dtype": t.dtype, "channels_last": _is_channels_last(t),
                                 "rebuilt_from": source.layer})

    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        raise TypeError("a recomputed tensor is made by reference(), from the convolution that produced it")

    def decode(self, packed: Packed) -> torch.Tensor:
        m = packed.meta
        y = m["source"].output(m["dtype"])
        if m["channels_last"] and not _is_channels_last(y):
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def closed_form_nbytes(self, shape, dtype) -> int:
        return 0
