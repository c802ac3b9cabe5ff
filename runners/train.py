"""mode=train: SGD with momentum, cosine schedule, evaluation each epoch, atomic checkpoints, resume.

Resuming (``resume=true`` with the same ``hydra.run.dir``) restores model, optimizer, scheduler,
scaler, RNG states, epoch count and history from ``checkpoint.pt``, which is written at the end of
every epoch; a run killed mid-epoch redoes that epoch from the same RNG state, so it ends where an
uninterrupted run would.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from division import ByteLedger

from .build import autocast, build_data, build_method, build_model, method_record_fields
from .checkpoint import load_checkpoint, restore_rng, rng_state, save_checkpoint

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def set_loader_epoch(loader, seed: int, epoch: int) -> None:
    """Make each epoch's shuffle and augmentation a function of (seed, epoch), so resume replays it."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed * 1000 + epoch)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    k_max = min(max(ks), logits.shape[1])
    pred = logits.topk(k_max, dim=1).indices
    hits = pred.eq(target.view(-1, 1))
    return [hits[:, :min(k, k_max)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(model, loader, device, cfg) -> dict[str, float]:
    """Top-1 / top-5 and loss on the validation split; eval mode, so no activation is compressed."""
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
    return {"val_loss": loss_sum.item() / max(total, 1), "val_top1": 100.0 * top1.item() / max(total, 1),
            "val_top5": 100.0 * top5.item() / max(total, 1)}


def _to_device(images, target, device, cfg):
    images = images.to(device, non_blocking=True)
    if cfg.channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(device, non_blocking=True)


def _progress(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def run(cfg, env) -> dict[str, Any]:
    device = env.device
    train_loader, val_loader, info = build_data(cfg, device)
    model = build_model(cfg, info["num_classes"], device)
    method = build_method(cfg)
    ledger = ByteLedger()
    model = method.attach(model, ledger=ledger)
    train_cfg = cfg.train
    optimizer = torch.optim.SGD(model.parameters(), lr=train_cfg.lr, momentum=train_cfg.momentum,
                                weight_decay=train_cfg.weight_decay, nesterov=train_cfg.nesterov)
    steps_per_epoch = len(train_loader)
    if train_cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, int(train_cfg.max_steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(
        steps_per_epoch * train_cfg.epochs, steps_per_epoch * train_cfg.warmup_epochs))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    ckpt_path = Path(env.run_dir) / "checkpoint.pt"
    history: list[dict[str, Any]] = []
    start_epoch, global_step, first_step_ledger = 0, 0, None
    if cfg.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        start_epoch, global_step = state["epoch"], state["global_step"]
        history, first_step_ledger = state["history"], state.get("ledger")
        log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    elif cfg.resume:
        log.warning("resume=true but %s does not exist: starting from scratch", ckpt_path)

    train_seconds = sum(h["epoch_train_s"] for h in history)
    train_images = sum(h["train_images"] for h in history)
    model.train()
    for epoch in range(start_epoch, train_cfg.epochs):
        set_loader_epoch(train_loader, int(cfg.seed), epoch)
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = _progress(train_loader, steps_per_epoch, bool(train_cfg.progress), f"epoch {epoch + 1}/{train_cfg.epochs}")
        for step, (images, target) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            images, target = _to_device(images, target, device, cfg)
            with method.step_context():
                with autocast(cfg, device):
                    logits = model(images)
                    loss = F.cross_entropy(logits.float(), target)
                if not torch.isfinite(loss).item():
                    raise NonFiniteLossError(
                        f"non-finite training loss {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                        f"(global step {global_step + 1}); "
                        + (f"the last good checkpoint {ckpt_path} is kept; " if ckpt_path.exists() else "")
                        + "lower train.lr, or use precision=fp32 (or fp16, which has a GradScaler)")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            if first_step_ledger is None:
                first_step_ledger = ledger.summary()
                if method.compressor is not None:
                    method.compressor.ledger = None  # one step is enough; skip the bookkeeping after
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            method.after_step(model, global_step)
            global_step += 1
            loss_sum += loss.detach() * target.numel()
            correct += (logits.argmax(dim=1) == target).sum()
            seen += target.numel()
            if bar is not train_loader and (step % 10 == 0 or step + 1 == steps_per_epoch):
                elapsed = time.perf_counter() - epoch_start
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100.0 * correct.item() / seen:.1f}",
                                img_s=f"{seen / elapsed:.0f}")
            if train_cfg.log_every and global_step % train_cfg.log_every == 0:
                env.logger.log({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0],
                                "epoch": epoch + step / steps_per_epoch}, step=global_step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_train_s = time.perf_counter() - epoch_start
        train_seconds += epoch_train_s
        train_images += seen
        row = {"epoch": epoch + 1, "train_loss": loss_sum.item() / max(seen, 1),
               "train_top1": 100.0 * correct.item() / max(seen, 1), "lr": scheduler.get_last_lr()[0],
               "epoch_train_s": round(epoch_train_s, 3), "train_images": seen,
               "images_per_sec": seen / epoch_train_s if epoch_train_s else None}
        if (epoch + 1) % train_cfg.eval_every == 0 or epoch + 1 == train_cfg.epochs:
            row.update(evaluate(model, val_loader, device, cfg))
        history.append(row)
        env.logger.log({f"epoch/{k}": v for k, v in row.items()}, step=global_step)
        log.info("epoch %d/%d %s", epoch + 1, train_cfg.epochs,
                 " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
            "epoch": epoch + 1, "global_step": global_step, "history": history,
            "ledger": first_step_ledger, "wandb_run_id": env.logger.run_id})
        (Path(env.run_dir) / "history.json").write_text(json.dumps(history, indent=1))

    evaluated = [h for h in history if "val_top1" in h]
    return {
        "epochs": len(history),
        "final_val_top1": evaluated[-1]["val_top1"] if evaluated else None,
        "final_val_top5": evaluated[-1]["val_top5"] if evaluated else None,
        "best_val_top1": max(h["val_top1"] for h in evaluated) if evaluated else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "images_per_sec_train": train_images / train_seconds if train_seconds else None,
        "ledger_plain_bytes": (first_step_ledger or {}).get("plain_bytes"),
        "ledger_bytes": (first_step_ledger or {}).get("stored_bytes"),
        "ledger_ratio": (first_step_ledger or {}).get("ratio"),
        "num_classes": info["num_classes"],
        "history": history,
        **method_record_fields(method),
    }
