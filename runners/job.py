"""One job, whatever its mode: validate, seed, run the mode's runner, write the record everywhere.

Before any work: the config is validated (``checks.validate``), every output location is checked to be
writable and free (``checks.check_outputs``), and temporary files that killed runs left in the run
directory are removed. The record is written in every case: ``ok``, ``oom`` (a CUDA out-of-memory
error is a result, and a sweep goes on) or ``error`` (written, then the error is raised again so the
job fails visibly). A job of a sweep whose configuration is refused gets an error record too
(``write_config_error_record``), so that the sweep's other jobs still run and the refusal is on file.
Under torchrun every rank runs the job and only rank 0 writes (config, record, store row, tracker run);
``world_size`` in the record says how many processes trained together (1 without torchrun).
"""
from __future__ import annotations

import importlib
import logging
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from . import distributed
from .build import build_method, resolve_device, seed_everything
from .checks import ConfigError, check_outputs, validate
from .checkpoint import remove_stale_temp_files
from .compiling import compile_mode, compile_problem
from .gpu_memory import free_after_oom
from .record import (COMMON_FIELDS, PACKED, atomic_write_bytes, code_version, new_record, record_run_dir,
                     resolve_results_dir, write_json, write_record, write_store_row)
from .tracking import derive_group, start_logger

log = logging.getLogger(__name__)

# (exit status, message) of the jobs of this process's sweep that failed with a user error; main.py
# turns it into the sweep's exit status, and the sweep launcher adds the jobs that did not compose.
FAILED_JOBS: list[tuple[int, str]] = []


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
    check_outputs(run_dir, resolve_results_dir(cfg), resume=bool(cfg.get("resume")))
    remove_stale_temp_files(run_dir)
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
        if compile_mode(cfg) is not None and method_fields.get("kernels"):
            # compiled, the codec runs the fused kernels as custom ops where they apply
            # (division.compiled_ops), else tensor ops that the compiler generates kernels for
            codec = getattr(method, "tensor_codec", None)
            method_fields["kernels"] = "triton" if codec is not None and codec.fused else "inductor"
    else:
        method_fields = {"method": cfg.method.name, "block_size": None, "bits": None}
    record = new_record(cfg, run_dir, method_fields)
    record["device"] = device.type
    record["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
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
        record["error"] = f"{type(exc).__name__}: {error_message(exc)}"
    record["duration_s"] = round(time.perf_counter() - start, 3)
    if writes:
        store = resolve_results_dir(cfg)
        if cfg.mode.name == "report" and (Path(store) / PACKED).is_file():
            # a committed record set (docs/records/SET, packed as text) holds measurements only:
            # a report over it must not add its own row there
            json_path = write_json(record, run_dir)
            log.info("record: %s (no store row: %s is a packed record set)", json_path, store)
        else:
            json_path, row_path = write_record(record, run_dir, store)
            log.info("record: %s (store row %s)", json_path, row_path)
    logger.summary(record)
    logger.finish(exit_code=0 if record["status"] != "error" else 1)
    if failure is not None:
        raise failure
    return record


def error_message(exc: BaseException) -> str:
    """The message of ``exc``; for an error re-raised from a DataLoader worker, the worker's own message
    without the traceback text that the DataLoader puts in front of it."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        for p in (prefix, f"{type(exc).__name__}: "):
            if last.startswith(p):
                return last[len(p):]
        return last
    return text


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors about the user's input (config, data, a diverging run): reported by message, no traceback."""
    from data.errors import DataError
    from data.folder2lmdb import LMDBRecordError
    from .train import NonFiniteError
    return (ConfigError, DataError, LMDBRecordError, NonFiniteError)


def _plain(cfg, key: str, kind: type):
    """``key`` of ``cfg`` if it is of type ``kind`` (a refused config may hold anything), else None."""
    try:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - an interpolation that does not resolve
        return None
    if isinstance(value, bool) and kind is not bool:
        return None
    return value if isinstance(value, kind) else None


def write_config_error_record(cfg, run_dir: str | Path, exc: BaseException) -> Path | None:
    """The record of a job whose configuration was refused (a sweep's other jobs go on): status error,
    the message, and the fields that could be read. Written where it can be; returns results.json's path."""
    record = {field: None for field in COMMON_FIELDS}
    record.update(
        run_id=uuid.uuid4().hex[:12], mode=_plain(cfg, "mode.name", str), model=_plain(cfg, "model.name", str),
        dataset=_plain(cfg, "dataset.name", str), method=_plain(cfg, "method.name", str),
        block_size=_plain(cfg, "method.block_size", int), bits=_plain(cfg, "method.bits", int),
        batch_size=_plain(cfg, "batch_size", int), precision=_plain(cfg, "precision", str),
        cuda_graph=_plain(cfg, "cuda_graph", bool), seed=_plain(cfg, "seed", int), group=derive_group_safe(cfg),
        status="error", error=f"{type(exc).__name__}: {exc}", run_dir=record_run_dir(run_dir),
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), duration_s=0.0,
        code_version=code_version())
    json_path = None
    if (Path(run_dir) / "results.json").exists():  # the folder holds another run: never overwrite it
        log.warning("%s already holds a record; this job's error record goes to the results store only", run_dir)
    else:
        try:
            json_path = write_json(record, run_dir)
        except OSError as error:
            log.warning("could not write the error record in %s: %s", run_dir, error)
    try:
        results_dir = _plain(cfg, "results_dir", str)
        if results_dir:
            write_store_row(record, resolve_results_dir(cfg))
    except Exception as error:  # noqa: BLE001 - the store may be the very thing that was refused
        log.warning("could not add the error record to the results store: %s", error)
    return json_path


def derive_group_safe(cfg):
    try:
        return derive_group(cfg)
    except Exception:  # noqa: BLE001
        return None


def _previous_run_id(run_dir: Path):
    """The wandb run id of an earlier attempt in this directory, so a resumed run continues it."""
    path = run_dir / "wandb_run_id"
    return path.read_text().strip() if path.exists() else None
