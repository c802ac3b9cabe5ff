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
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .codec import ActivationCodec, Packed, SaveContext
from .exact import _is_channels_last, apply_relu_mask, last_reader, share_decode
from .ledger import REBUILT

_DECODED = "rebuild_decoded"  # Packed.meta of a BatchNorm input: its decode, left by a rebuild

# autograd's node of a training BatchNorm whose saved result1 / result2 are mean / invstd (CPU, and
# CUDA without cuDNN). Other nodes (cuDNN's, SyncBatchNorm's, the fused norm_from_codes one) save
# their statistics differently: their outputs are stored, not rebuilt.
_NATIVE_NORM = "NativeBatchNormBackward0"
_RELU = "ReluBackward0"


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

    def affine(self, x_hat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """BN(x_hat) with the forward's statistics and parameters, in ``dtype``."""
        if self.versions != (_version(self.weight), _version(self.bias)):
            # plain autograd refuses this too: the BatchNorm's own backward would read the new weight
            raise RuntimeError(f"the affine parameters of {self.layer or 'a BatchNorm'} were modified in "
                               "place between forward and backward; its rebuilt output "
                               "(method.rebuild_conv_input) would be wrong")
        scale = self.invstd.float()
        if self.weight is not None:
            scale = scale * self.weight.detach().float()
        shift = -self.mean.float() * scale
        if self.bias is not None:
            shift = shift + self.bias.detach().float()
        view = (1, -1) + (1,) * (x_hat.dim() - 2)  # BatchNorm's channels are dim 1
        return torch.addcmul(shift.view(view), x_hat.float(), scale.view(view)).to(dtype)

    def decoded_input(self) -> torch.Tensor:
        """x_hat, decoded once for every rebuild of this step and the BatchNorm's backward."""
        x_hat = self.packed.meta.get(_DECODED)
        if x_hat is None:
            x_hat = self.packed.meta[_DECODED] = self.packed.unpack()
        return x_hat


def take_decoded(packed: Packed) -> Optional[torch.Tensor]:
    """The decode a rebuild left with a BatchNorm input's ``Packed`` (for its backward), or None."""
    return packed.meta.pop(_DECODED, None)


def _same(saved: Optional[torch.Tensor], t: Optional[torch.Tensor]) -> bool:
    """Is ``saved`` (autograd's unpacked copy of a saved tensor) ``t``'s memory?"""
    if saved is None or t is None:
        return saved is None and t is None
    return saved.data_ptr() == t.data_ptr() and saved.shape == t.shape and saved.dtype == t.dtype


def _version(t: Optional[torch.Tensor]) -> int:
    return -1 if t is None else t._version


@dataclass
class _Value:
    """A tensor known to be BN(x) (``relu`` False) or ReLU(BN(x)) at ``version``."""

    ref: weakref.ref
    version: int
    source: NormSource
    node: object   # the tensor's autograd node (held until forward ends, to check the next link)
    relu: bool


class ChainTracker:
    """The BN(x) and ReLU(BN(x)) tensors of the current forward (see the module docstring)."""

    def __init__(self) -> None:
        self._values: dict[int, _Value] = {}

    def clear(self) -> None:
        self._values.clear()

    def lookup(self, t: torch.Tensor) -> Optional[_Value]:
        """The chain ``t`` ends, if ``t`` is still the value recorded for it."""
        v = self._values.get(id(t))
        if v is None or v.ref() is not t or v.version != t._version:
            return None
        return v

    def after_norm(self, module: nn.Module, layer: str, x: Optional[torch.Tensor],
                   x_packed: Optional[Packed], y) -> None:
        """A BatchNorm module returned ``y`` from ``x``, whose saved Packed is ``x_packed``."""
        if not (isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(y, torch.Tensor)
                and x_packed is not None and x is not None and x.grad_fn is not None):
            return
        node = y.grad_fn
        if type(node).__name__ != _NATIVE_NORM or not node._saved_training \
                or node.next_functions[0][0] is not x.grad_fn:
            return
        weight = module.weight if module.affine else None
        if not _same(node._saved_weight, weight):  # a subclass that normalizes with something else
            return
        bias = module.bias if module.affine else None
        # reading a saved tensor unpacks it: these statistics are kept raw, so this is the tensor itself
        source = NormSource(layer, x_packed, node._saved_result1, node._saved_result2, weight, bias,
                            (_version(weight), _version(bias)))
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
        source: NormSource = m["source"]
        y = source.affine(source.decoded_input(), m["dtype"])
        mask = m["mask"]
        if mask is not None:
            y = apply_relu_mask(y, mask)  # exact zeros; positive wherever the true output is
        if m["channels_last"]:
            y = y.contiguous(memory_format=torch.channels_last)
        if mask is not None and last_reader(packed):
            share_decode(mask, y)  # the ReLU's backward, which comes next, reads it as its output
        return y

    def closed_form_nbytes(self, shape, dtype) -> int:
        return 0
