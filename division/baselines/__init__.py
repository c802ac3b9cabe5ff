"""The methods DIVISION is compared with (``shared/docs/DIVISION.md`` section 2), one module each.

- ``blpa``: per-channel zero-aligned K-bit grid over mean +- 3 std (:mod:`.blpa`);
- ``acgc``: per-layer / per-channel widths from measured gradient statistics (:mod:`.acgc`);
- ``actnn``: per-group min / step, 2-bit stochastic rounding (:mod:`.actnn`);
- ``checkpoint``: recompute stages in backward with ``torch.utils.checkpoint`` (:mod:`.checkpoint`);
- ``swap``: saved tensors offloaded to host memory with ``save_on_cpu`` (:mod:`.swap`).

Importing this package registers them with :func:`division.methods.register_method`, so
``build_method("blpa", bits=4)`` and the Hydra configs ``method=<name>`` work.
"""
from ..methods import register_method
from .acgc import ACGCCodec, ACGCMethod, build_acgc
from .actnn import ActNNCodec, build_actnn
from .blpa import BLPACodec, build_blpa
from .checkpoint import CheckpointMethod, build_checkpoint
from .swap import SwapMethod, build_swap

register_method("blpa", build_blpa)
register_method("acgc", build_acgc)
register_method("actnn", build_actnn)
register_method("checkpoint", build_checkpoint)
register_method("swap", build_swap)

__all__ = ["BLPACodec", "ACGCCodec", "ACGCMethod", "ActNNCodec", "CheckpointMethod", "SwapMethod"]
