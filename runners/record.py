"""The result record: one per run, as results.json in the run directory and one Parquet row in the store.

The results store is a folder (``results_dir``) holding one Parquet file per run, so concurrent sweep
jobs never write the same file. Nested values (per-epoch history, per-layer ledger) are kept in
results.json and stored as JSON strings in Parquet, so every row has a flat, typed schema.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from .compiling import compile_mode

COMMON_FIELDS = ("run_id", "mode", "model", "dataset", "method", "block_size", "bits", "batch_size",
                 "device", "precision", "cuda_graph", "compile", "seed", "group", "status", "error", "run_dir",
                 "started_at", "duration_s")


def new_record(cfg, run_dir: str | Path, method_fields: dict[str, Any]) -> dict[str, Any]:
    """The common fields of a run, before it starts; ``method_fields`` from ``TrainingMethod.describe``."""
    return {
        "run_id": uuid.uuid4().hex[:12],
        "mode": cfg.mode.name,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "method": method_fields["method"],
        "block_size": method_fields.get("block_size"),
        "bits": method_fields.get("bits"),
        "batch_size": int(cfg.batch_size),
        "device": None,  # filled with the resolved device (cpu / cuda) when the job starts
        "precision": cfg.precision,
        "cuda_graph": bool(cfg.get("cuda_graph", False)),
        "compile": compile_mode(cfg),  # null: eager; else the torch.compile mode
        "seed": int(cfg.seed),
        "group": cfg.get("group"),
        "status": "running",
        "error": None,
        "run_dir": str(Path(run_dir).resolve()),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": None,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


def atomic_write(path: Path, write_to: Callable[[Path], Any]) -> None:
    """``write_to(tmp)`` a temporary file in the same folder, then rename it to ``path``: a crash never
    leaves half a file under ``path`` (the rename is atomic within one file system)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_to(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(record: dict[str, Any], run_dir: str | Path) -> Path:
    path = Path(run_dir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(_jsonable(record), indent=2, sort_keys=False).encode())
    return path


def to_row(record: dict[str, Any]) -> dict[str, Any]:
    """Flatten a record for Parquet: nested lists and dicts become JSON strings."""
    row = {}
    for key, value in _jsonable(record).items():
        row[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return row


def write_store_row(record: dict[str, Any], results_dir: str | Path) -> Path:
    """Add the run's row to the store: ``results_dir/<started>_<run_id>.parquet`` (written atomically)."""
    store = Path(results_dir)
    store.mkdir(parents=True, exist_ok=True)
    stamp = record["started_at"].replace(":", "").replace("-", "").replace("+0000", "Z")
    path = store / f"{stamp}_{record['run_id']}.parquet"
    table = pa.Table.from_pylist([to_row(record)])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return path


def resolve_results_dir(cfg) -> Path:
    """``results_dir`` as a path: relative paths are relative to the launch directory (under Hydra too)."""
    path = Path(cfg.results_dir)
    if path.is_absolute():
        return path
    try:
        from hydra.utils import to_absolute_path
        return Path(to_absolute_path(str(path)))
    except ValueError:  # outside a Hydra app: relative to the working directory
        return path.resolve()


def read_store(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every row of the store as a dict (JSON columns left as strings), oldest first."""
    store = Path(results_dir)
    if not store.is_dir():
        return []
    rows = []
    for path in sorted(store.glob("*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def write_record(record: dict[str, Any], run_dir: str | Path, results_dir: str | Path) -> tuple[Path, Path]:
    return write_json(record, run_dir), write_store_row(record, results_dir)
