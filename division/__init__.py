"""DIVISION: training with activations kept in dual precision, usable without Hydra or wandb.

    import division
    method = division.build_method("division", block_size=8, bits=2)
    ledger = division.ByteLedger()
    method.attach(model, ledger=ledger)      # in place; state_dict unchanged
    loss = criterion(model(x), y); loss.backward()
    print(ledger.plain_bytes / ledger.stored_bytes)

Lower level: ``compress_activations(model, codec)`` with any ``ActivationCodec``.
"""
from .backends import prepare_cuda_graph
from .codec import ActivationCodec, Packed, RawCodec, SaveContext
from .compressor import ActivationCompressor, compress_activations
from .dual_precision import DivisionCodec
from .ledger import ByteLedger, LedgerEntry
from .methods import TrainingMethod, CodecMethod, build_method, method_names, register_method
from .packing import SUPPORTED_BITS, pack_bits, packed_nbytes, unpack_bits

__all__ = [
    "ActivationCodec", "Packed", "RawCodec", "SaveContext", "ActivationCompressor",
    "compress_activations", "DivisionCodec", "ByteLedger", "LedgerEntry", "TrainingMethod", "CodecMethod",
    "build_method", "method_names", "register_method", "SUPPORTED_BITS", "pack_bits",
    "packed_nbytes", "unpack_bits", "prepare_cuda_graph",
]
