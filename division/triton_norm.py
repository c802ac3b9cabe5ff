"""A training BatchNorm's forward fused into DIVISION's encode, and its backward computed from the
codes: no decoded input is ever written, and the input is read twice in all (as PyTorch's own
forward reads it) instead of twice more by a separate encode.

Forward (``batch_norm_forward``): the encode's two launches (division/triton_codec_kernels.py, NORM)
carry the BatchNorm. Phase 1, which reads x for the LFC and the HFC range, also writes per-channel
(count, mean, M2) of its chunk; ``_stats_kernel`` merges them (Chan et al.'s pairwise formula) into
the batch mean and inverse standard deviation and updates the running statistics; phase 2, which
reads x again to quantize it, writes ``y = (x - mean) * weight * invstd + bias``.

A BatchNorm's backward reads its input twice (the per-channel sums, then the input gradient). With
the input stored by DIVISION the step used to decode it first: a full-size tensor written once and
read twice. Here both passes rebuild each element in registers from what the fused encode stored
(division/triton_codec_kernels.py: channels_last maps with NHWC-ordered codes and an LFC in channels_last
memory), the value the decode would write (``lfc + (mn + code * step)`` rounded to the input's
dtype), so the gradients are those of the decode followed by PyTorch's backward, up to the order
of the sums.

Three launches, PyTorch's ``batch_norm_backward_reduce`` / ``_elemt`` formulas:
1. ``_reduce_kernel``: each program sums ``dy`` and ``dy * (x - mean)`` over a chunk of pixels for
   G channels and writes the two partial sums;
2. ``_coef_kernel``: per channel, the partial sums' totals, the weight's and bias's gradients
   (``sum(dy * (x - mean)) * invstd``, ``sum(dy)``) and the three coefficients of step 3;
3. ``_input_grad_kernel``: ``dx = (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean)))
   * invstd * weight``, written in channels_last memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_codec_kernels import _cast_out, _code_float
from .triton_plan import Plan, _sm_count
from .triton_launch import CachedLaunch, aligned, cdiv, interpreting, next_power_of_2

# Tunables (part of every launch key): pixels per tile (times G channels), warps per program,
# reduce programs per SM (each sums ``steps`` tiles), tiles per input-gradient program; whether
# the forward runs fused into the encode (``batch_norm_forward``).
TUNING = {"pixels": 16, "warps": 2, "reduce_programs_per_sm": 4, "grad_steps": 4, "fused_forward": True}


@triton.jit
def _tile(dy_ptr, codes_ptr, lfc_ptr, mn_ptr, step_ptr, mask_ptr, tile, c, M, C: tl.constexpr, W: tl.constexpr,
          HW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HB: tl.constexpr, WB: tl.constexpr,
          PB: tl.constexpr, Q: tl.constexpr, LEVELS: tl.constexpr, P: tl.constexpr, EXACT: tl.constexpr,
          MASKED: tl.constexpr):
    """Tile ``tile``: P pixels (global NHWC pixel index ``q`` [P, 1]) of channels ``c`` [1, G].
    Returns (q, live pixels, dy, x), dy and x in fp32; x is the decode's value, rounded to the
    input's dtype (``dy_ptr``'s) as the decode writes it. MASKED: a ReLU followed the BatchNorm
    (one bit per element in NHWC order at ``mask_ptr``): dy is the ReLU's input gradient, 0 where
    the bit is clear."""
    q = tile * P + tl.arange(0, P)[:, None]
    live = q < M
    dy = tl.load(dy_ptr + q * C + c, mask=live, other=0.0).to(tl.float32)
    if MASKED:
        bit = q * C + c
        byte = tl.load(mask_ptr + (bit >> 3), mask=live, other=0).to(tl.int32)
        dy = tl.where(((byte >> (bit & 7)) & 1) != 0, dy, 0.0)
    n = q // HW
    e = q - n * HW
    hh = e // W
    ww = e - hh * W
    lf = tl.load(lfc_ptr + ((n * HB + hh // KH) * WB + ww // KW) * C + c, mask=live, other=0.0).to(tl.float32)
    byte = tl.load(codes_ptr + (n * (HW // PB) + e // PB) * C + c, mask=live, other=0).to(tl.int32)
    code = (byte >> ((e % PB) * Q)) & LEVELS
    mn = tl.load(mn_ptr + n * C + c, mask=live, other=0.0).to(tl.float32)
    st = tl.load(step_ptr + n * C + c, mask=live, other=0.0).to(tl.float32)
    x = _cast_out(lf + (mn + _code_float(code) * st), dy_ptr, EXACT).to(tl.float32)
    return q, live, dy, x


@triton.jit(do_not_specialize=["M"])
def _reduce_kernel(dy_ptr, codes_ptr, lfc_ptr, mn_ptr, step_ptr, mask_ptr, mean_ptr, part_ptr, M,
                   C: tl.constexpr, W: tl.constexpr, HW: tl.constexpr, KH: tl.constexpr,
                   KW: tl.constexpr, HB: tl.constexpr, WB: tl.constexpr, PB: tl.constexpr,
                   Q: tl.constexpr, LEVELS: tl.constexpr, G: tl.constexpr, P: tl.constexpr,
                   STEPS: tl.constexpr, EXACT: tl.constexpr, MASKED: tl.constexpr):
    chunk = tl.program_id(0)
    cg = tl.arange(0, G) + tl.program_id(1) * G
    c = cg[None, :]
    mean = tl.load(mean_ptr + c)
    acc = tl.zeros([P, G], tl.float32)
    acc_x = tl.zeros([P, G], tl.float32)
    for t in range(STEPS):
        _, _, dy, x = _tile(dy_ptr, codes_ptr, lfc_ptr, mn_ptr, step_ptr, mask_ptr, chunk * STEPS + t, c, M, C,
                            W, HW, KH, KW, HB, WB, PB, Q, LEVELS, P, EXACT, MASKED)
        acc += dy
        acc_x += dy * (x - mean)
    part = part_ptr + chunk * 2 * C + cg
    tl.store(part, tl.sum(acc, axis=0))
    tl.store(part + C, tl.sum(acc_x, axis=0))


@triton.jit(do_not_specialize=["chunks", "M"])
def _coef_kernel(part_ptr, invstd_ptr, weight_ptr, coef_ptr, dw_ptr, db_ptr, chunks, M,
                 C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    cg = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cg < C
    s = tl.zeros([BLOCK_C], tl.float32)
    s_x = tl.zeros([BLOCK_C], tl.float32)
    for k0 in range(0, chunks, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)[:, None]
        m = (k < chunks) & cm[None, :]
        ptrs = part_ptr + k * 2 * C + cg[None, :]
        s += tl.sum(tl.load(ptrs, mask=m, other=0.0), axis=0)
        s_x += tl.sum(tl.load(ptrs + C, mask=m, other=0.0), axis=0)
    invstd = tl.load(invstd_ptr + cg, mask=cm, other=0.0)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cg, mask=cm, other=0.0).to(tl.float32)
        tl.store(dw_ptr + cg, s_x * invstd, mask=cm)
    else:
        w = 1.0
    tl.store(db_ptr + cg, s, mask=cm)
    count = M * 1.0
    tl.store(coef_ptr + cg, s / count, mask=cm)                                # mean(dy)
    tl.store(coef_ptr + C + cg, (s_x / count) * invstd * invstd, mask=cm)     # projection
    tl.store(coef_ptr + 2 * C + cg, invstd * w, mask=cm)                     # scale


@triton.jit(do_not_specialize=["M"])
def _input_grad_kernel(dy_ptr, codes_ptr, lfc_ptr, mn_ptr, step_ptr, mask_ptr, mean_ptr, coef_ptr, dx_ptr, M,
                       C: tl.constexpr, W: tl.constexpr, HW: tl.constexpr, KH: tl.constexpr,
                       KW: tl.constexpr, HB: tl.constexpr, WB: tl.constexpr, PB: tl.constexpr,
                       Q: tl.constexpr, LEVELS: tl.constexpr, G: tl.constexpr, P: tl.constexpr,
                       STEPS: tl.constexpr, EXACT: tl.constexpr, MASKED: tl.constexpr):
    chunk = tl.program_id(0)
    c = (tl.arange(0, G) + tl.program_id(1) * G)[None, :]
    mean = tl.load(mean_ptr + c)
    mean_dy = tl.load(coef_ptr + c)
    proj = tl.load(coef_ptr + C + c)
    scale = tl.load(coef_ptr + 2 * C + c)
    for t in range(STEPS):
        q, live, dy, x = _tile(dy_ptr, codes_ptr, lfc_ptr, mn_ptr, step_ptr, mask_ptr, chunk * STEPS + t, c, M,
                               C, W, HW, KH, KW, HB, WB, PB, Q, LEVELS, P, EXACT, MASKED)
        dx = (dy - mean_dy - (x - mean) * proj) * scale
        tl.store(dx_ptr + q * C + c, _cast_out(dx, dx_ptr, EXACT), mask=live)


@triton.jit(do_not_specialize=["rows", "momentum", "eps"])
def _stats_kernel(stats_ptr, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, mean_ptr, invstd_ptr, coef_ptr,
                  rows, momentum, eps, C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RUNNING: tl.constexpr,
                  BATCH_VAR: tl.constexpr):
    """Per channel: the chunks' (count, mean, M2) merged into the batch's, BLOCK_R chunks at a
    time; mean and invstd stored, the running statistics updated (the unbiased variance, as
    PyTorch does), and the forward's scale (weight * invstd) and bias. ``BATCH_VAR`` (without
    ``RUNNING``): the unbiased variance stored at ``rvar_ptr`` instead, for a caller that updates
    the running statistics itself (a compiled graph)."""
    cg = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cg < C
    # fp32, as a direct launch passes them: inductor's launch passes Python floats as fp64, and its
    # analysis of what the kernel writes traces it with them as Python floats (tl.cast takes both)
    eps = tl.cast(eps, tl.float32)
    momentum = tl.cast(momentum, tl.float32)
    cnt = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)[:, None]
        m = (r < rows) & cm[None, :]
        ptrs = stats_ptr + r * (3 * C) + cg[None, :]
        b_cnt = tl.load(ptrs, mask=m, other=0.0)
        b_mean = tl.load(ptrs + C, mask=m, other=0.0)
        t_cnt = tl.sum(b_cnt, axis=0)
        t_mean = tl.sum(b_cnt * b_mean, axis=0) / tl.maximum(t_cnt, 1.0)
        spread = b_mean - t_mean[None, :]
        t_m2 = tl.sum(tl.load(ptrs + 2 * C, mask=m, other=0.0) + b_cnt * spread * spread, axis=0)
        both = cnt + t_cnt
        frac = t_cnt / tl.maximum(both, 1.0)
        delta = t_mean - mean
        mean += delta * frac
        m2 += t_m2 + delta * delta * (cnt * frac)
        cnt = both
    var = m2 / tl.maximum(cnt, 1.0)
    invstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
    tl.store(mean_ptr + cg, mean, mask=cm)
    tl.store(invstd_ptr + cg, invstd, mask=cm)
    unbiased = m2 / tl.maximum(cnt - 1.0, 1.0)
    if BATCH_VAR:
        tl.store(rvar_ptr + cg, unbiased, mask=cm)
    if RUNNING:
        rm = tl.load(rmean_ptr + cg, mask=cm, other=0.0).to(tl.float32)
        rv = tl.load(rvar_ptr + cg, mask=cm, other=0.0).to(tl.float32)
        tl.store(rmean_ptr + cg, (momentum * mean + (1.0 - momentum) * rm).to(rmean_ptr.dtype.element_ty), mask=cm)
        tl.store(rvar_ptr + cg, (momentum * unbiased + (1.0 - momentum) * rv).to(rvar_ptr.dtype.element_ty), mask=cm)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + cg, mask=cm, other=0.0).to(tl.float32)
    tl.store(coef_ptr + cg, scale, mask=cm)
    if HAS_BIAS:
        tl.store(coef_ptr + C + cg, tl.load(bias_ptr + cg, mask=cm, other=0.0).to(tl.float32), mask=cm)
    else:
        tl.store(coef_ptr + C + cg, tl.zeros([BLOCK_C], tl.float32), mask=cm)


_STATS = CachedLaunch(_stats_kernel)
_REDUCE = CachedLaunch(_reduce_kernel)
_COEF = CachedLaunch(_coef_kernel)
_INPUT_GRAD = CachedLaunch(_input_grad_kernel)


def group_size(channels: int) -> Optional[int]:
    """Channels per program: the largest power of two up to 64 dividing C (at least 8), or None."""
    for g in (64, 32, 16, 8):
        if channels % g == 0:
            return g
    return None


def applies(plan: Optional[Plan]) -> bool:
    """Can the kernels read a Packed encoded under ``plan``: channels_last input with NHWC-ordered
    codes (whole-byte planes), 32-bit indices, a channel group."""
    return (plan is not None and plan.channels_last and plan.codes_cl and not plan.int64
            and group_size(plan.c) is not None)


def forward_applies(plan: Plan) -> bool:
    """Can ``batch_norm_forward`` run on an input of this plan? ``plan``: one ``applies`` accepted
    (``codec.norm_plan``'s), so only the forward's own condition is left: 4-D block-row tiles."""
    return TUNING["fused_forward"] and plan.mode == 0


def batch_norm_forward(codec, x: torch.Tensor, plan: Plan, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                       running_var: Optional[torch.Tensor], momentum: float, eps: float):
    """``torch.native_batch_norm(x, ..., training=True, ...)`` and ``codec.encode(x)`` in the
    encode's two launches (``forward_applies(plan)``, ``plan = codec.norm_plan(x)``). Returns
    (y, mean, invstd, x's Packed); the running statistics are updated in place."""
    from .triton_codec import FusedNorm
    n, c = plan.n, plan.c
    dev = x.device
    rows = n * plan.enc_split  # phase 1 writes row n * chunks + chunk
    stats = torch.empty((rows, 3, c), dtype=torch.float32, device=dev)
    mean = torch.empty(c, dtype=torch.float32, device=dev)
    invstd = torch.empty(c, dtype=torch.float32, device=dev)
    coef = torch.empty((2, c), dtype=torch.float32, device=dev)
    y = torch.empty_like(x, memory_format=torch.channels_last)

    def reduce() -> None:
        statistics_launch(stats, weight, bias, running_mean, running_var, mean, invstd, coef, rows, momentum, eps)

    tensors = codec._encode_kernel(x, plan, norm=FusedNorm(y, stats, mean, coef, reduce))
    return y, mean, invstd, codec.packed(x, plan, tensors)


def statistics_launch(stats, weight, bias, running_mean, running_var, mean, invstd, coef, rows: int,
                      momentum: float, eps: float, launch=None, batch_var=None) -> None:
    """``_stats_kernel`` between the fused encode's two phases: the chunks' ``stats`` ((rows, 3, C))
    merged into ``mean``, ``invstd`` and ``coef``, the running statistics (where given) updated.
    ``batch_var`` (without running statistics): C floats that take the batch's unbiased variance.
    ``launch(kernel, grid, args, constexprs, num_warps)``: how a compiled graph launches it
    (``division.compiled_ops``); None: the cached launch."""
    c = mean.shape[0]
    running = running_mean is not None and running_var is not None
    if running and batch_var is not None:
        raise ValueError("batch_var is for a caller without running statistics")
    block_c = min(16, next_power_of_2(c))
    var_out = running_var if running else batch_var if batch_var is not None else mean
    args = (stats, weight if weight is not None else mean, bias if bias is not None else mean,
            running_mean if running else mean, var_out, mean, invstd, coef,
            rows, float(momentum), float(eps))
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RUNNING=running,
                 BATCH_VAR=batch_var is not None)
    # (the parameters' and running statistics' dtypes and alignment are part of the compiled kernel)
    key = None if launch is not None else \
        (c, *flags.values(), *[(a.dtype, aligned(a)) for a in (weight, bias, running_mean, running_var)
                               if a is not None], mean.device.index)
    _run(_STATS, key, (cdiv(c, block_c),), args, dict(C=c, BLOCK_C=block_c, BLOCK_R=64, **flags), 4, launch)


def _run(cached: CachedLaunch, key, grid, args, constexprs, warps: int, launch=None) -> None:
    """One of this module's kernels: through its cached launch (``key``), or through a compiled
    graph's ``launch(kernel, grid, args, constexprs, num_warps)`` (no key: no data pointers while
    traced). ``constexprs``: a dict, or a function returning one."""
    if launch is None:
        cached.launch(key, grid, args, constexprs, warps)
    else:
        launch(cached.kernel, grid, args, constexprs() if callable(constexprs) else constexprs, warps)


def batch_norm_backward(dy: torch.Tensor, tensors: dict[str, torch.Tensor], plan: Plan,
                        weight: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
                        launch=None, relu_mask: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d weight, d bias) of a training-mode BatchNorm whose input DIVISION stored as
    ``tensors`` (``applies(plan)``); ``mean`` / ``invstd``: the forward's batch statistics.
    d weight is None without a weight. ``launch``: as in ``statistics_launch``. ``relu_mask``: a
    ReLU followed the BatchNorm (its mask, one bit per element in NHWC order): ``dy`` is the
    ReLU's output gradient, masked in the kernels' reads."""
    n, c, h, w = plan.n, plan.c, plan.h, plan.w
    dy = dy.contiguous(memory_format=torch.channels_last)
    dev = dy.device
    tun = tuple(TUNING.values())
    warps = TUNING["warps"]
    g = group_size(c)
    pixels = n * h * w
    tiles = cdiv(pixels, TUNING["pixels"])
    groups = c // g
    sms = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device()) \
        if dev.type == "cuda" else 1
    want = TUNING["reduce_programs_per_sm"] * sms
    steps = max(1, min(64, (tiles * groups) // max(1, want)))
    chunks = cdiv(tiles, steps)
    geometry = dict(C=c, W=w, HW=h * w, KH=plan.kh, KW=plan.kw, HB=plan.hb, WB=plan.wb, PB=plan.pb,
                    Q=plan.bits, LEVELS=2 ** plan.bits - 1, G=g, P=TUNING["pixels"], EXACT=interpreting(),
                    MASKED=relu_mask is not None)
    mask = relu_mask if relu_mask is not None else mean  # any pointer: read only when MASKED
    codes, lfc, mn, step = tensors["codes"], tensors["lfc"], tensors["mn"], tensors["step"]
    mean, invstd = mean.float().contiguous(), invstd.float().contiguous()
    part = torch.empty((chunks, 2, c), dtype=torch.float32, device=dev)
    dy_aligned = aligned(dy) if launch is None else None  # (no data pointer while a graph is traced)
    key = (plan, dy.dtype, steps, dy_aligned, dev.index, tun, relu_mask is not None)
    _run(_REDUCE, key, (chunks, groups), (dy, codes, lfc, mn, step, mask, mean, part, pixels),
         lambda: dict(geometry, STEPS=steps), warps, launch)

    coef = torch.empty((3, c), dtype=torch.float32, device=dev)
    db = torch.empty(c, dtype=torch.float32, device=dev)
    dw = torch.empty(c, dtype=weight.dtype, device=dev) if weight is not None else None
    block_c = min(16, next_power_of_2(c))  # many programs: each one's loop over chunks is latency-bound
    _run(_COEF, (c, weight is not None, None if weight is None else weight.dtype, dev.index),
         (cdiv(c, block_c),),
         (part, invstd, weight if weight is not None else invstd, coef, dw if dw is not None else db,
          db, chunks, pixels),
         dict(C=c, BLOCK_C=block_c, BLOCK_K=128, HAS_WEIGHT=weight is not None), 4, launch)

    # an NHWC buffer seen as (N, C, H, W) (channels_last): in a compiled graph, torch.empty_like with
    # a memory format gets a fill kernel of its own (division.compiled_ops._empty_maps)
    dx = torch.empty((n, h, w, c), dtype=dy.dtype, device=dev).permute(0, 3, 1, 2)
    grad_steps = TUNING["grad_steps"]
    _run(_INPUT_GRAD, (plan, dy.dtype, dy_aligned, dev.index, tun, relu_mask is not None),
         (cdiv(tiles, grad_steps), groups), (dy, codes, lfc, mn, step, mask, mean, coef, dx, pixels),
         lambda: dict(geometry, STEPS=grad_steps), warps, launch)
    return dx, dw, db
