"""Data-parallel training over several processes (PyTorch DDP), as started by torchrun.

``torchrun --nproc_per_node=N main.py [overrides]`` starts N copies of main.py and gives each RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without them (``python main.py``) every function
here is a no-op and a job is exactly the single-process job. Under torchrun:

- One run directory: before Hydra parses the command line, rank 0 resolves ``hydra.run.dir`` (whose
  ``${now:...}`` could read a different second on another rank) and every rank gets that path as an
  override (``pin_output_dir``); ranks > 0 write neither Hydra's ``.hydra/`` folder nor a log file there.
- The process group: NCCL when the job runs on CUDA (rank r on ``cuda:LOCAL_RANK``), Gloo on CPU. Every
  collective, the rendezvous included, gives up after ``TIMEOUT``: a rank that dies or stops taking part
  makes the others fail with a timeout error instead of waiting forever (torchrun also stops the other
  ranks as soon as one exits with an error).
- ``batch_size`` is per process: the global batch is ``batch_size x world_size``. Every rank draws the
  same permutation of the training set each epoch and takes every world_size-th sample of it, so the
  global batches are the single-process run's (with batch ``batch_size x world_size``).
- Seeds: ``seed + rank`` for what each rank draws on its own (augmentation, DIVISION's stochastic
  rounding); the model is the same on every rank, since DDP broadcasts rank 0's parameters and buffers
  when it wraps the model.
- The model: BatchNorm becomes SyncBatchNorm (``train.sync_bn=true``), then the method is attached, then
  DDP wraps it (``prepare_model``). The method's hooks live on the inner model, which DDP calls as is.
- Metrics are sums over ranks (``sum_over_ranks``); only rank 0 writes records, checkpoints and logs.
"""
from __future__ import annotations

import logging
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checks import ConfigError
from .compiling import compile_mode

log = logging.getLogger(__name__)

# Longer than any stretch a healthy rank spends without a collective (a checkpoint write, decoding a
# data set onto the GPU before DDP's first broadcast), short enough that a lost rank is noticed.
TIMEOUT = timedelta(minutes=10)

_OUTPUT_DIR_KEY = "division/output_dir"
_store: Optional[dist.Store] = None  # the rendezvous store of pin_output_dir; the process group reuses it


# ----------------------------------------------------------------------------------- who am I
def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def is_distributed() -> bool:
    """Whether this process is one rank of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes files and logs (every process when not distributed)."""
    return rank() == 0


# --------------------------------------------------------------------------- one run directory
def pin_output_dir(argv: list[str], config_dir: str | Path) -> list[str]:
    """``argv`` for this rank: under torchrun, plus the run directory (or sweep directory with ``-m``)
    that rank 0 resolved, and for ranks > 0 without Hydra's own files in it. Unchanged otherwise.

    ``config_dir``: the primary config folder of ``@hydra.main`` (``--config-path`` is honoured too).
    """
    if launched_world_size() <= 1:
        return argv
    from hydra._internal.utils import get_args_parser  # Hydra's own command-line grammar
    args = get_args_parser().parse_args(argv[1:])
    given = _override_keys(args.overrides)
    key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
    extra = []
    if key not in given:
        if args.config_path:
            config_dir = Path(config_dir).parent / args.config_path
        extra.append(f"{key}={_quoted(_shared_output_dir(args, key, Path(config_dir)))}")
    if _env_int("RANK", 0) > 0:
        # Rank 0 writes .hydra/ (the composed config, the overrides) and the job's log file.
        for override in ("hydra.output_subdir=null", "hydra/job_logging=stdout"):
            if override.split("=")[0] not in given:
                extra.append(override)
    return argv + extra


def _override_keys(overrides: list[str]) -> set[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    return {o.key_or_group for o in OverridesParser.create().parse_overrides(overrides)}


def _quoted(text: str) -> str:
    """``text`` as a quoted Hydra override value: a path may hold spaces, commas or quotes."""
    # In Hydra's grammar a backslash escapes only a quote (or another backslash before one).
    escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\" + m.group(2) if m.group(2) else ""), text)
    return f"'{escaped}'"


def _rendezvous() -> dist.Store:
    """The store torchrun's rendezvous offers (kept: ``init`` builds the process group on it)."""
    global _store
    if _store is None:
        _store, _, _ = next(dist.rendezvous("env://", timeout=TIMEOUT))
    return _store


def _shared_output_dir(args, key: str, config_dir: Path) -> str:
    """Rank 0 resolves the directory and publishes it in the store; the others wait for it there."""
    store = _rendezvous()
    # A restarted group (torchrun --max-restarts) must not read the previous attempt's directory.
    name = f"{_OUTPUT_DIR_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if _env_int("RANK", 0) == 0:
        try:
            resolved = _resolve_output_dir(args, key, config_dir)
        except Exception as exc:
            store.set(name, f"\0{type(exc).__name__}: {exc}")  # so that the other ranks stop too
            raise
        store.set(name, resolved)
    value = store.get(name).decode()
    if value.startswith("\0"):
        raise RuntimeError(f"rank 0 could not resolve {key}: {value[1:]}")
    return value


def _resolve_output_dir(args, key: str, config_dir: Path) -> str:
    """``key`` of the config that ``args`` compose (``${now:}`` read once, here)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf
    # A sweep's parameters cannot be composed into one config, and the sweep directory does not use them.
    fixed = [o.input_line for o in OverridesParser.create().parse_overrides(args.overrides)
             if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3", job_name="main"):
        cfg = compose(config_name=args.config_name or "config", overrides=fixed, return_hydra_config=True)
        return str(OmegaConf.select(cfg, key))


# ------------------------------------------------------------------------------ process group
def setup(cfg, device: torch.device) -> torch.device:
    """Join the process group when started by torchrun (once per process) and return this rank's
    device: ``cuda:LOCAL_RANK`` for a CUDA job. Without torchrun: ``device`` as it is."""
    if launched_world_size() <= 1:
        return device
    if cfg.train.get("sync_bn") and device.type != "cuda":
        raise ConfigError(f"train.sync_bn=true is not allowed on {device.type}: torch's SyncBatchNorm "
                          "trains on GPUs only; use device=cuda, or train.sync_bn=false")
    if device.type == "cuda":
        device = torch.device("cuda", _env_int("LOCAL_RANK", 0))
        torch.cuda.set_device(device)  # before NCCL starts: its communicator binds the current device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        where = {} if _store is None else dict(store=_store, rank=_env_int("RANK", 0),
                                               world_size=launched_world_size())
        dist.init_process_group(backend, timeout=TIMEOUT, **where)
        if is_main():
            log.info("DDP: %d processes (%s); the global batch is batch_size x %d",
                     world_size(), backend, world_size())
    elif dist.get_backend() != backend:
        raise ConfigError(f"device={cfg.device!r} needs the {backend} backend, but this process already "
                          f"joined a {dist.get_backend()} group (a sweep cannot change the device under torchrun)")
    return device


def shutdown() -> None:
    """Leave the process group (at the end of the process; a sweep's jobs share the group)."""
    global _store
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _store = None


# ------------------------------------------------------------------------------------ the model
def attach_method(model: nn.Module, method, ledger=None, *, sync_bn: bool = False) -> nn.Module:
    """BatchNorm -> SyncBatchNorm if asked, then the method.

    The conversion makes new modules; the method's hooks must be installed on those, or SyncBatchNorm's
    saved input would silently escape the codec (nn.SyncBatchNorm is a norm layer like any other to it).
    """
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return method.attach(model, ledger=ledger)


def prepare_model(model: nn.Module, method, cfg, device: torch.device, ledger=None, *,
                  data_parallel: bool = True) -> nn.Module:
    """The module to train: ``model`` with the method attached, in DDP when distributed.

    ``data_parallel=False`` keeps every rank on its own (no DDP, no SyncBatchNorm), for measurements that
    may run out of memory on one GPU alone. ``unwrap`` returns the inner model.
    """
    parallel = data_parallel and is_distributed()
    model = attach_method(model, method, ledger, sync_bn=parallel and bool(cfg.train.get("sync_bn")))
    if parallel:
        # Gradients as views into DDP's communication buckets: one copy of them instead of two.
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True)
    mode = compile_mode(cfg)
    if mode is not None:
        # a clean compiler cache for each run: a sweep's runs share one process, and Dynamo's
        # recompile limit counts the graphs of every model it compiled (division.recompile_limit)
        torch._dynamo.reset()
        # DDP inside the compiled module: Dynamo then splits the graph at DDP's buckets, so the
        # all-reduces overlap backward as they do in eager mode
        model = method.compile(model, mode=mode)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, out of torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP's next forward would do:
    evaluation then uses what the checkpoint holds."""
    if is_distributed():
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


# --------------------------------------------------------------------------------- collectives
def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values, op) -> list[float]:
    numbers = [float(v) for v in values]  # tensors on any device, or plain numbers
    if not is_distributed():
        return numbers
    # float64 holds counts exactly up to 2**53 and sums of float32 losses without further rounding
    tensor = torch.tensor(numbers, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def sum_over_ranks(*values) -> list[float]:
    """Each value summed over all ranks (the value itself in one process)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def max_over_ranks(*values) -> list[float]:
    return _all_reduce(values, dist.ReduceOp.MAX)


def all_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank: all ranks then take the same branch."""
    return bool(_all_reduce([flag], dist.ReduceOp.MIN)[0])


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
