"""DIVISION's fused GPU encode and decode as ops of compiled graphs.

Under ``torch.compile`` the compressing layers (``division.compiled``) can write their codec in
two ways. As tensor ops (``TensorCodec`` with ``fused=False``), inductor generates the kernels: it
fuses them with the layer around them, but the codec's per-plane reductions, bit packing and
dither become a few dozen generated kernels per layer, which were slow to compile and slow to
run on ResNet-50. As the ops below (``fused=True``), the compiled graph runs the same fused
Triton kernels that eager DIVISION runs (``division.triton_codec``): one encode (two launches
for the largest maps) and one decode per activation.

``encode`` and ``decode`` are ``torch.library.triton_op``s: inductor sees each kernel launch
(``wrap_triton``) and calls the kernel from its generated code, as it calls its own kernels. As
Python custom ops (an earlier version) every call went through the dispatcher and this module's
Python, about 320 calls per ResNet-50 step. Under Triton's interpreter (the CPU tests) the
compiler cannot record a launch, so the same code runs as opaque custom ops (``encode_opaque``,
``decode_opaque``); ``fused_encode`` / ``fused_decode`` pick the op.

Stochastic rounding draws with ``RNG_DATA``: the hash of each code byte's position is keyed by
the bits of the values being rounded, not by a host seed. The encode is then a pure function of
its input: a host seed inside a compiled graph (or a CUDA graph, ``mode="reduce-overhead"``)
would be frozen at trace time. The draws change whenever the activations do (every step); the
tensor-op codec's ``hash_dither`` makes the same trade.

Two encodes of one tensor are not merged by the compiler: traced through, each ``triton_op``
encode allocates its outputs with ``aten.empty``, which the common-subexpression pass never merges
(and must not, see ``_empty_maps``); the CPU's opaque ``encode_reference`` is merged. So a tensor
two convolutions read (a ResNet block's input, read by conv1 and by the downsample convolution) is
encoded once by the traced code itself (``division.compiled_rebuild``, ``share_conv_inputs``).
Before that, a GPU encoded and kept such a tensor twice (compiled ResNet-50: the first block of
each stage, 59.5 MB more than eager DIVISION at batch 128, fp32; docs/results.md, records h200-r8).

``norm_encode`` / ``norm_backward`` (``method.fused_norm``, ``TensorCodec(fused_norm=True)``;
experimental): a training BatchNorm on a channels_last map carried by its input's encode
(statistics, output and, with ``relu``, the ReLU after it and its mask), and its backward from the
codes (``division.triton_norm``'s kernels, which eager DIVISION runs too).
``decode_affine``: a decode through a per-channel affine map and a ReLU mask, a rebuilt convolution
input (``division.compiled_rebuild``) in one kernel.

``encode_reference`` wraps the tensor-op codec (``compiled.TensorCodec.encode_tensors``) as one
opaque op, for the CPU and for shapes the kernels have no plan for: its outputs are what the
compiled graph keeps (see its docstring).

``applies`` says, at trace time, whether a tensor takes the fused ops (a CUDA tensor the fused
kernels have a plan for, or any tensor while Triton's interpreter runs, which is how the CPU tests
run them); everything else keeps the tensor-op codec.
"""
from __future__ import annotations

import operator
from functools import lru_cache
from typing import Optional

import torch
from torch.library import custom_op, triton_op, wrap_triton

from .packing import packed_nbytes
from .triton_launch import interpreting


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
    dtype and device.

    The kernels' plans are per shape, so the sizes are made static here. A plain
    ``torch.compile(model)`` re-traces with symbolic sizes at the second batch size it sees
    (automatic dynamic shapes), and inside Dynamo a symbolic size passes for an int (``type(s) is
    int`` holds). ``operator.index`` specializes it instead (a guard on its value): each batch size
    gets its own graph with the fused kernels, as ``dynamic=False`` gives, where a symbolic size
    broke the graph at the plan lookup (and failed in tracing on a GPU)."""
    shape = tuple(operator.index(size) for size in x.shape)
    stride = tuple(operator.index(step) for step in x.stride())
    return _has_plan(shape, stride, x.dtype, str(x.device), block_size, bits, stochastic)


@torch.compiler.assume_constant_result
def _has_plan(shape, stride, dtype, device, block_size, bits, stochastic) -> bool:
    """``applies`` on plain values, run once at trace time (not traced): the plan lookup is host code."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from .triton_codec import sample_strided
    from .triton_launch import interpreting
    device = torch.device(device)
    if not (device.type == "cuda" or (interpreting() and device.type == "cpu")):
        return False
    codec = _codec(block_size, bits, stochastic)
    maps, channels_last = codec._as_maps(torch.empty_strided(shape, stride, dtype=dtype, device="meta"))
    # a sample-strided map (a token grid read in place, eager only) is left to the tensor-op codec
    # here: the compiled layers hand the ops dense maps (division.layouts.split_maps)
    return maps is not None and not sample_strided(maps) and codec._fast() and \
        codec.plan_for(tuple(maps.shape), dtype, channels_last, device) is not None


def _encode_into(x: torch.Tensor, block_size: int, bits: int, stochastic: bool, launch, norm=None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x's (lfc, codes, mn, step) as ``TritonDivisionCodec.encode`` writes them, with stochastic
    rounding drawn by ``RNG_DATA`` (no host seed: a pure function of x, see the module docstring).
    ``launch(kernel, grid, args, constexprs, num_warps)`` runs each kernel (or nothing: fake).
    ``norm``: a BatchNorm carried by the two phases (``_norm_encode_into``): a function of the plan
    that allocates its tensors and returns (the kernel's NORM mode, its mask-word, output,
    statistics, mean and coefficient tensors, a function launched between the phases)."""
    from .triton_codec_kernels import _encode_kernel
    from .triton_plan import RNG_DATA
    x = _specialized(x)
    _, plan, maps = _plan(x, block_size, bits, stochastic)
    if plan is None:
        raise RuntimeError(f"division::encode has no fused plan for {tuple(x.shape)} {x.dtype}: "
                           "check division.compiled_ops.applies before tracing it")
    n, c = plan.n, plan.c
    lfc = _empty_maps((n, c, plan.hb, plan.wb), torch.bfloat16, x.device, plan.channels_last)
    codes = x.new_empty((packed_nbytes(n * c * plan.h * plan.w, plan.bits),), dtype=torch.uint8)
    mn = x.new_empty((n, c), dtype=torch.bfloat16)
    step = x.new_empty((n, c), dtype=torch.bfloat16)
    phases = plan.encode_phases if norm is None else (1, 2)  # the statistics come between
    # split planes: each chunk's HFC (min, max), written by phase 1 and reduced by phase 2
    part = x.new_empty((n * c * plan.enc_split * 2,), dtype=torch.float32) if len(phases) > 1 else step
    # unused pointers (seed counter, ReLU mask words, BatchNorm tensors) get any tensor: step
    mode, words, *norm_args, between = (0, step, step, step, step, step, None) if norm is None else norm(plan)
    for phase in phases:
        launch(_encode_kernel, plan.encode_grid,
               (maps, lfc, codes, mn, step, part, step, words, *norm_args, 0, c, c // plan.g,
                c * plan.h * plan.w),  # dense maps only (applies): one sample after the other
               dict(STOCHASTIC=stochastic, RNG=RNG_DATA, SEED_PTR=False, FMA_Q=stochastic and plan.fma_q,
                    PACK_MASK=False, NORM=mode, **plan.encode_constexprs(phase)),
               plan.enc_warps)
        if phase == 1 and between is not None:
            between()
    return lfc, codes, mn, step


def _decode_plan(shape, dtype, channels_last, block_size, bits, device):
    codec = _codec(block_size, bits, True)  # the plan does not depend on the rounding
    geom = codec.geometry(shape, dtype)
    return codec.plan_for((geom.n, geom.c, geom.h, geom.w), dtype, channels_last, device)


def _decode_into(lfc, codes, mn, step, shape, dtype, channels_last, block_size, bits, launch,
                 scale=None, shift=None, mask=None) -> torch.Tensor:
    """The activation of ``shape`` and ``dtype`` (channels_last or contiguous) rebuilt from
    ``_encode_into``'s outputs; ``launch`` as there. With ``scale`` and ``shift`` (fp32, one per
    channel) the decoded values go through ``val * scale + shift``, and with ``mask`` (a ReLU's
    bits in the output's storage order) take its zeros: a BatchNorm's (and ReLU's) output rebuilt
    from its input's codes in the one kernel (``affine_applies`` says where)."""
    from .triton_codec_kernels import _decode_kernel
    from .triton_plan import _mask_argument
    shape = [int(size) for size in shape]  # symbolic sizes, as in _specialized
    plan = _decode_plan(shape, dtype, channels_last, block_size, bits, codes.device)
    out = _empty_maps((plan.n, plan.c, plan.h, plan.w), dtype, codes.device, plan.channels_last)
    mask_mode, mask_arg = _mask_argument(mask, plan)
    affine = scale is not None
    launch(_decode_kernel, plan.decode_grid,
           (codes, lfc, mn, step, out, out if mask_arg is None else mask_arg, scale if affine else out,
            shift if affine else out, plan.c, plan.c // plan.g, plan.c * plan.h * plan.w),
           dict(plan.decode_constexprs(), MASK=mask_mode, TINY=float(torch.finfo(dtype).tiny), AFFINE=affine),
           plan.dec_warps)
    out = out.view(shape)
    if channels_last and not plan.channels_last:
        out = out.contiguous(memory_format=torch.channels_last)  # a narrow map's NCHW decode
    return out


def _norm_encode_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, block_size: int,
                      bits: int, stochastic: bool, relu: bool, launch) -> tuple[torch.Tensor, ...]:
    """A training BatchNorm's forward carried by the encode of its input x (``triton_norm``: phase 1
    also writes per-chunk statistics, ``_stats_kernel`` merges them, phase 2 also writes the
    output): (y as an (N, H, W, C) tensor (its NHWC buffer), mean, invstd, the batch's unbiased
    variance (for the running statistics, which the caller updates), the ReLU's mask, then x's lfc,
    codes, mn, step as ``_encode_into`` writes them). ``relu``: a ReLU follows, y is its output
    and the mask (one bit per element, NHWC order) its ``y > 0``; else the mask is empty. x is
    read twice in all, as a BatchNorm's own forward reads it, where the BatchNorm and a separate
    encode read it three or four times.
    ``norm_applies`` says where."""
    from .triton_norm import statistics_launch
    from .triton_plan import _MASK_WORDS
    made = {}

    def norm(plan):
        n, c, h, w = plan.n, plan.c, plan.h, plan.w
        rows = n * plan.enc_split  # phase 1 writes row n * chunks + chunk
        stats = x.new_empty((rows, 3, c), dtype=torch.float32)
        mean = x.new_empty((c,), dtype=torch.float32)
        invstd = x.new_empty((c,), dtype=torch.float32)
        coef = x.new_empty((2, c), dtype=torch.float32)
        # the batch's unbiased variance, for the caller's running-statistics update: written by the
        # kernel alone (not a momentum-1 update of zero-filled buffers: a fill kernel each, on a GPU)
        batch_var = x.new_empty((c,), dtype=torch.float32)
        # y in NHWC order and shape: not a view (a channels_last (N, C, H, W) map is one, a
        # permutation of its NHWC buffer), since the caller's autograd function returns it and
        # an in-place op on a view that a custom function returned is refused (a residual's
        # ``out += identity`` after the block's last BatchNorm)
        y = x.new_empty((n, h, w, c))
        mask = x.new_empty((packed_nbytes(n * c * h * w, 1) if relu else 0,), dtype=torch.uint8)
        made.update(y=y, mean=mean, invstd=invstd, var=batch_var, mask=mask)

        def between():
            statistics_launch(stats, weight, bias, None, None, mean, invstd, coef, rows, 1.0, eps,
                              launch=launch, batch_var=batch_var)
        words = mask.view(_MASK_WORDS[plan.g]) if relu else mean  # (mean: any pointer, unread)
        return 2 if relu else 1, words, y, stats, mean, coef, between

    encoded = _encode_into(x, block_size, bits, stochastic, launch, norm)
    return (made["y"], made["mean"], made["invstd"], made["var"], made["mask"], *encoded)


def _norm_backward_into(dy, lfc, codes, mn, step, mask, weight, mean, invstd, shape, block_size, bits, launch
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d weight, d bias) of the BatchNorm whose input ``_norm_encode_into`` coded, computed from
    the codes (``triton_norm.batch_norm_backward``: no decoded input written); d bias in fp32.
    ``mask``: the ReLU's, where one followed (dy is then the ReLU's output gradient), else None."""
    from .triton_norm import batch_norm_backward
    shape = [int(size) for size in shape]
    plan = _decode_plan(shape, dy.dtype, True, block_size, bits, codes.device)
    tensors = {"lfc": lfc, "codes": codes, "mn": mn, "step": step}
    return batch_norm_backward(dy, tensors, plan, weight, mean, invstd, launch=launch, relu_mask=mask)


def _specialized(x: torch.Tensor) -> torch.Tensor:
    """x with plain int sizes and strides. After ``applies`` has specialized a symbolic graph's
    sizes, the op's fake run in tracing still gets them as ``SymInt`` objects (fixed in value, but
    no plan lookup can hash them); ``int()`` reads each one's value."""
    if all(type(size) is int for size in (*x.shape, *x.stride())):
        return x
    return x.as_strided([int(size) for size in x.shape], [int(step) for step in x.stride()],
                        int(x.storage_offset()))


def _empty_maps(shape: tuple[int, int, int, int], dtype: torch.dtype, device, channels_last: bool
                ) -> torch.Tensor:
    """An uninitialised (N, C, H, W) buffer for a kernel to fill, channels_last or contiguous: a
    contiguous ``torch.empty`` (an NHWC one, seen through a permutation, for channels_last).

    Both other ways cost memory or time in compiled graphs. ``torch.empty(...,
    memory_format=channels_last)`` got a kernel of its own in inductor's code that wrote NaN over
    all of the buffer before the op filled it (before every channels_last LFC and every decoded
    activation of compiled ResNet-50: the ``triton_poi_fused_empty_*`` kernels of its profile).
    ``torch.empty_strided`` has no such kernel, but torch 2.11's common-subexpression pass merges
    equal ``empty_strided`` calls (``aten.empty`` it leaves alone; 2.14 spares buffers that a kernel
    writes): every decode of one shape then wrote into a copy of one shared buffer, and inductor
    made all those copies in one kernel at the start of backward, so all the decoded activations of
    that shape were alive at once (on an H100 a compiled network's backward peaked at 0.56 of plain
    training's instead of decoding one activation at a time). tests/test_compiled_ops.py"""
    n, c, h, w = shape
    if channels_last:
        return torch.empty((n, h, w, c), dtype=dtype, device=device).permute(0, 3, 1, 2)
    return torch.empty(shape, dtype=dtype, device=device)


def _traced_launch(kernel, grid, args, constexprs, num_warps) -> None:
    """Inside ``triton_op``: the compiler records the launch and calls the kernel from its own code."""
    wrap_triton(kernel)[grid](*args, **constexprs, num_warps=num_warps)


def _direct_launch(kernel, grid, args, constexprs, num_warps) -> None:
    kernel[grid](*args, **constexprs, num_warps=num_warps)


def _no_launch(*_) -> None:
    """Fake tensors: the outputs' shapes, dtypes and layouts, nothing run."""


def _encode_op(launch):
    def encode(x: torch.Tensor, block_size: int, bits: int, stochastic: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _encode_into(x, block_size, bits, stochastic, launch)
    return encode


def _decode_op(launch):
    def decode(lfc: torch.Tensor, codes: torch.Tensor, mn: torch.Tensor, step: torch.Tensor,
               shape: list[int], dtype: torch.dtype, channels_last: bool, block_size: int, bits: int
               ) -> torch.Tensor:
        return _decode_into(lfc, codes, mn, step, shape, dtype, channels_last, block_size, bits, launch)
    return decode


def _decode_affine_op(launch):
    def decode_affine(lfc: torch.Tensor, codes: torch.Tensor, mn: torch.Tensor, step: torch.Tensor,
                      scale: torch.Tensor, shift: torch.Tensor, mask: Optional[torch.Tensor], shape: list[int],
                      dtype: torch.dtype, channels_last: bool, block_size: int, bits: int) -> torch.Tensor:
        return _decode_into(lfc, codes, mn, step, shape, dtype, channels_last, block_size, bits, launch,
                            scale, shift, mask)
    return decode_affine


def _norm_encode_op(launch):
    def norm_encode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, block_size: int,
                    bits: int, stochastic: bool, relu: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor, torch.Tensor, torch.Tensor]:
        return _norm_encode_into(x, weight, bias, eps, block_size, bits, stochastic, relu, launch)
    return norm_encode


def _norm_backward_op(launch):
    def norm_backward(dy: torch.Tensor, lfc: torch.Tensor, codes: torch.Tensor, mn: torch.Tensor, step: torch.Tensor,
                      mask: Optional[torch.Tensor], weight: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                      shape: list[int], block_size: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _norm_backward_into(dy, lfc, codes, mn, step, mask, weight, mean, invstd, shape, block_size, bits,
                                   launch)
    return norm_backward


# x's (lfc, codes, mn, step), and the activation rebuilt from them: launched from inductor's code
encode = triton_op("division::encode", mutates_args=())(_encode_op(_traced_launch))
decode = triton_op("division::decode", mutates_args=())(_decode_op(_traced_launch))
decode_affine = triton_op("division::decode_affine", mutates_args=())(_decode_affine_op(_traced_launch))
# the same as opaque ops: under Triton's interpreter (the CPU tests), whose kernels the compiler
# cannot record (``wrap_triton`` takes compiled kernels only)
encode_opaque = custom_op("division::encode_opaque", mutates_args=())(_encode_op(_direct_launch))
decode_opaque = custom_op("division::decode_opaque", mutates_args=())(_decode_op(_direct_launch))
decode_affine_opaque = custom_op("division::decode_affine_opaque", mutates_args=())(_decode_affine_op(_direct_launch))
# a training BatchNorm's forward in its input's encode, and its backward from those codes
norm_encode = triton_op("division::norm_encode", mutates_args=())(_norm_encode_op(_traced_launch))
norm_backward = triton_op("division::norm_backward", mutates_args=())(_norm_backward_op(_traced_launch))
norm_encode_opaque = custom_op("division::norm_encode_opaque", mutates_args=())(_norm_encode_op(_direct_launch))
norm_backward_opaque = custom_op("division::norm_backward_opaque", mutates_args=())(_norm_backward_op(_direct_launch))
norm_encode_opaque.register_fake(_norm_encode_op(_no_launch))
norm_backward_opaque.register_fake(_norm_backward_op(_no_launch))
encode_opaque.register_fake(_encode_op(_no_launch))
decode_opaque.register_fake(_decode_op(_no_launch))
decode_affine_opaque.register_fake(_decode_affine_op(_no_launch))


def fused_encode(x: torch.Tensor, block_size: int, bits: int, stochastic: bool):
    """The encode op for this process: ``encode``, or ``encode_opaque`` under the interpreter."""
    op = torch.ops.division.encode_opaque if interpreting() else torch.ops.division.encode
    return op(x, block_size, bits, stochastic)


def fused_decode(lfc, codes, mn, step, shape: list[int], dtype: torch.dtype, channels_last: bool,
                 block_size: int, bits: int) -> torch.Tensor:
    """The decode op for this process (see ``fused_encode``)."""
    op = torch.ops.division.decode_opaque if interpreting() else torch.ops.division.decode
    return op(lfc, codes, mn, step, shape, dtype, channels_last, block_size, bits)


def affine_applies(shape, dtype: torch.dtype, channels_last: bool, mask_channels_last: Optional[bool],
                   block_size: int, bits: int, device) -> bool:
    """Can ``fused_decode_affine`` rebuild this output (codes of the fused encode)? Its plan must
    write the output in the layout the mask's bits follow (``mask_channels_last``, None without a
    mask): a narrow channels_last map is decoded in NCHW order, and its NHWC mask is then applied
    by tensor ops instead."""
    return _affine_plan_fits(tuple(int(size) for size in shape), dtype, channels_last, mask_channels_last,
                             block_size, bits, str(device))


@torch.compiler.assume_constant_result
def _affine_plan_fits(shape, dtype, channels_last, mask_channels_last, block_size, bits, device) -> bool:
    """``affine_applies`` on plain values, run once at trace time (host code, not traced)."""
    plan = _decode_plan(list(shape), dtype, channels_last, block_size, bits, torch.device(device))
    return plan is not None and plan.channels_last == channels_last and \
        (mask_channels_last is None or mask_channels_last == plan.channels_last)


def fused_decode_affine(lfc, codes, mn, step, scale: torch.Tensor, shift: torch.Tensor,
                        mask: Optional[torch.Tensor], shape: list[int], dtype: torch.dtype, channels_last: bool,
                        block_size: int, bits: int) -> torch.Tensor:
    """The decode-affine op for this process (see ``fused_encode``)."""
    op = torch.ops.division.decode_affine_opaque if interpreting() else torch.ops.division.decode_affine
    return op(lfc, codes, mn, step, scale, shift, mask, shape, dtype, channels_last, block_size, bits)


def norm_applies(x: torch.Tensor, block_size: int, bits: int, stochastic: bool) -> bool:
    """Can ``fused_norm_encode`` run a BatchNorm on x: a channels_last map whose fused plan stores
    NHWC-ordered codes in 4-D block-row tiles, with a channel group (``triton_norm``)? Decided at
    trace time, as ``applies``."""
    if x.dim() != 4 or not applies(x, block_size, bits, stochastic):
        return False
    shape = tuple(operator.index(size) for size in x.shape)
    stride = tuple(operator.index(step) for step in x.stride())
    return _norm_plan_fits(shape, stride, x.dtype, str(x.device), block_size, bits, stochastic)


@torch.compiler.assume_constant_result
def _norm_plan_fits(shape, stride, dtype, device, block_size, bits, stochastic) -> bool:
    from . import triton_norm
    x = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    if not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
        return False
    plan = _codec(block_size, bits, stochastic).plan_for(shape, dtype, True, torch.device(device))
    return triton_norm.applies(plan) and triton_norm.forward_applies(plan)


def mask_words_fit(x: torch.Tensor, block_size: int, bits: int, stochastic: bool) -> bool:
    """Can ``fused_norm_encode`` (where ``norm_applies``) also apply the ReLU after the BatchNorm:
    does x's plan store one mask word per pixel (programs of 8 to 64 channels)?"""
    shape = tuple(operator.index(size) for size in x.shape)
    return _mask_words_fit(shape, x.dtype, str(x.device), block_size, bits, stochastic)


@torch.compiler.assume_constant_result
def _mask_words_fit(shape, dtype, device, block_size, bits, stochastic) -> bool:
    from .triton_plan import _MASK_WORDS
    plan = _codec(block_size, bits, stochastic).plan_for(shape, dtype, True, torch.device(device))
    return plan.g in _MASK_WORDS


def fused_norm_encode(x, weight, bias, eps: float, block_size: int, bits: int, stochastic: bool, relu: bool):
    """The BatchNorm-and-encode op for this process (see ``fused_encode``)."""
    op = torch.ops.division.norm_encode_opaque if interpreting() else torch.ops.division.norm_encode
    return op(x, weight, bias, eps, block_size, bits, stochastic, relu)


def fused_norm_backward(dy, lfc, codes, mn, step, mask, weight, mean, invstd, shape: list[int], block_size: int,
                        bits: int):
    """The BatchNorm backward op for this process (see ``fused_encode``)."""
    op = torch.ops.division.norm_backward_opaque if interpreting() else torch.ops.division.norm_backward
    return op(dy, lfc, codes, mn, step, mask, weight, mean, invstd, shape, block_size, bits)


@custom_op("division::encode_reference", mutates_args=())
def encode_reference(x: torch.Tensor, block_size: int, bits: int, rounding: str, keep_lfc: bool,
                     keep_hfc: bool) -> list[torch.Tensor]:
    """DIVISION's reference encode (``TensorCodec.encode_tensors``: tensor ops) as one opaque op.

    Seen op by op, the compiler's partitioner may keep a full-size activation and redo its encodes
    in backward (it did for a LayerNorm input read by a convolution: one fp32 map kept instead of
    two sets of codes), which defeats the point; an opaque op's outputs are what is saved."""
    from .compiled import TensorCodec
    return list(TensorCodec(block_size, bits, rounding, keep_lfc, keep_hfc).encode_tensors(x))


@encode_reference.register_fake
def _encode_reference_fake(x, block_size, bits, rounding, keep_lfc, keep_hfc):
    """The outputs' shapes and dtypes (``TensorCodec.stored_shapes``; contiguous, as the ops give
    them), not the codec's few dozen tensor ops run on fake tensors, which tracing spent much of
    its time on."""
    from .compiled import TensorCodec
    from .dual_precision import canonical_geometry
    codec = TensorCodec(block_size, bits, rounding, keep_lfc, keep_hfc)
    return [x.new_empty(size, dtype=dtype)
            for size, dtype in codec.stored_shapes(canonical_geometry(x.shape, x.dtype, block_size))]
