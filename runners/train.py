"""mode=train: SGD with momentum (or AdamW), cosine schedule after a linear warmup, evaluation each
epoch, atomic checkpoints, resume.

Resuming (``resume=true`` with the same ``hydra.run.dir``) restores model, optimizer, scheduler,
scaler, RNG states, epoch count and history from ``checkpoint.pt``, which is written at the end of
every epoch; a run killed mid-epoch redoes that epoch from the same RNG state, so it ends where an
uninterrupted run would.

Under torchrun (see ``runners.distributed``) the model trains in DDP with ``batch_size`` images per
process; the epoch's loss, accuracy and evaluation are sums over all ranks, so the history reads as
one run over the global batch. Rank 0 writes the checkpoint, with every rank's RNG state; resuming
under DDP loads it on every rank (onto the CPU, then into the rank's device by ``load_state_dict``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from division import ByteLedger

from . import distributed
from .build import (autocast, build_data, build_method, build_model, build_optimizer, build_scaler,
                    forward_loss, method_record_fields)
from .checkpoint import load_checkpoint, restore_rng, rng_state, save_checkpoint
from .graph_step import GraphedStep
from .record import atomic_write_bytes

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A loss, parameter or buffer became NaN or infinite; the last finite checkpoint is left as it was."""


class NonFiniteLossError(NonFiniteError):
    """The training loss became NaN or infinite."""


# Test hook: SIGKILL this process right after this global step (a kill at a known point, mid-epoch).
KILL_AT_STEP_ENV = "DIVISION_TEST_KILL_AT_STEP"


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def set_loader_epoch(loader, seed: int, epoch: int, rank: int = 0) -> None:
    """Make each epoch's shuffle a function of (seed, epoch), the same on every rank, and its
    augmentation one of (seed + rank, epoch), so that resume replays it."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):  # the DataLoader's DistributedSampler
        sampler.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed((seed + rank) * 1000 + epoch)
    order = getattr(loader, "order_generator", None)  # the DeviceLoader's, when not the generator itself
    if isinstance(order, torch.Generator) and order is not generator:
        order.manual_seed(seed * 1000 + epoch)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    k_max = min(max(ks), logits.shape[1])
    pred = logits.topk(k_max, dim=1).indices
    hits = pred.eq(target.view(-1, 1))
    return [hits[:, :min(k, k_max)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(model, loader, device, cfg) -> dict[str, float]:
    """Top-1 / top-5 and loss on the validation split; eval mode, so no activation is compressed.

    ``model`` is the inner model, never DDP: ranks may hold different numbers of validation batches, and
    evaluation needs no gradient synchronisation. The sums are reduced over the ranks' shards.
    """
    distributed.sync_buffers(model)
    model.eval()
    total, loss_sum = 0, torch.zeros((), device=device)
    top1 = torch.zeros((), device=device, dtype=torch.long)
    top5 = torch.zeros_like(top1)
    for images, target in loader:
        images, target = _to_device(images, target, device, cfg)
        with autocast(cfg, device):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), target, reduction="sum")
        c1, c5 = topk_correct(logits, target)
        top1 += c1
        top5 += c5
        total += target.numel()
    model.train()
    loss_sum, top1, top5, total = distributed.sum_over_ranks(loss_sum, top1, top5, total)
    total = max(total, 1)
    return {"val_loss": loss_sum / total, "val_top1": 100.0 * top1 / total, "val_top5": 100.0 * top5 / total}


def _to_device(images, target, device, cfg):
    images = images.to(device, non_blocking=True)
    if cfg.channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(device, non_blocking=True)


def _progress(iterable, total: int, enabled: bool, desc: str):
    """A tqdm bar on a terminal; the loader itself when output goes to a file or a pipe (a SLURM log),
    where the loop logs one line per ``train.log_every`` steps instead of redrawing a bar."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def run(cfg, env) -> dict[str, Any]:
    device = env.device
    rank, is_main = distributed.rank(), distributed.is_main()
    train_loader, val_loader, info = build_data(cfg, device)
    model = build_model(cfg, info["num_classes"], device, image_size=info["image_size"])
    method = build_method(cfg)
    ledger = ByteLedger()
    net = distributed.prepare_model(model, method, cfg, device, ledger)  # SyncBN, method, DDP
    model = distributed.unwrap(net)  # checkpoints and evaluation use the model itself, DDP only trains it
    train_cfg = cfg.train
    optimizer = build_optimizer(cfg, net)
    steps_per_epoch = len(train_loader)
    if train_cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, int(train_cfg.max_steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(
        steps_per_epoch * train_cfg.epochs, steps_per_epoch * train_cfg.warmup_epochs))
    scaler = build_scaler(cfg, device)
    graphed = None
    if cfg.get("cuda_graph"):
        graphed = GraphedStep(net, method, cfg, device, scaler)  # refuses CPU, DDP, unsafe methods
        log.warning("cuda_graph=true in training is experimental: short ResNet-18 runs ended below "
                    "eager training (docs/results.md); use it for throughput, compare before relying on it")

    ckpt_path = Path(env.run_dir) / "checkpoint.pt"
    history: list[dict[str, Any]] = []
    start_epoch, global_step, first_step_ledger = 0, 0, None
    # Rank 0 decides, so that all ranks resume or none does (each rank then reads the file itself).
    if cfg.resume and distributed.broadcast_object(ckpt_path.exists()):
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng(_rank_rng_state(state, rank, distributed.world_size()))
        start_epoch, global_step = state["epoch"], state["global_step"]
        method.at_step(global_step)  # stochastic rounding continues with this step's draws
        history, first_step_ledger = state["history"], state.get("ledger")
        if first_step_ledger is not None:
            method.stop_ledger()  # recorded by the first run; no bookkeeping (plain autograd: no hooks)
        log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    elif cfg.resume:
        log.warning("resume=true but %s does not exist: starting from scratch", ckpt_path)

    kill_at = int(os.environ.get(KILL_AT_STEP_ENV) or 0)
    train_seconds = sum(h["epoch_train_s"] for h in history)
    train_images = sum(h["train_images"] for h in history)
    net.train()
    for epoch in range(start_epoch, train_cfg.epochs):
        set_loader_epoch(train_loader, int(cfg.seed), epoch, rank)
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0  # this rank's images; the bar shows rank 0's shard
        bar = _progress(train_loader, steps_per_epoch, bool(train_cfg.progress) and is_main,
                        f"epoch {epoch + 1}/{train_cfg.epochs}")
        for step, (images, target) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            images, target = _to_device(images, target, device, cfg)
            if graphed is not None:
                # forward and backward in one replay; the check below still comes before the
                # optimizer step, so a non-finite loss never reaches the weights
                loss, logits = graphed(images, target)
                _check_finite(loss, rank, epoch, step, global_step, ckpt_path)
            else:
                with method.step_context():
                    logits, loss = forward_loss(net, images, target, cfg, device)
                    # every rank stops together, before a backward whose all-reduce the others would wait for
                    _check_finite(loss, rank, epoch, step, global_step, ckpt_path)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
            if first_step_ledger is None:
                first_step_ledger = ledger.summary()
                method.stop_ledger()  # one step is enough; plain autograd then runs without hooks
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            method.after_step(model, global_step)
            global_step += 1
            if global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            loss_sum += loss.detach() * target.numel()
            correct += (logits.argmax(dim=1) == target).sum()
            seen += target.numel()
            if bar is not train_loader and (step % 10 == 0 or step + 1 == steps_per_epoch):
                elapsed = time.perf_counter() - epoch_start
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100.0 * correct.item() / seen:.1f}",
                                img_s=f"{seen / elapsed:.0f}")
            if train_cfg.log_every and global_step % train_cfg.log_every == 0:
                step_loss = distributed.sum_over_ranks(loss.detach())[0] / distributed.world_size()
                env.logger.log({"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0],
                                "epoch": epoch + step / steps_per_epoch}, step=global_step)
                if bar is train_loader and train_cfg.progress and is_main:  # no bar: one line per interval
                    log.info("epoch %d/%d step %d/%d loss %.4f acc %.1f%% %.0f images/s", epoch + 1, train_cfg.epochs,
                             step + 1, steps_per_epoch, float(step_loss), 100.0 * correct.item() / max(seen, 1),
                             seen / max(time.perf_counter() - epoch_start, 1e-9))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_train_s = time.perf_counter() - epoch_start
        loss_total, correct_total, seen_total = distributed.sum_over_ranks(loss_sum, correct, seen)
        seen = int(seen_total)  # images of all ranks: the history reads as one run of the global batch
        train_seconds += epoch_train_s
        train_images += seen
        row = {"epoch": epoch + 1, "train_loss": loss_total / max(seen, 1),
               "train_top1": 100.0 * correct_total / max(seen, 1), "lr": scheduler.get_last_lr()[0],
               "epoch_train_s": round(epoch_train_s, 3), "train_images": seen,
               "images_per_sec": seen / epoch_train_s if epoch_train_s else None}
        if (epoch + 1) % train_cfg.eval_every == 0 or epoch + 1 == train_cfg.epochs:
            row.update(evaluate(model, val_loader, device, cfg))
        # Before anything is saved: a checkpoint is only ever written of a finite model.
        _check_finite_state(model, row, rank, epoch, ckpt_path)
        history.append(row)
        env.logger.log({f"epoch/{k}": v for k, v in row.items()}, step=global_step)
        rng_by_rank = distributed.gather_objects(rng_state())
        if not is_main:
            continue
        log.info("epoch %d/%d %s", epoch + 1, train_cfg.epochs,
                 " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_by_rank[0],
            "rng_by_rank": rng_by_rank, "epoch": epoch + 1, "global_step": global_step, "history": history,
            "ledger": first_step_ledger, "wandb_run_id": env.logger.run_id})
        atomic_write_bytes(Path(env.run_dir) / "history.json", json.dumps(history, indent=1).encode())

    evaluated = [h for h in history if "val_top1" in h]
    return {
        "epochs": len(history),
        "final_val_top1": evaluated[-1]["val_top1"] if evaluated else None,
        "final_val_top5": evaluated[-1]["val_top5"] if evaluated else None,
        "best_val_top1": max(h["val_top1"] for h in evaluated) if evaluated else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "images_per_sec_train": train_images / train_seconds if train_seconds else None,
        # this process's GPU (rank 0's under torchrun): model, optimizer, activations, data on device
        "peak_bytes_per_gpu": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "ledger_plain_bytes": (first_step_ledger or {}).get("plain_bytes"),
        "ledger_bytes": (first_step_ledger or {}).get("stored_bytes"),
        "ledger_ratio": (first_step_ledger or {}).get("ratio"),
        "ledger_coverage": (first_step_ledger or {}).get("coverage"),
        "num_classes": info["num_classes"],
        "history": history,
        **method_record_fields(method),
    }


def _check_finite(loss: torch.Tensor, rank: int, epoch: int, step: int, global_step: int, ckpt_path: Path) -> None:
    if not distributed.all_ranks(torch.isfinite(loss).item()):
        raise NonFiniteLossError(
            f"non-finite training loss {loss.item()} (rank {rank}) at epoch {epoch + 1}, "
            f"step {step + 1} (global step {global_step + 1}); "
            + (f"the last good checkpoint {ckpt_path} is kept; " if ckpt_path.exists() else "")
            + "lower train.lr, or use precision=fp32 (or fp16, which has a GradScaler)")


def first_non_finite(model: torch.nn.Module) -> str | None:
    """The first parameter or buffer holding a NaN or an infinity, described, or None."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = tensor.detach()[~torch.isfinite(tensor.detach())]
                return f"{kind} {name} ({bad.numel()} of {tensor.numel()} values non-finite, e.g. {bad[0].item()})"
    return None


def _check_finite_state(model, row: dict[str, Any], rank: int, epoch: int, ckpt_path: Path) -> None:
    """Stop when the model's parameters or buffers (BatchNorm's running statistics) or the epoch's
    losses are not finite, before the epoch's checkpoint or history is written."""
    problems = []
    for key in ("train_loss", "val_loss"):
        value = row.get(key)
        if value is not None and not math.isfinite(float(value)):
            problems.append(f"{key.replace('_', ' ')} {float(value)}")
    bad_tensor = first_non_finite(model)
    if bad_tensor:
        problems.append(bad_tensor)
    if distributed.all_ranks(not problems):
        return
    raise NonFiniteError(
        f"non-finite values after epoch {epoch + 1} (rank {rank}): {'; '.join(problems) or 'on another rank'}; "
        + (f"the last finite checkpoint {ckpt_path} (epoch {epoch}) is kept; " if ckpt_path.exists()
           else "no checkpoint was written; ")
        + "lower train.lr (or add train.warmup_epochs), or use precision=fp32")


def _rank_rng_state(state: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's RNG state from a checkpoint; rank 0's when it was written by another number of ranks."""
    by_rank = state.get("rng_by_rank")
    if by_rank and len(by_rank) == world_size:
        return by_rank[rank]
    if world_size > 1:
        log.warning("the checkpoint was written by %d process(es), this run has %d: every rank continues "
                    "from rank 0's random state", len(by_rank or [None]), world_size)
    return state["rng"]
