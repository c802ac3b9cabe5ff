"""mode=speed: images per second of full training steps on a fixed batch already on the device.

The step is ``mode=train``'s (forward and loss under the same autocast, zero_grad, backward through
the GradScaler, optimizer step, ``method.after_step``), built by the memory runner's ``build_bench``
without a byte ledger, so no bookkeeping is timed. ``speed.warmup`` steps run untimed (cuDNN
algorithm choice, allocator caches, optimizer state), then each of ``speed.steps`` steps is timed on
its own: between CUDA events on the GPU (the GPU's time, idle gaps waiting for the host included),
with ``time.perf_counter`` on CPU. The median step gives ``images_per_sec``. With ``cuda_graph=true``
forward and backward are replayed from a CUDA graph (``runners.graph_step``; the optimizer step stays
eager), captured during the warm-up, which then lasts at least ``WARMUP_STEPS + 1`` steps. With
``speed.queue`` the run waits after its warm-up until the runs started beside it are warm and no
other is timed (``runners.speed_queue``), then takes one more untimed step before its timed ones.

Under torchrun the timed steps run in DDP (gradients all-reduced), each rank timing its own GPU:
``images_per_sec`` is the aggregate, the sum over ranks of ``batch_size / median step``, and
``images_per_sec_per_gpu`` and the step times are rank 0's (the two are equal in one process).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from . import distributed
from .graph_step import WARMUP_STEPS, CudaGraphError, GraphedStep
from .build import build_method
from .memory import Bench, build_bench, train_step
from .speed_queue import leaving_on_failure, timing_turn

log = logging.getLogger(__name__)


def run(cfg, env) -> dict[str, Any]:
    device = env.device
    cfg = eager_unless_capturable(cfg)
    step_ms = time_steps(cfg, device)  # out of memory: the job records "oom" and frees the GPU
    median = percentile(step_ms, 0.5)
    per_gpu = int(cfg.batch_size) / (median / 1000.0)
    fields = {
        "images_per_sec": distributed.sum_over_ranks(per_gpu)[0],
        "images_per_sec_per_gpu": per_gpu,
        "step_ms_median": median,
        "step_ms_p10": percentile(step_ms, 0.1),
        "step_ms_p90": percentile(step_ms, 0.9),
        "steps_timed": len(step_ms),
        "warmup_steps": warmup_steps(cfg),
        "timer": "cuda_events" if device.type == "cuda" else "perf_counter",
        "step_ms": step_ms,
        "cuda_graph": bool(cfg.get("cuda_graph")),  # false where the method was timed eagerly (see above)
    }
    log.info("speed: %.1f images/s, step %.2f ms (p10 %.2f, p90 %.2f) over %d steps",
             fields["images_per_sec"], median, fields["step_ms_p10"], fields["step_ms_p90"], len(step_ms))
    return fields


def eager_unless_capturable(cfg):
    """Under ``cuda_graph=true`` every method that can be captured is timed from a CUDA graph (none,
    division, blpa, actnn); one that cannot (checkpoint, swap, acgc) is timed eagerly and recorded with
    ``cuda_graph`` false, so it lands in the eager table and a sweep over every method completes."""
    if not cfg.get("cuda_graph") or build_method(cfg).cuda_graph_safe:
        return cfg
    log.warning("method=%s cannot be captured in a CUDA graph: timed eagerly (recorded with cuda_graph=false)",
                cfg.method.name)
    cfg = cfg.copy()
    cfg.cuda_graph = False
    return cfg


def time_steps(cfg, device: torch.device) -> list[float]:
    """Milliseconds of each timed step, after the warm-up steps."""
    with leaving_on_failure(cfg):  # speed.queue: a run that fails here is not waited for
        bench = build_speed_bench(cfg, device)
    try:
        with leaving_on_failure(cfg):
            for _ in range(warmup_steps(cfg)):
                train_step(bench, cfg, device)
        timer = cuda_step_ms if device.type == "cuda" else _cpu_step_ms
        with timing_turn(cfg) as queued:  # speed.queue: after the runs started beside it are warm
            if queued:
                train_step(bench, cfg, device)  # allocates again what the wait gave back
            return timer(bench, cfg, device, int(cfg.speed.steps))
    finally:
        bench.close()


def build_speed_bench(cfg, device: torch.device) -> Bench:
    """The bench of ``mode=train``'s step without a ledger; replayed from a CUDA graph under
    ``cuda_graph=true``."""
    bench = build_bench(cfg, device, int(cfg.batch_size), ledger=None, data_parallel=True)
    if cfg.get("cuda_graph"):
        try:
            bench.graphed = GraphedStep(bench.model, bench.method, cfg, device, bench.scaler)
        except CudaGraphError:
            bench.close()  # the method's hooks would outlive the refused job
            raise
    return bench


def warmup_steps(cfg) -> int:
    """``speed.warmup``, raised past the eager steps and the capture under ``cuda_graph=true``:
    only replays are timed."""
    warmup = int(cfg.speed.warmup)
    return max(warmup, WARMUP_STEPS + 1) if cfg.get("cuda_graph") else warmup


def cuda_step_ms(bench: Bench, cfg, device: torch.device, steps: int) -> list[float]:
    # Events are recorded on the stream and read after one final synchronize, so timing adds no
    # host-device synchronisation between steps (the steps queue up as they do in training).
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(steps)]
    torch.cuda.synchronize(device)
    for start, end in events:
        start.record()
        train_step(bench, cfg, device)
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def _cpu_step_ms(bench: Bench, cfg, device: torch.device, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(bench, cfg, device)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), for 0 <= q <= 1."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
