"""ActNN-like storage: per-group min/step and stochastically rounded low-bit codes (method ``actnn``).

ActNN (Chen et al., ICML 2021) flattens each sample's activation, cuts it into groups of 256
elements, and stores every group as 2-bit codes plus its minimum and scale in 16 bits. It also
mixes bit widths per sample and layer by gradient sensitivity (2 bits on average); this version
uses one bit width everywhere.

Per sample n (dim 0), the flattened activation of D elements is cut into ceil(D / G) groups of G
elements; the last group of each sample holds the remaining D mod G elements (it is never padded
with values from the next sample or with zeros: its min and max are those of its own elements).
For a group with minimum mn and maximum mx, stored in bf16:
    mn_s   = mn rounded down,
    step_s = (mx - mn_s) / (2^Q - 1) rounded up (the group's scale: the distance between levels),
    code   = floor((x - mn_s) / step_s + u), u ~ U[0, 1), clamped to [0, 2^Q - 1],
    x_hat  = mn_s + code * step_s.
Stochastic rounding makes x_hat unbiased (E[x_hat] = x) and the grid covers [mn, mx], so every
element comes back within one step: |x_hat - x| < step_s.

Stored: ceil(numel * Q / 8) code bytes plus 2 + 2 bytes per group, N * ceil(D / G) groups.
ReLU / dropout masks and max-pool indices stay exact (``CodecMethod``).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..codec import ActivationCodec, Packed, SaveContext
from ..exact import _is_channels_last, _restore_format
from ..methods import CodecMethod, TrainingMethod
from ..packing import SUPPORTED_BITS, pack_bits, packed_nbytes, unpack_bits
from ._numerics import TINY, bf16_down, bf16_up


def sample_layout(shape: tuple[int, ...]) -> tuple[int, int]:
    """(samples, elements per sample): dim 0 is the batch; tensors of < 2 dims are one sample."""
    numel = math.prod(shape)
    if len(shape) < 2:
        return 1, numel
    return shape[0], numel // shape[0] if shape[0] else 0


class ActNNCodec(ActivationCodec):
    """Groups of ``group_size`` elements per sample, ``bits`` bits each, stochastic rounding.

    generator: an optional ``torch.Generator`` on the inputs' device for the rounding noise
        (default: the global RNG, which ``seed_everything`` seeds).
    """

    name = "actnn"

    def __init__(self, bits: int = 2, group_size: int = 256, generator: Optional[torch.Generator] = None):
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"method.bits={bits!r} is not allowed for actnn: use one of {SUPPORTED_BITS}")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"method.group_size={group_size!r} is not allowed: use an integer >= 1")
        self.bits = bits
        self.group_size = group_size
        self.generator = generator

    def describe(self) -> dict[str, Any]:
        return {"codec": self.name, "bits": self.bits, "group_size": self.group_size, "block_size": None}

    def _grouped(self, rows: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """(N, D) rows as (N, groups, G); the last group's missing elements are ``fill`` (N, 1)."""
        n, d = rows.shape
        pad = -d % self.group_size
        if pad:
            rows = torch.cat([rows, fill.expand(n, pad)], dim=1)
        return rows.view(n, -1, self.group_size)

    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        if x.numel() == 0:
            return Packed(self, {"raw": x.detach()})  # empty: nothing to quantize, no bytes
        n, d = sample_layout(tuple(x.shape))
        rows = x.reshape(n, d).float()
        # The last group is padded with a copy of the sample's last element, which belongs to that
        # group already, so its min and max are those of its own elements.
        groups = self._grouped(rows, rows[:, -1:])
        mn = bf16_down(groups.amin(dim=2))
        step = bf16_up(((groups.amax(dim=2) - mn.float()) / (2 ** self.bits - 1)).clamp(min=TINY))
        noise = torch.rand(groups.shape, generator=self.generator, device=x.device)
        codes = torch.floor((groups - mn.float().unsqueeze(2)) / step.float().unsqueeze(2) + noise)
        codes = codes.clamp_(0, 2 ** self.bits - 1).view(n, -1)[:, :d]
        meta = {"shape": x.shape, "dtype": x.dtype, "channels_last": _is_channels_last(x)}
        return Packed(self, {"codes": pack_bits(codes, self.bits), "min": mn, "step": step}, meta)

    def decode(self, packed: Packed) -> torch.Tensor:
        t, meta = packed.tensors, packed.meta
        if "raw" in t:
            return t["raw"]
        shape = meta["shape"]
        n, d = sample_layout(tuple(shape))
        codes = unpack_bits(t["codes"], self.bits, n * d).view(n, d).float()
        groups = self._grouped(codes, codes.new_zeros(n, 1))
        x = groups * t["step"].float().unsqueeze(2) + t["min"].float().unsqueeze(2)
        x = x.view(n, -1)[:, :d].reshape(shape).to(meta["dtype"])
        return _restore_format(x, meta["channels_last"])

    def closed_form_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        numel = math.prod(shape)
        if numel == 0:
            return 0
        n, d = sample_layout(tuple(shape))
        return packed_nbytes(numel, self.bits) + 4 * n * math.ceil(d / self.group_size)


def build_actnn(bits: int = 2, group_size: int = 256, seed: Optional[int] = None, **_) -> TrainingMethod:
    return CodecMethod("actnn", ActNNCodec(bits=bits, group_size=group_size), seed=seed)
