"""Exact (lossless for backward) storage of the tensors that ReLU, dropout and max-pooling save.

These layers do not need the activation's values, only which elements were kept or chosen:
- ReLU's backward reads its output only through ``output > 0``: a 1-bit mask is exact.
- Dropout's backward reads its noise, which is 0 or one scale: a 1-bit mask plus the scale.
- Max-pooling's backward reads the argmax indices (int64) and the input only for its shape: the
  argmax position inside the window fits in a uint8, and the input needs no storage at all.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .codec import ActivationCodec, Packed, SaveContext
from .packing import pack_mask, packed_nbytes, unpack_mask
from .triton_launch import runs_here


class _ExactCodec(ActivationCodec):
    """An exact codec with a fused-kernel path (CUDA with Triton, or Triton's interpreter).

    ``kernels=False`` keeps it on the PyTorch path whatever the device: ``method.backend=torch``
    runs the reference everywhere. Both paths store the same bytes.
    """

    def __init__(self, kernels: bool = True):
        self.kernels = bool(kernels)

    def _fast(self, t: torch.Tensor):
        return _fast_masks(t) if self.kernels else None


class BoolMaskCodec(_ExactCodec):
    """A bool tensor (e.g. CUDA dropout's mask) at 1 bit per element."""

    name = "bool_mask"

    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        return Packed(self, {"bits": _pack(x, True, self._fast(x))}, _mask_meta(x))

    def decode(self, packed: Packed) -> torch.Tensor:
        return _unpack(packed, self._fast(packed.tensors["bits"]))

    def closed_form_nbytes(self, shape, dtype) -> int:
        return packed_nbytes(math.prod(shape), 1)


class ReluMaskCodec(_ExactCodec):
    """ReLU's saved output as ``output > 0``; decodes to 0/1 in the output's dtype, or to the
    decoded output a linked activation codec left with the mask (see ``share_decode``).

    ``threshold_backward(grad, result, 0)`` only tests ``result > 0``, so either gives exact gradients.
    """

    name = "relu_mask"

    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        return Packed(self, {"bits": _pack(x, False, self._fast(x))}, _mask_meta(x))

    def decode(self, packed: Packed) -> torch.Tensor:
        shared = packed.meta.pop(_SHARED, None)  # the ReLU's backward is the last reader
        if shared is not None:
            return shared
        return self.decode_mask(packed)

    def reserve(self, x: torch.Tensor) -> Packed:
        """The mask's Packed with its bits not yet written: ``fill`` writes them, or an activation
        codec's encode of the same tensor does (``packs_relu_mask``)."""
        bits = torch.empty(packed_nbytes(x.numel(), 1), dtype=torch.uint8, device=x.device)
        return Packed(self, {"bits": bits}, _mask_meta(x))

    def fill(self, packed: Packed, x: torch.Tensor) -> None:
        """Write x's mask into a ``reserve``d Packed (the bits ``encode`` stores)."""
        bits = packed.tensors["bits"]
        fast = self._fast(x)
        if fast is None or fast.pack(x, False, out=bits) is None:
            bits.copy_(_pack(x, False, None))

    def decode_mask(self, packed: Packed) -> torch.Tensor:
        """The mask as 0/1 in the output's dtype, whatever a linked codec left with it."""
        return _unpack(packed, self._fast(packed.tensors["bits"]))

    def closed_form_nbytes(self, shape, dtype) -> int:
        return packed_nbytes(math.prod(shape), 1)


# ------------------------------------------------------------------- a ReLU output stored twice
# A ReLU's output is usually the next layer's input as well, so it is stored twice: as the ReLU's
# mask and through the activation codec. The compressor links the two (the codec's Packed.meta
# [RELU_MASK] is the mask's Packed) for codecs that ask for it. Such a codec's decode takes the
# output's zeros from the exact mask (and keeps the output positive where the mask is set); the
# decode for its last reader (``add_reader`` counts them: a block input read by conv1 and by the
# downsample convolution has two) leaves the decoded tensor with the mask, and the ReLU's backward,
# which runs after every reader of its output, takes it instead of a 0/1 tensor of its own. An
# earlier reader's decode is not kept: it would stay allocated through the other branch's backward.
RELU_MASK = "relu_mask"
_SHARED = "decoded"
_READERS = "readers"
_DECODES = "decodes"


def add_reader(packed: Packed) -> None:
    """One more saved-tensor slot holds ``packed`` (the compressor's second save of a tensor)."""
    packed.meta[_READERS] = packed.meta.get(_READERS, 1) + 1


def readers(packed: Packed) -> int:
    """How many saved-tensor slots hold ``packed``."""
    return packed.meta.get(_READERS, 1)


def last_reader(packed: Packed) -> bool:
    """Count a decode of ``packed``: is it for its last reader (so the ReLU's backward is next)?"""
    decodes = packed.meta[_DECODES] = packed.meta.get(_DECODES, 0) + 1
    return decodes % readers(packed) == 0  # (% : a second backward, retain_graph)


def shared_decode(mask: Packed) -> Optional[torch.Tensor]:
    """The decoded output left with this ReLU mask by a linked codec, or None."""
    return mask.meta.get(_SHARED)


def share_decode(mask: Packed, decoded: torch.Tensor) -> None:
    """Leave ``decoded`` with the mask until the ReLU's backward takes it."""
    mask.meta[_SHARED] = decoded


def relu_mask_bits(mask: Packed, shape, channels_last: bool) -> Optional[torch.Tensor]:
    """The mask's bits, one per element in the storage order of a tensor of ``shape`` in this
    format, or None if the mask was taken from a tensor of another shape or format."""
    m = mask.meta
    if tuple(m["shape"]) != tuple(shape) or m["channels_last"] != bool(channels_last):
        return None
    return mask.tensors["bits"]


def apply_relu_mask(decoded: torch.Tensor, mask: Packed) -> torch.Tensor:
    """``decoded`` with the mask's zeros: 0 where the ReLU's output was 0, at least the dtype's
    smallest positive normal number where it was positive (the reference of the fused decode)."""
    return apply_relu_mask_(decoded.clone(), mask)


def apply_relu_mask_(decoded: torch.Tensor, mask: Packed) -> torch.Tensor:
    """``apply_relu_mask`` written into ``decoded`` (a tensor the caller owns, e.g. a fresh decode):
    no full-size temporary but the mask's booleans."""
    keep = _unpack(mask, None, dtype=torch.bool)
    return decoded.clamp_min_(torch.finfo(decoded.dtype).tiny).masked_fill_(keep.logical_not_(), 0)


class DropoutMaskCodec(_ExactCodec):
    """Dropout's float noise (0 or 1 / (1 - p)) as a 1-bit mask plus the scale as a 0-d tensor.

    The scale stays on the device (no host sync in the forward pass). An empty tensor has no
    maximum; its scale is a 0 of its dtype (the same bytes, nothing to scale).
    """

    name = "dropout_mask"

    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        scale = x.amax() if x.numel() else x.new_zeros(())
        return Packed(self, {"bits": _pack(x, True, self._fast(x)), "scale": scale}, _mask_meta(x))

    def decode(self, packed: Packed) -> torch.Tensor:
        return _unpack(packed, self._fast(packed.tensors["bits"]), packed.tensors["scale"])

    def closed_form_nbytes(self, shape, dtype) -> int:
        return packed_nbytes(math.prod(shape), 1) + dtype.itemsize


# ---------------------------------------------------------------------------- the masks' bits
# Bits follow the tensor's storage order (NHWC for a channels_last tensor), so neither direction
# reorders memory: a channels_last mask decodes straight into a channels_last tensor. On CUDA one
# fused Triton kernel does each direction (division/triton_masks.py); elsewhere PyTorch ops do.

def _mask_meta(x: torch.Tensor) -> dict:
    return {"shape": x.shape, "dtype": x.dtype, "channels_last": _is_channels_last(x)}


def _storage_flat(x: torch.Tensor) -> torch.Tensor:
    """x's elements in storage order for contiguous and channels_last tensors (a view), else in
    logical order (a copy)."""
    return x.permute(0, 2, 3, 1).reshape(-1) if _is_channels_last(x) else x.reshape(-1)


def _pack(x: torch.Tensor, nonzero: bool, fast) -> torch.Tensor:
    """``fast``: division.triton_masks, or None for the PyTorch path."""
    bits = fast.pack(x, nonzero) if fast is not None else None
    if bits is None:
        flat = _storage_flat(x)
        bits = pack_mask(flat != 0 if nonzero else flat > 0)
    return bits


def _unpack(packed: Packed, fast, scale: Optional[torch.Tensor] = None,
            dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The mask as 0 / 1 (times ``scale``) in the stored tensor's dtype, or in ``dtype``."""
    bits, m = packed.tensors["bits"], packed.meta
    shape, channels_last = m["shape"], m["channels_last"]
    dtype = m["dtype"] if dtype is None else dtype
    out = fast.unpack(bits, shape, dtype, channels_last, scale) if fast is not None else None
    if out is not None:
        return out
    if channels_last:
        n, c, h, w = shape
        out = unpack_mask(bits, torch.Size((n, h, w, c)), dtype).permute(0, 3, 1, 2)
    else:
        out = unpack_mask(bits, shape, dtype)
    return out * scale if scale is not None else out


_FAST = None


def _fast_masks(t: torch.Tensor):
    """division.triton_masks when it can run on ``t`` (CUDA with Triton, or Triton's interpreter),
    else None."""
    global _FAST
    if not runs_here(t):
        return None  # e.g. a CPU tensor outside the interpreter: Triton is not even imported
    if _FAST is None:
        try:
            from . import triton_masks
            _FAST = triton_masks
        except ImportError:
            _FAST = False
    return _FAST or None


class ShapeOnlyCodec(ActivationCodec):
    """A tensor whose values backward never reads (max- and average-pooling's input): no storage.

    Its backward still reads the tensor's memory format: CUDA's max-pool backward picks its kernel
    by it and first makes the input contiguous in that format, a full-size copy of anything else
    (a zero-strided view included). So it decodes to
    - the decode of the ReLU mask the compressor linked to it (``meta[RELU_MASK]``: the pooled tensor
      is a ReLU's output), left with the mask for the ReLU's backward, which runs next and takes it
      (``share_decode``): the full-size tensor that backward needs anyway, one layer earlier;
    - else, for a channels_last tensor, an uninitialised tensor in that format;
    - else a zero-strided view of one zero, which carries the shape, dtype and device.
    """

    name = "shape_only"

    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        return Packed(self, {}, {"shape": x.shape, "dtype": x.dtype, "device": x.device,
                                 "channels_last": _is_channels_last(x)})

    def decode(self, packed: Packed) -> torch.Tensor:
        m = packed.meta
        mask = m.get(RELU_MASK)
        if mask is not None and tuple(mask.meta["shape"]) == tuple(m["shape"]) \
                and mask.meta["dtype"] == m["dtype"]:
            decoded = shared_decode(mask)
            if decoded is None:
                decoded = mask.codec.decode_mask(mask)
                share_decode(mask, decoded)
            return decoded
        if m.get("channels_last"):
            return torch.empty(m["shape"], dtype=m["dtype"], device=m["device"],
                               memory_format=torch.channels_last)
        return torch.zeros((), dtype=m["dtype"], device=m["device"]).expand(m["shape"])

    def closed_form_nbytes(self, shape, dtype) -> int:
        return 0


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _window_starts(out_h: int, out_w: int, stride, padding, device) -> tuple[torch.Tensor, torch.Tensor]:
    hs = torch.arange(out_h, device=device) * stride[0] - padding[0]
    ws = torch.arange(out_w, device=device) * stride[1] - padding[1]
    return hs.view(-1, 1), ws.view(1, -1)


def window_offsets(indices: torch.Tensor, kernel, stride, padding, dilation, input_width: int) -> torch.Tensor:
    """MaxPool2d's flat argmax indices (into the input plane) as uint8 positions inside each window.
    Plain tensor ops: the eager reference path and the compiled max-pooling function share them."""
    hs, ws = _window_starts(indices.shape[-2], indices.shape[-1], stride, padding, indices.device)
    row = torch.div(indices, input_width, rounding_mode="floor")
    col = indices - row * input_width
    dh = torch.div(row - hs, dilation[0], rounding_mode="floor")
    dw = torch.div(col - ws, dilation[1], rounding_mode="floor")
    return (dh * kernel[1] + dw).to(torch.uint8)


def indices_from_offsets(offset: torch.Tensor, kernel, stride, padding, dilation, input_width: int) -> torch.Tensor:
    """The inverse of ``window_offsets``: the exact int64 flat indices (contiguous layout)."""
    offset = offset.long()
    hs, ws = _window_starts(offset.shape[-2], offset.shape[-1], stride, padding, offset.device)
    dh = torch.div(offset, kernel[1], rounding_mode="floor")
    dw = offset - dh * kernel[1]
    return (hs + dh * dilation[0]) * input_width + ws + dw * dilation[1]


class MaxPoolIndexCodec(_ExactCodec):
    """MaxPool2d's int64 argmax indices as the position inside the pooling window (uint8).

    The flat index into the input plane is rebuilt from the output position, the window geometry
    and the stored offset, so decoding is exact. Windows with more than 256 positions are not
    representable; the compressor keeps those indices raw.
    """

    name = "maxpool_index"

    def __init__(self, kernel_size, stride, padding, dilation, input_width: int, kernels: bool = True):
        super().__init__(kernels)
        self.kernel = _pair(kernel_size)
        self.stride = _pair(stride if stride is not None else kernel_size)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.input_width = int(input_width)

    @staticmethod
    def fits(kernel_size) -> bool:
        kh, kw = _pair(kernel_size)
        return kh * kw <= 256

    def _geometry(self) -> tuple:
        return self.kernel, self.stride, self.padding, self.dilation, self.input_width

    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        fast = self._fast(x)
        offset = fast.encode_offsets(x, self._geometry()) if fast is not None else None
        if offset is not None:
            return Packed(self, {"offset": offset}, {"channels_last": _is_channels_last(x)})
        offset = window_offsets(x, *self._geometry())
        return Packed(self, {"offset": offset}, {"channels_last": _is_channels_last(x)})

    def decode(self, packed: Packed) -> torch.Tensor:
        fast = self._fast(packed.tensors["offset"])
        indices = None if fast is None else fast.decode_offsets(packed.tensors["offset"], self._geometry())
        if indices is not None:
            return indices
        indices = indices_from_offsets(packed.tensors["offset"], *self._geometry())
        return _restore_format(indices, packed.meta["channels_last"])

    def closed_form_nbytes(self, shape, dtype) -> int:
        return math.prod(shape)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _restore_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
