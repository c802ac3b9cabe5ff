"""The byte ledger: exactly what a method keeps for backward, next to what plain autograd would keep.

One entry per saved tensor of a training step. ``stored_bytes`` is the storage of the tensors the
method actually holds (``Packed.nbytes``); ``plain_bytes`` is what plain autograd would hold for the
same save (the tensor's own bytes, counted once per tensor, since autograd saves by reference).
Parameters are left out of both: they are model memory, not activation memory. So are copies of a
parameter that a compiled graph keeps (a weight in another memory format): their bytes are
``parameter_copy_bytes``, beside the entries. A copy of one parameter that an eager step saves
(autocast's bf16 copy of a weight: made from it alone, as many elements) is an entry, kept raw as plain
autograd keeps it (the allocator holds it too), with codec ``parameter_copy``: no codec may compress
it, so ``coverage``, the share of activation bytes compressed, leaves it out.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Optional

COMPILED = "compiled"  # LedgerEntry.kind of a tensor saved by a compiled graph
REBUILT = "rebuilt"    # LedgerEntry.codec of a tensor rebuilt in backward, not stored (division.rebuild)
RECOMPUTED = "recomputed"  # LedgerEntry.codec of a 1x1 or depthwise convolution's output recomputed in backward
SHARED = "shared"      # LedgerEntry.codec of a save another entry stores (a tensor two layers read)
PARAMETER_COPY = "parameter_copy"  # LedgerEntry.codec of a raw save made from parameters alone (model memory)


@dataclass
class LedgerEntry:
    layer: str          # module name that saved the tensor ("" outside any tracked module)
    kind: str           # module family: conv, bn, linear, relu, dropout, maxpool, other
    codec: str          # how it is stored: division, relu_mask, raw, shared (stored once elsewhere),
                        # rebuilt (not stored: rebuilt in backward from a BatchNorm's stored input), ...
    shape: tuple
    dtype: str
    plain_bytes: int
    stored_bytes: int
    op: str = ""             # the operator behind the save: the saving module's type (Conv2d, GELU, ...)
    compressed: bool = True  # stored by a compressing codec (False: kept raw, as plain autograd keeps it)
    rebuilt_from: str = ""   # codec "rebuilt": the BatchNorm whose stored input backward rebuilds it from;
                             # "recomputed": the convolution whose stored input recomputes it;
                             # "shared" (compiled): the convolution whose input's codes it reads


class ByteLedger:
    """Collects ``LedgerEntry`` rows; ``reset`` starts a new step."""

    def __init__(self) -> None:
        self.entries: list[LedgerEntry] = []
        self.parameter_copy_bytes = 0  # parameter copies a compiled graph keeps (model memory)

    def reset(self) -> None:
        self.entries = []
        self.parameter_copy_bytes = 0

    def record(self, entry: LedgerEntry) -> None:
        self.entries.append(entry)

    @property
    def stored_bytes(self) -> int:
        return sum(e.stored_bytes for e in self.entries)

    @property
    def compiled(self) -> bool:
        """Counted around a compiled graph (``division.compiled.SavedTensorCounter``): what it kept
        is exact, but there is no per-save plain reference (compare with a compiled ``none`` run)."""
        return bool(self.entries) and all(e.kind == COMPILED for e in self.entries)

    @property
    def plain_bytes(self) -> Optional[int]:
        if self.compiled:
            return None
        return sum(e.plain_bytes for e in self.entries)

    @property
    def ratio(self) -> Optional[float]:
        """How many times fewer bytes than plain autograd (plain / stored); None when compiled."""
        if self.compiled:
            return None
        return self.plain_bytes / self.stored_bytes if self.stored_bytes else float("inf")

    def by_layer(self) -> list[dict]:
        """Per-layer totals in first-save order: layer, kind, plain_bytes, stored_bytes, tensors."""
        rows: dict[str, dict] = {}
        for e in self.entries:
            row = rows.setdefault(e.layer, {"layer": e.layer, "kind": e.kind, "plain_bytes": 0,
                                            "stored_bytes": 0, "tensors": 0})
            row["plain_bytes"] += e.plain_bytes
            row["stored_bytes"] += e.stored_bytes
            row["tensors"] += 1
        return list(rows.values())

    @property
    def coverage(self) -> Optional[float]:
        """The fraction of the activation bytes plain autograd would keep that are stored compressed
        (parameter copies left out); None when nothing was saved or the step was compiled (no per-save
        plain reference)."""
        return coverage_of(self.entries)

    def by_op(self) -> dict[str, dict[str, int]]:
        """Totals per operator, largest plain bytes first: plain_bytes, stored_bytes, raw_plain_bytes
        (the part kept raw), parameter_copy_bytes (the part of that made from parameters alone), tensors."""
        out: dict[str, dict[str, int]] = defaultdict(
            lambda: {"plain_bytes": 0, "stored_bytes": 0, "raw_plain_bytes": 0, "parameter_copy_bytes": 0,
                     "tensors": 0})
        for e in self.entries:
            row = out[e.op or e.kind]
            row["plain_bytes"] += e.plain_bytes
            row["stored_bytes"] += e.stored_bytes
            row["raw_plain_bytes"] += 0 if e.compressed else e.plain_bytes
            row["parameter_copy_bytes"] += e.plain_bytes if e.codec == PARAMETER_COPY else 0
            row["tensors"] += 1
        return dict(sorted(out.items(), key=lambda item: -item[1]["plain_bytes"]))

    def by_codec(self) -> dict[str, dict[str, int]]:
        """Totals per storage kind: how many bytes went to masks, DIVISION, raw tensors, ..."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: {"plain_bytes": 0, "stored_bytes": 0, "tensors": 0})
        for e in self.entries:
            out[e.codec]["plain_bytes"] += e.plain_bytes
            out[e.codec]["stored_bytes"] += e.stored_bytes
            out[e.codec]["tensors"] += 1
        return dict(out)

    def rebuilt(self) -> list[dict]:
        """The tensors rebuilt or recomputed in backward instead of stored, one row each: layer (the
        saving module), how (``rebuilt`` from a BatchNorm, ``recomputed`` by a convolution),
        rebuilt_from (that BatchNorm or convolution), shape, dtype and tensor_bytes (the tensor's
        full size, which it does not cost; None where a compiled graph's shape was symbolic)."""
        return [{"layer": e.layer, "how": e.codec, "rebuilt_from": e.rebuilt_from, "shape": e.shape,
                 "dtype": e.dtype,
                 "tensor_bytes": math.prod(e.shape) * _itemsize(e.dtype) if e.dtype else None}
                for e in self.entries if e.codec in (REBUILT, RECOMPUTED)]

    def summary(self) -> dict:
        return {"plain_bytes": self.plain_bytes, "stored_bytes": self.stored_bytes,
                "ratio": self.ratio, "coverage": self.coverage, "tensors": len(self.entries)}

    def as_rows(self) -> list[dict]:
        return [asdict(e) for e in self.entries]


def _itemsize(dtype: str) -> int:
    import torch
    return getattr(torch, dtype).itemsize


def coverage_of(entries: list[LedgerEntry]) -> Optional[float]:
    """Compressed share of the plain bytes of these entries, parameter copies left out (see
    ``ByteLedger.coverage``)."""
    if any(e.kind == COMPILED for e in entries):
        return None
    entries = [e for e in entries if e.codec != PARAMETER_COPY]
    plain = sum(e.plain_bytes for e in entries)
    if not plain:
        return None
    return sum(e.plain_bytes for e in entries if e.compressed) / plain
