"""Bit packing of small unsigned codes into uint8 storage (8 // bits codes per byte).

Codes are packed along the flattened tensor: code i lands in byte i // per_byte at bit offset
(i % per_byte) * bits. The byte count is exactly ceil(numel * bits / 8), which the ledger tests rely on.
"""
from __future__ import annotations

import functools
import math

import torch

SUPPORTED_BITS = (1, 2, 4, 8)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``pack_bits`` uses for ``numel`` codes of ``bits`` bits each."""
    return math.ceil(numel * bits / 8)


@functools.lru_cache(maxsize=None)
def _cached_shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, device=device, dtype=torch.uint8)


def _shifts(bits: int, like: torch.Tensor) -> torch.Tensor:
    """Bit offsets of the codes inside a byte for ops on ``like``: made once per device in eager
    mode (one launch less per call). A compiled graph makes them as a constant of its own, and so
    does any tensor subclass: a fake tensor (the compiler propagating shapes through an opaque op's
    fake implementation, where ``is_compiling`` is False) may not meet a real cached tensor."""
    if torch.compiler.is_compiling() or type(like) is not torch.Tensor:
        return torch.arange(0, 8, bits, device=like.device, dtype=torch.uint8)
    return _cached_shifts(bits, like.device)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a flat uint8 tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    lanes = flat.view(-1, per_byte)
    # The lanes hold disjoint bits after shifting, so their sum is their OR: two kernels, not 2 * per_byte.
    return (lanes << _shifts(bits, lanes)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``numel`` codes as a flat uint8 tensor."""
    _check_bits(bits)
    if bits == 8:
        return packed[:numel]
    mask = (1 << bits) - 1
    lanes = (packed.unsqueeze(1) >> _shifts(bits, packed)) & mask
    return lanes.reshape(-1)[:numel]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as 1 bit per element."""
    return pack_bits(mask.reshape(-1).view(torch.uint8), 1)  # bool and uint8 share a layout: no copy


def unpack_mask(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The mask as 0/1 in ``dtype`` (bool by default), converted in the same pass."""
    return unpack_bits(packed, 1, math.prod(shape)).view(shape).to(dtype)
