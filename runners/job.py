"""One job, whatever its mode: validate, seed, run the mode's runner, write the record everywhere.

The record is written in every case: ``ok``, ``oom`` (a CUDA out-of-memory error is a result, and a
sweep goes on) or ``error`` (written, then the error is raised again so the job fails visibly).
Under torchrun every rank runs the job and only rank 0 writes (config, record, store row, tracker run);
``world_size`` in the record says how many processes trained together (1 without torchrun).
"""
from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from . import distributed
from .build import build_method, resolve_device, seed_everything
from .checks import ConfigError, validate
from .compiling import compile_problem
from .gpu_memory import free_after_oom
from .record import atomic_write_bytes, new_record, resolve_results_dir, write_record
from .tracking import derive_group, start_logger

log = logging.getLogger(__name__)


class JobEnv:
    """What a runner gets besides the config: where to write, on which device, and the logger."""

    def __init__(self, run_dir: Path, device: torch.device, logger):
        self.run_dir = run_dir
        self.device = device
        self.logger = logger


def _runner(mode: str) -> Callable[[Any, JobEnv], dict[str, Any]]:
    return importlib.import_module(f"runners.{mode}").run


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_job(cfg, run_dir: str | Path) -> dict[str, Any]:
    """Run one job and return its record (also written to results.json and the results store)."""
    validate(cfg)
    run_dir = Path(run_dir)
    device = distributed.setup(cfg, resolve_device(cfg))
    rank, writes = distributed.rank(), distributed.is_main()
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(int(cfg.seed) + rank)  # each rank its own draws; DDP gives all ranks rank 0's model
    if cfg.mode.name != "report":
        method = build_method(cfg)
        problem = compile_problem(cfg, method)
        if problem is not None:
            raise ConfigError(problem)
        method_fields = method.describe()
    else:
        method_fields = {"method": cfg.method.name, "block_size": None, "bits": None}
    record = new_record(cfg, run_dir, method_fields)
    record["device"] = device.type
    record["group"] = derive_group(cfg)
    record["world_size"] = distributed.world_size()
    if writes:
        atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    resume_id = _previous_run_id(run_dir) if cfg.get("resume") else None
    logger = start_logger(cfg, str(run_dir), record, resume_id=resume_id, rank=rank)
    record["wandb_run_id"] = logger.run_id
    if logger.run_id:
        atomic_write_bytes(run_dir / "wandb_run_id", logger.run_id.encode())
    start = time.perf_counter()
    failure: BaseException | None = None
    try:
        record.update(_runner(cfg.mode.name)(cfg, JobEnv(run_dir, device, logger)))
        record["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - every outcome is recorded
        if is_oom(exc):
            record["status"] = "oom"
            log.warning("out of memory: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            free_after_oom(exc, device)  # the failed step's graph must not stay on the GPU for the next job of a sweep
        else:
            record["status"] = "error"
            failure = exc
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["duration_s"] = round(time.perf_counter() - start, 3)
    if writes:
        json_path, row_path = write_record(record, run_dir, resolve_results_dir(cfg))
        log.info("record: %s (store row %s)", json_path, row_path)
    logger.summary(record)
    logger.finish(exit_code=0 if record["status"] != "error" else 1)
    if failure is not None:
        raise failure
    return record


def _previous_run_id(run_dir: Path):
    """The wandb run id of an earlier attempt in this directory, so a resumed run continues it."""
    path = run_dir / "wandb_run_id"
    return path.read_text().strip() if path.exists() else None
