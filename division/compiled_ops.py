"""DIVISION's fused GPU encode and decode as ``torch.library`` custom ops, for compiled graphs.

Under ``torch.compile`` the compressing layers (``division.compiled``) can write their codec in
two ways. As tensor ops (``TensorCodec`` with ``fused=False``), inductor generates the kernels: it
fuses them with the layer around them, but the codec's per-plane reductions, bit packing and
dither become a few dozen generated kernels per layer, which were slow to compile and slow to
run on ResNet-50. As the two ops below (``fused=True``), the compiled graph calls the same fused
Triton kernels that eager DIVISION runs (``division.triton_codec``): one encode (two launches
for the largest maps) and one decode per activation, opaque to inductor, with a fake
implementation that tells the compiler each output's shape, dtype and layout.

The encode draws its seed on the host at every call, as eager DIVISION does, so the op is not a
pure function of its input; the compiler's common-subexpression pass may still merge two encodes
of one tensor (a ResNet block's input read by conv1 and by the downsample convolution), which is
what the eager path's cache does as well. Inside a CUDA graph (``mode="reduce-overhead"``) a
host seed would be frozen at capture; the kernel then mixes in a device counter that the graph
advances at every replay (``triton_codec.graph_seed_counter``), made here before any capture.

``encode_reference`` wraps the tensor-op codec (``compiled.TensorCodec.encode_tensors``) the same
way, for the CPU and for shapes the kernels have no plan for: as one opaque op, its outputs are
what the compiled graph keeps (see its docstring).

``applies`` says, at trace time, whether a tensor takes these ops (a CUDA tensor the fused kernels
have a plan for, or any tensor while Triton's interpreter runs, which is how the CPU tests run
them); everything else keeps the tensor-op codec.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch.library import custom_op

from .packing import packed_nbytes


@lru_cache(maxsize=None)
def _codec(block_size: int, bits: int, stochastic: bool):
    from .triton_codec import TritonDivisionCodec
    return TritonDivisionCodec(block_size=block_size, bits=bits,
                               rounding="stochastic" if stochastic else "nearest")


def _plan(x: torch.Tensor, block_size: int, bits: int, stochastic: bool):
    """(codec, plan, x as the maps its plan codes) or (codec, None, None)."""
    codec = _codec(block_size, bits, stochastic)
    plan, maps, channels_last = codec._plan_of(x)
    if plan is not None and channels_last and not plan.channels_last:
        maps = maps.contiguous()  # a narrow channels_last map is coded from its NCHW copy
    return codec, plan, maps


def applies(x: torch.Tensor, block_size: int, bits: int, stochastic: bool) -> bool:
    """Can ``encode`` code x with the fused kernels? Decided at trace time from x's shape, strides,
    dtype and device; a graph with dynamic shapes keeps the tensor-op codec (its plans are per shape)."""
    shape = tuple(x.shape)
    if not all(type(size) is int for size in shape):
        return False
    return _has_plan(shape, tuple(x.stride()), x.dtype, str(x.device), block_size, bits, stochastic)


@torch.compiler.assume_constant_result
def _has_plan(shape, stride, dtype, device, block_size, bits, stochastic) -> bool:
    """``applies`` on plain values, run once at trace time (not traced): the plan lookup is host code."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from .triton_launch import interpreting
    device = torch.device(device)
    if not (device.type == "cuda" or (interpreting() and device.type == "cpu")):
        return False
    codec = _codec(block_size, bits, stochastic)
    maps, channels_last = codec._as_maps(torch.empty_strided(shape, stride, dtype=dtype, device="meta"))
    return maps is not None and codec._fast() and \
        codec.plan_for(tuple(maps.shape), dtype, channels_last, device) is not None


@custom_op("division::encode", mutates_args=())
def encode(x: torch.Tensor, block_size: int, bits: int, stochastic: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x's (lfc, codes, mn, step), as ``TritonDivisionCodec.encode`` writes them."""
    codec, plan, maps = _plan(x, block_size, bits, stochastic)
    if plan is None:
        raise RuntimeError(f"division::encode has no fused plan for {tuple(x.shape)} {x.dtype}: "
                           "check division.compiled_ops.applies before tracing it")
    if x.is_cuda and not torch.cuda.is_current_stream_capturing():
        from .triton_codec import prepare_graph_capture
        prepare_graph_capture(x.device)  # before any capture: a captured encode reads its counter
    t = codec._encode_kernel(maps, plan)
    return t["lfc"], t["codes"], t["mn"], t["step"]


@encode.register_fake
def _encode_fake(x, block_size, bits, stochastic):
    from .triton_plan import _lfc_format
    _, plan, _ = _plan(x, block_size, bits, stochastic)
    n, c = plan.n, plan.c
    lfc = torch.empty((n, c, plan.hb, plan.wb), dtype=torch.bfloat16, device=x.device,
                      memory_format=_lfc_format(plan))
    codes = x.new_empty((packed_nbytes(n * c * plan.h * plan.w, plan.bits),), dtype=torch.uint8)
    return lfc, codes, x.new_empty((n, c), dtype=torch.bfloat16), x.new_empty((n, c), dtype=torch.bfloat16)


def _decode_plan(shape, dtype, channels_last: bool, block_size: int, bits: int, device):
    codec = _codec(block_size, bits, True)  # the plan does not depend on the rounding
    geom = codec.geometry(shape, dtype)
    return codec, codec.plan_for((geom.n, geom.c, geom.h, geom.w), dtype, channels_last, device)


@custom_op("division::decode", mutates_args=())
def decode(lfc: torch.Tensor, codes: torch.Tensor, mn: torch.Tensor, step: torch.Tensor,
           shape: list[int], dtype: torch.dtype, channels_last: bool, block_size: int, bits: int
           ) -> torch.Tensor:
    """The activation of ``shape`` and ``dtype`` (channels_last or contiguous) rebuilt from ``encode``'s outputs."""
    codec, plan = _decode_plan(shape, dtype, channels_last, block_size, bits, codes.device)
    t = {"lfc": lfc, "codes": codes, "mn": mn, "step": step}
    out = codec._decode_kernel(t, dtype, plan).view(shape)
    if channels_last and not plan.channels_last:
        out = out.contiguous(memory_format=torch.channels_last)  # a narrow map's NCHW decode
    return out


@decode.register_fake
def _decode_fake(lfc, codes, mn, step, shape, dtype, channels_last, block_size, bits):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=codes.device, memory_format=fmt)


@custom_op("division::encode_reference", mutates_args=())
def encode_reference(x: torch.Tensor, block_size: int, bits: int, rounding: str, keep_lfc: bool,
                     keep_hfc: bool) -> list[torch.Tensor]:
    """DIVISION's reference encode (``TensorCodec.encode_tensors``: tensor ops) as one opaque op.

    Seen op by op, the compiler's partitioner may keep a full-size activation and redo its encodes
    in backward (it did for a LayerNorm input read by a convolution: one fp32 map kept instead of
    two sets of codes), which defeats the point; an opaque op's outputs are what is saved. Its
    fake implementation is the same tensor ops on fake tensors."""
    from .compiled import TensorCodec
    return list(TensorCodec(block_size, bits, rounding, keep_lfc, keep_hfc).encode_tensors(x))


@encode_reference.register_fake
def _encode_reference_fake(x, block_size, bits, rounding, keep_lfc, keep_hfc):
    from .compiled import TensorCodec
    return list(TensorCodec(block_size, bits, rounding, keep_lfc, keep_hfc).encode_tensors(x))
