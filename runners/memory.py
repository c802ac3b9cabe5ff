"""mode=memory: what one training step costs in memory, by the paper's protocol and beyond it.

The step is the one ``mode=train`` runs (same method, autocast, channels_last, SGD, GradScaler,
order of zero_grad / backward / step) on a fixed random batch made on the device, so no data
loader is involved. ``memory.steps`` steps run; everything is read on the last one, since the
first creates the optimizer state, the grads and the allocator's cached blocks.

Fields (bytes unless named otherwise). "Allocator" figures are CUDA-only, read from PyTorch's
caching allocator relative to what the process held before the run (``cuda_baseline_bytes``),
and null on CPU, where no allocator is measured:

- ``cuda_baseline_bytes`` (allocator): what the process held when the measurement started. One
  tiny training step runs first, so this holds the cuBLAS workspaces (about 32 MiB per thread on
  Hopper; forward and autograd's backward thread each have one) whatever ran before in the
  process; anything much larger is memory an earlier job left behind (a warning says so).
- ``param_bytes``: parameters plus buffers, counted from the tensors (any device).
- ``model_bytes`` (allocator): ``memory_allocated`` growth while building the model on the device.
- ``batch_bytes``: the fixed batch, images plus labels, counted from the tensors (any device).
- ``output_bytes``: the logits of the measured step, counted from the tensor (any device).
- ``optimizer_state_bytes`` (allocator): growth over the first optimizer step (SGD momentum,
  AdamW's two moments).
- ``grad_bytes`` (allocator): the previous step's grads, freed by ``zero_grad`` right before this
  step's backward (0 when the measured step is the first).
- ``total_bytes`` (allocator): ``memory_allocated`` right before backward, i.e. after forward,
  loss and ``zero_grad``: the paper's "total".
- ``runtime_bytes`` (allocator): what stays allocated between steps besides model, optimizer
  state and batch: the GradScaler's scale (fp16), a method's own state, allocator rounding.
- ``activation_bytes``: on CUDA, ``total_bytes - model_bytes - optimizer_state_bytes
  - batch_bytes - runtime_bytes - output_bytes`` (the optimizer state only when it exists before
  the measured backward, i.e. ``memory.steps >= 2``): the paper's definition, everything the
  forward pass left alive for backward, the loss's own saved tensors included; the input batch
  is not in it even when the first layer saves it as is. With ``memory.steps=1`` whatever the
  first step creates to keep (the GradScaler's scale) lands here too. On CPU: ``ledger_bytes``.
- ``peak_bytes`` / ``reserved_peak_bytes`` (allocator): ``max_memory_allocated`` /
  ``max_memory_reserved`` over the whole measured step (forward, backward, optimizer step).
- ``ledger_bytes`` / ``ledger_plain_bytes``: what the method keeps for backward, and what plain
  autograd would keep for the same saves (``ByteLedger``, exact, any device; the input batch is
  counted when the first layer saves it); ``ledger_ratio`` is plain / stored; ``ledger_by_codec``
  and ``ledger_layers`` break them down.
- ``activation_bytes_per_image``: ``activation_bytes / batch_size``.
- ``max_batch`` (``memory.find_max_batch=true``, CUDA): the largest batch whose training steps
  fit, found by doubling from ``batch_size`` and then bisecting; ``max_batch_capped`` is true when
  the search stopped at ``memory.max_batch_limit`` without running out of memory.
- ``peak_bytes_max`` / ``reserved_peak_bytes_max``: the largest ``peak_bytes`` /
  ``reserved_peak_bytes`` of any rank (equal to them in one process).

Under torchrun each rank measures its own GPU while the measured steps run in DDP (gradients
all-reduced, SyncBatchNorm under ``train.sync_bn``), as ``mode=train`` trains: the figures are rank
0's, per GPU (DDP's communication buckets count in ``runtime_bytes``). The batch search probes each
GPU on its own, without DDP, since one GPU may run out of memory while another does not.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from division import ByteLedger, TrainingMethod

from . import distributed
from .compiling import compile_mode
from .build import (build_method, build_model, build_optimizer, build_scaler, forward_loss,
                    method_record_fields, model_image_size)
from .gpu_memory import CudaMeter, free_after_oom, module_bytes, release_memory, tensor_bytes
from .job import is_oom

if TYPE_CHECKING:
    from .graph_step import GraphedStep

log = logging.getLogger(__name__)

# Each probe of the batch search runs two steps: the second is the steady state (momentum
# buffers exist and the previous step's grads are alive during forward), so one step would
# report batches that fit once but not in training.
PROBE_STEPS = 2

# More than the cuBLAS workspaces held before a job starts means an earlier job left tensors behind.
LEFTOVER_WARNING_BYTES = 256 * 2 ** 20

Mark = Optional[Callable[[str], None]]


# --------------------------------------------------------------------------- the training step
@dataclass
class Bench:
    """A model with its method, optimizer and scaler, and the fixed batch it trains on."""

    model: nn.Module
    method: TrainingMethod
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    images: torch.Tensor
    target: torch.Tensor
    step: int = 0
    graphed: Optional["GraphedStep"] = None  # forward and backward replayed from a CUDA graph

    def close(self) -> None:
        """Remove the method's hooks: they and the model refer to each other (a cycle)."""
        self.method.detach()


def fixed_batch(cfg, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (batch, 3, S, S) and labels made on the device, in the model's memory format."""
    size = int(cfg.dataset.image_size)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    images = torch.empty((batch_size, 3, size, size), device=device, memory_format=fmt).normal_()
    target = torch.randint(0, int(cfg.dataset.num_classes), (batch_size,), device=device)
    return images, target


def build_bench(cfg, device: torch.device, batch_size: int, ledger: Optional[ByteLedger],
                mark: Mark = None, data_parallel: bool = False) -> Bench:
    """Model, batch, method and optimizer, built as ``mode=train`` builds them.

    ``mark("model")`` is called once the model is on the device, before anything else is.
    ``data_parallel``: under torchrun, train in DDP as ``mode=train`` does (a collective step).
    """
    model = build_model(cfg, int(cfg.dataset.num_classes), device)
    if mark is not None:
        mark("model")
    images, target = fixed_batch(cfg, batch_size, device)
    method = build_method(cfg)
    model = distributed.prepare_model(model, method, cfg, device, ledger, data_parallel=data_parallel)
    model.train()
    return Bench(model, method, build_optimizer(cfg, model), build_scaler(cfg, device), images, target)


def train_step(bench: Bench, cfg, device: torch.device, mark: Mark = None) -> torch.Tensor:
    """One training step exactly as ``mode=train`` runs it; returns the (detached) logits.

    ``mark(name)`` is called at "forward" (after the loss), "before_backward" (after zero_grad),
    "before_optimizer" and "after_optimizer" (after the scaler's update).
    """
    if bench.graphed is not None:
        _, logits = bench.graphed(bench.images, bench.target)
    else:
        with bench.method.step_context():
            logits, loss = forward_loss(bench.model, bench.images, bench.target, cfg, device)
            if mark is not None:
                mark("forward")
            bench.optimizer.zero_grad(set_to_none=True)
            if mark is not None:
                mark("before_backward")
            bench.scaler.scale(loss).backward()
    if mark is not None:
        mark("before_optimizer")
    bench.scaler.step(bench.optimizer)
    bench.scaler.update()
    if mark is not None:
        mark("after_optimizer")
    bench.method.after_step(bench.model, bench.step)
    bench.step += 1
    return logits.detach()


class AllocationLog:
    """``memory_allocated`` at the named points of one step (a ``Mark``)."""

    def __init__(self, meter: CudaMeter):
        self.meter = meter
        self.points: dict[str, int] = {}

    def __call__(self, name: str) -> None:
        self.points[name] = self.meter.allocated()


# ---------------------------------------------------------------------------------- the runner
def run(cfg, env) -> dict[str, Any]:
    device = env.device
    if cfg.get("cuda_graph"):
        log.warning("cuda_graph=true is ignored by mode=memory: its figures are read between the "
                    "parts of an eager step")
    _warn_on_image_size(cfg)
    fields = measure(cfg, device, int(cfg.batch_size))  # out of memory: the job records "oom" and frees the GPU
    fields.update(_max_batch_fields(cfg, device))
    return fields


def measure(cfg, device: torch.device, batch_size: int) -> dict[str, Any]:
    """Run ``memory.steps`` training steps and read every memory figure on the last one."""
    meter = start_meter(cfg, device, batch_size) if device.type == "cuda" else None
    build_log = AllocationLog(meter) if meter else None
    ledger = ByteLedger()
    bench = build_bench(cfg, device, batch_size, ledger, build_log, data_parallel=True)
    try:
        steps = int(cfg.memory.steps)
        # One log per step: the first step creates the optimizer state, the last is measured.
        step_logs = [AllocationLog(meter) if meter else None for _ in range(steps)]
        for index, step_log in enumerate(step_logs):
            if index == steps - 1:
                gc.collect()  # garbage of earlier steps must not sit in the between-steps level
                floor = meter.allocated() if meter else None
                if meter:
                    meter.reset_peak()
            output_bytes = tensor_bytes(train_step(bench, cfg, device, step_log))
            if index == 0 and steps > 1 and compile_mode(cfg) is not None:
                # the compiled graph's ledger counts from autograd's saved-tensor hooks: read it on the
                # first step, so that the measured step runs without them
                bench.method.stop_ledger()
        fields = {
            "image_size": int(cfg.dataset.image_size),
            "memory_steps": steps,
            "param_bytes": module_bytes(bench.model),
            "batch_bytes": tensor_bytes(bench.images, bench.target),
            "output_bytes": output_bytes,
        }
        fields.update(_ledger_fields(ledger))
        fields.update(method_record_fields(bench.method))
        if meter:
            fields.update(_allocator_fields(meter, build_log, step_logs[0], step_logs[-1], floor, fields))
        else:
            fields.update(_cpu_fields(fields))
        fields.update(_largest_peaks(fields))
    finally:
        bench.close()
    per_image = fields["activation_bytes"]
    fields["activation_bytes_per_image"] = per_image / batch_size if per_image is not None else None
    _log_summary(fields)
    return fields


def start_meter(cfg, device: torch.device, batch_size: int) -> CudaMeter:
    """Prime the CUDA libraries with one tiny training step, then take the baseline.

    cuBLAS allocates its workspaces through PyTorch's allocator at the first matmul of each thread
    and keeps them for the life of the process. Without priming they would count in the first job
    of a process and not in the next ones; primed, every job has them in its baseline (PyTorch
    1.x, which the paper used, did not count them at all).
    """
    # eager: priming needs the libraries, not a compiled graph for a batch of 2
    _probe(OmegaConf.merge(cfg, {"compile": False}), device, min(2, batch_size), steps=1)
    meter = CudaMeter(device)
    if meter.base_allocated > LEFTOVER_WARNING_BYTES:
        log.warning("the process holds %.0f MiB of CUDA memory before this job starts (left by an "
                    "earlier job?); the figures are relative to it", meter.base_allocated / 2 ** 20)
    return meter


def _allocator_fields(meter: CudaMeter, build_log: AllocationLog, first_log: AllocationLog,
                      last_log: AllocationLog, floor: int, fields: dict) -> dict[str, Any]:
    """The CUDA figures; see the module docstring for each definition.

    ``floor`` is ``memory_allocated`` right before the measured step: model, batch, optimizer
    state, runtime buffers and the previous step's grads, which zero_grad frees before backward.
    """
    model = build_log.points["model"]
    optimizer_state = first_log.points["after_optimizer"] - first_log.points["before_optimizer"]
    grads = last_log.points["forward"] - last_log.points["before_backward"]
    total = last_log.points["before_backward"]
    between_steps = floor - grads  # model, batch, optimizer state, runtime buffers
    state_before_backward = 0 if first_log is last_log else optimizer_state
    runtime = between_steps - model - fields["batch_bytes"] - state_before_backward
    return {
        "cuda_baseline_bytes": meter.base_allocated,
        "model_bytes": model,
        "optimizer_state_bytes": optimizer_state,
        "grad_bytes": grads,
        "runtime_bytes": runtime,
        "total_bytes": total,
        "activation_bytes": total - between_steps - fields["output_bytes"],
        "peak_bytes": meter.peak_allocated(),
        "reserved_peak_bytes": meter.peak_reserved(),
    }


def _largest_peaks(fields: dict) -> dict[str, Any]:
    """The peaks of the rank that needed most (a collective: every rank measures)."""
    if fields["peak_bytes"] is None:  # CPU: no allocator, on any rank
        return {"peak_bytes_max": None, "reserved_peak_bytes_max": None}
    peak, reserved = distributed.max_over_ranks(fields["peak_bytes"], fields["reserved_peak_bytes"])
    return {"peak_bytes_max": int(peak), "reserved_peak_bytes_max": int(reserved)}


def _cpu_fields(fields: dict) -> dict[str, Any]:
    """On CPU no allocator is read: those figures are null, and activation is the ledger's count."""
    nulls = dict.fromkeys(("cuda_baseline_bytes", "model_bytes", "optimizer_state_bytes", "grad_bytes",
                           "runtime_bytes", "total_bytes", "peak_bytes", "reserved_peak_bytes"))
    return {**nulls, "activation_bytes": fields["ledger_bytes"]}


def _ledger_fields(ledger: ByteLedger) -> dict[str, Any]:
    if not ledger.entries:
        # A method that keeps its saves outside the hooks leaves the ledger empty: say so, not 0.
        log.warning("the method recorded nothing in the byte ledger; ledger fields are null")
        return {"ledger_bytes": None, "ledger_plain_bytes": None, "ledger_ratio": None,
                "ledger_tensors": 0, "ledger_by_codec": {}, "ledger_layers": [], "ledger_coverage": None,
                "ledger_by_op": {}, "ledger_parameter_copy_bytes": ledger.parameter_copy_bytes}
    stored = ledger.stored_bytes
    return {
        "ledger_bytes": stored,
        "ledger_plain_bytes": ledger.plain_bytes,  # null for a compiled graph: compare with compiled none
        "ledger_ratio": ledger.ratio if stored else None,
        "ledger_tensors": len(ledger.entries),
        "ledger_by_codec": ledger.by_codec(),
        "ledger_layers": ledger.by_layer(),
        "ledger_coverage": ledger.coverage,  # share of plain bytes stored compressed; null when compiled
        "ledger_by_op": ledger.by_op(),
        # parameter copies a compiled graph keeps (a weight in another memory format): model memory
        "ledger_parameter_copy_bytes": ledger.parameter_copy_bytes,
    }


# ---------------------------------------------------------------------------- max batch search
def _max_batch_fields(cfg, device: torch.device) -> dict[str, Any]:
    if not cfg.memory.find_max_batch:
        return {}
    if device.type != "cuda":
        log.warning("memory.find_max_batch needs CUDA (it searches for the batch that runs out of "
                    "GPU memory); max_batch is null on %s", device.type)
        return {"max_batch": None, "max_batch_capped": None}
    best, capped = find_max_batch(cfg, device, int(cfg.batch_size), int(cfg.memory.max_batch_limit))
    log.info("largest batch that fits: %d%s", best, " (the search limit)" if capped else "")
    return {"max_batch": best, "max_batch_capped": capped}


def find_max_batch(cfg, device: torch.device, fits_at: int, limit: int) -> tuple[int, bool]:
    """The largest batch whose training steps fit, given that ``fits_at`` fits; and whether the
    search stopped at ``limit`` (then the true maximum is at least that)."""
    good, bad = fits_at, None
    while bad is None and good < limit:  # double until a batch runs out of memory
        trial = min(2 * good, limit)
        if _fits(cfg, device, trial):
            good = trial
        else:
            bad = trial
    if bad is None:
        return good, True
    while bad - good > 1:  # bisect between the last fit and the first failure
        trial = (good + bad) // 2
        if _fits(cfg, device, trial):
            good = trial
        else:
            bad = trial
    return good, False


def _fits(cfg, device: torch.device, batch_size: int) -> bool:
    try:
        _probe(cfg, device, batch_size)
        fits = True
    except Exception as exc:
        if not is_oom(exc):
            raise
        free_after_oom(exc, device)
        fits = False
    release_memory(device)  # every probe starts from an empty cache, as the next one would
    log.info("batch %d: %s", batch_size, "fits" if fits else "out of memory")
    return fits


def _probe(cfg, device: torch.device, batch_size: int, steps: int = PROBE_STEPS) -> None:
    """Fresh model and optimizer (no state carried between probes), ``steps`` training steps."""
    bench = build_bench(cfg, device, batch_size, ledger=None)
    try:
        for _ in range(steps):
            train_step(bench, cfg, device)
        torch.cuda.synchronize(device)
    finally:
        bench.close()


# ------------------------------------------------------------------------------------- helpers
def _warn_on_image_size(cfg) -> None:
    designed = model_image_size(cfg)
    if designed != int(cfg.dataset.image_size):
        log.warning("%s was designed for %dx%d inputs; measuring at the dataset's %dx%d",
                    cfg.model.name, designed, designed, cfg.dataset.image_size, cfg.dataset.image_size)


def _log_summary(fields: dict[str, Any]) -> None:
    def mib(key: str) -> str:
        return f"{fields[key] / 2 ** 20:.2f} MiB" if fields[key] is not None else "n/a"

    parts = [f"activation {mib('activation_bytes')}"]
    if fields["ledger_bytes"] is not None:
        ratio = fields["ledger_ratio"]
        plain = f" of {mib('ledger_plain_bytes')} plain" if fields["ledger_plain_bytes"] is not None \
            else " saved by the compiled graph"
        parts.append(f"ledger {mib('ledger_bytes')}{plain}" + (f" ({ratio:.2f}x)" if ratio is not None else ""))
        if fields.get("ledger_coverage") is not None:
            parts.append(f"coverage {fields['ledger_coverage']:.1%}")
        if fields.get("ledger_parameter_copy_bytes"):
            parts.append(f"besides {mib('ledger_parameter_copy_bytes')} of parameter copies")
        by_codec = fields.get("ledger_by_codec") or {}
        rebuilt = by_codec.get("rebuilt")
        if rebuilt:  # method.rebuild_conv_input: tensors not stored at all
            parts.append(f"{rebuilt['tensors']} conv inputs rebuilt in backward")
        recomputed = by_codec.get("recomputed")
        if recomputed:  # method.recompute_norm_input: neither
            parts.append(f"{recomputed['tensors']} norm inputs recomputed in backward")
    if fields["peak_bytes"] is not None:
        parts.append(f"peak {mib('peak_bytes')}, total {mib('total_bytes')}")
    log.info("memory: %s", ", ".join(parts))
