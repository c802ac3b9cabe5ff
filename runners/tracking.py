"""Experiment tracking: one wandb run per job, or nothing.

The wandb mode is decided before ``wandb.init`` so a missing network or account never hangs a run:

- ``logger=none`` or ``logger.mode=disabled`` (or ``WANDB_MODE=disabled`` in the environment): no run.
- ``offline`` (the default): the run is written under ``<run_dir>/wandb/offline-run-*`` without contacting
  any server; ``wandb sync <run_dir>/wandb/offline-run-*`` uploads it later.
- ``online``: only when credentials exist (``WANDB_API_KEY``, an identity token file, or a ``wandb login``
  entry in netrc); otherwise a warning and offline. ``WANDB_MODE=offline`` also forces offline, so a
  cluster without network can be switched off the server with one environment variable. When the
  server cannot be reached within ``logger.init_timeout`` seconds (default 5), the run is started
  offline instead, with a warning: it stays tracked, and ``wandb sync`` uploads it later.

Any other failure of the tracker is a warning; the run goes on with a ``NullLogger``, its local record
unaffected. Only rank 0 of a distributed job logs.
"""
from __future__ import annotations

import json
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

DEFAULT_INIT_TIMEOUT_S = 5  # online only (logger.init_timeout): then the run falls back to offline


class NullLogger:
    """The logger interface, doing nothing."""

    run_id: Optional[str] = None

    def log(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        pass

    def summary(self, record: dict[str, Any]) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def log_image(self, key: str, path: str) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def run_name(record: dict[str, Any]) -> str:
    """A readable run name: method, B, Q and seed (B and Q left out where the method has none).

    A report run is named after its group only: its model and method are config defaults it never uses.
    """
    if record.get("mode") == "report":
        return "-".join(str(p) for p in ("report", record.get("group")) if p)
    parts = [record["mode"], record["model"], record["method"]]
    if record.get("block_size") is not None:
        parts.append(f"B{record['block_size']}")
    if record.get("bits") is not None:
        parts.append(f"Q{record['bits']}")
    parts.append(f"b{record['batch_size']}")
    parts.append(f"s{record['seed']}")
    return "-".join(str(p) for p in parts)


def _warn(what: str, exc: BaseException) -> None:
    warnings.warn(f"wandb {what} failed ({type(exc).__name__}: {exc}); the run goes on without it", stacklevel=3)


class WandbLogger(NullLogger):
    """Wraps one wandb run; every call is guarded so that tracking can never fail the job."""

    def __init__(self, run):
        self.run = run
        self.run_id = run.id

    def log(self, metrics, step=None):
        try:
            self.run.log(metrics, step=step)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            _warn("log", exc)

    def summary(self, record):
        try:
            # Nested values (history, per-layer ledger) are in results.json; the summary keeps scalars.
            self.run.summary.update({k: v for k, v in record.items() if not isinstance(v, (dict, list))})
        except Exception as exc:  # noqa: BLE001
            _warn("summary", exc)

    def log_table(self, key, columns, rows):
        try:
            import wandb
            # Report cells mix numbers, "OOM" and empty cells in one column.
            table = wandb.Table(columns=list(columns), data=[list(r) for r in rows], allow_mixed_types=True)
            self.run.log({key: table})
        except Exception as exc:  # noqa: BLE001
            _warn("table", exc)

    def log_image(self, key, path):
        try:
            import wandb
            self.run.log({key: wandb.Image(str(path))})
        except Exception as exc:  # noqa: BLE001
            _warn("image", exc)

    def finish(self, exit_code: int = 0):
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001
            _warn("finish", exc)


def has_wandb_credentials() -> bool:
    """Whether ``online`` could authenticate without prompting: env key, identity token or netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:  # wandb's own reader knows its netrc location rules (NETRC, ~/.netrc, ~/_netrc)
        from wandb.sdk.lib.wbauth import read_netrc_auth
        return bool(read_netrc_auth(host=host))
    except Exception:  # noqa: BLE001 - a private module may move; fall back to the standard file
        import netrc
        from urllib.parse import urlsplit
        try:
            return bool(netrc.netrc(os.environ.get("NETRC")).authenticators(urlsplit(host).netloc))
        except (OSError, netrc.NetrcParseError):
            return False


def decide_mode(cfg) -> Optional[str]:
    """The wandb mode for this job (``offline`` or ``online``), or None for no tracking at all."""
    if cfg.logger.name != "wandb":
        return None
    mode = cfg.logger.get("mode") or "offline"
    env_mode = os.environ.get("WANDB_MODE", "").lower()
    # The environment may only make tracking more conservative, never turn on uploads.
    if mode == "disabled" or env_mode == "disabled":
        return None
    if env_mode in ("offline", "dryrun"):
        mode = "offline"
    if mode == "online" and not has_wandb_credentials():
        warnings.warn("logger.mode=online but no W&B credentials (WANDB_API_KEY or `wandb login`): logging "
                      "offline instead; upload later with `wandb sync <run_dir>/wandb/offline-run-*`", stacklevel=2)
        mode = "offline"
    return mode


def wandb_settings(cfg, mode: str):
    """Quiet, fast settings: no console capture, no system-metrics sampler, no git/requirements probing.

    The sampler and machine info would otherwise poll hardware (and cloud metadata addresses) every few
    seconds; a job's results are in its record, not in those.
    """
    import wandb
    base = dict(silent=True, console="off", disable_git=True, save_code=False)
    if mode == "online":
        base["init_timeout"] = float(cfg.logger.get("init_timeout") or DEFAULT_INIT_TIMEOUT_S)
    quiet = dict(base, x_disable_stats=True, x_disable_machine_info=True, x_save_requirements=False)
    try:
        return wandb.Settings(**quiet)
    except Exception:  # noqa: BLE001 - private (x_) settings may be renamed in another wandb version
        return wandb.Settings(**base)


def start_logger(cfg, run_dir: str, record: dict[str, Any], resume_id: Optional[str] = None,
                 rank: Optional[int] = None) -> NullLogger:
    """A logger for this job: a wandb run unless tracking is off; rank 0 only (``RANK`` when not given)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    if rank != 0:
        return NullLogger()
    try:
        mode = decide_mode(cfg)
    except Exception as exc:  # noqa: BLE001
        _warn("mode selection", exc)
        return NullLogger()
    if mode is None:
        return NullLogger()
    try:
        return WandbLogger(_init(cfg, run_dir, record, resume_id, mode))
    except Exception as exc:  # noqa: BLE001
        if mode != "online":
            _warn("init", exc)
            return NullLogger()
        timeout = float(cfg.logger.get("init_timeout") or DEFAULT_INIT_TIMEOUT_S)
        warnings.warn(f"wandb online: the server did not answer within {timeout:g} s "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); logging offline "
                      f"instead, upload later with `wandb sync {run_dir}/wandb/offline-run-*` "
                      f"(logger.init_timeout sets the wait)", stacklevel=2)
    try:
        return WandbLogger(_init(cfg, run_dir, record, resume_id, "offline"))
    except Exception as exc:  # noqa: BLE001
        _warn("init", exc)
        return NullLogger()


def _init(cfg, run_dir: str, record: dict[str, Any], resume_id: Optional[str], mode: str):
    import wandb
    return wandb.init(
        project=cfg.logger.project, entity=cfg.logger.get("entity"), mode=mode,
        dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True), group=record.get("group"),
        job_type=cfg.mode.name, name=run_name(record), tags=run_tags(cfg, record),
        id=resume_id, resume="allow" if resume_id else None, reinit="finish_previous",
        settings=wandb_settings(cfg, mode))


def run_tags(cfg, record: dict[str, Any]) -> list[str]:
    """The user's ``logger.tags`` plus mode, model, method and dataset, for filtering in the web UI."""
    tags = [str(t) for t in (cfg.logger.get("tags") or [])]
    for value in (record.get("mode"), record.get("model"), record.get("method"), record.get("dataset")):
        if value and str(value) not in tags:
            tags.append(str(value))
    return tags


_TIME_DIR = re.compile(r"^\d{2}-\d{2}-\d{2}(_[\w.-]+)?$")  # <time>, or <time>_<unique suffix>


def derive_group(cfg) -> Optional[str]:
    """``group=`` if set, else the experiment preset's name, else the multirun's sweep directory.

    A report run of ``report.group=X`` joins group X, next to the runs it tabulates. The default sweep
    directory ends in ``<date>/<time>_<unique>``; the time alone would collide across days, so such a
    group is named ``<date>_<time>_<unique>``: two sweeps started in the same second get two groups.
    """
    if cfg.get("group"):
        return str(cfg.group)
    if cfg.mode.name == "report" and cfg.get("report") is not None and cfg.report.get("group"):
        return str(cfg.report.group)
    try:
        from hydra.core.hydra_config import HydraConfig
        hc = HydraConfig.get()
    except Exception:  # noqa: BLE001 - outside a Hydra app there is no group to derive
        return None
    choice = hc.runtime.choices.get("experiment")
    if choice and choice != "null":
        return str(choice)
    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        sweep = Path(os.path.normpath(str(hc.sweep.dir)))
        if _TIME_DIR.match(sweep.name) and sweep.parent.name:
            return f"{sweep.parent.name}_{sweep.name}"
        return sweep.name
    return None


# Reading an offline run back (tests, and a check before `wandb sync`). The .wandb file is a LevelDB-style
# log: a 7-byte header (":W&B", key, version), then 32 KiB blocks of chunks, each with a 7-byte header
# (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last); a record is one protobuf ``Record``.
_WANDB_HEADER = 7
_BLOCK = 32768


def _wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a .wandb file")
    pos, pending = _WANDB_HEADER, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            pending = payload
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + payload
            continue
        elif kind == 4:
            pending += payload
        else:
            continue
        record = pb.Record()
        record.ParseFromString(pending)
        pending = b""
        yield record


def _set_nested(target: dict, item) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


def read_offline_run(path: str | Path) -> dict[str, Any]:
    """What an offline run holds: id, name, group, job_type, tags, config and final summary.

    ``path`` is an ``offline-run-*`` directory or its ``run-*.wandb`` file. ``complete`` says whether the
    run's exit record is there: wandb's service process writes the file asynchronously, so right after
    ``finish()`` in the same process the tail may still be on its way (it is flushed at the latest when
    the process exits).
    """
    path = Path(path)
    if path.is_dir():
        path = next(path.glob("run-*.wandb"))
    out: dict[str, Any] = {"config": {}, "summary": {}, "complete": False}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(run_id=run.run_id, name=run.display_name, group=run.run_group, job_type=run.job_type,
                       project=run.project, tags=list(run.tags))
            for item in run.config.update:
                _set_nested(out["config"], item)
        elif kind == "config":
            for item in record.config.update:
                _set_nested(out["config"], item)
        elif kind == "summary":
            for item in record.summary.update:
                _set_nested(out["summary"], item)
        elif kind == "exit":
            out["complete"] = True
    return out
