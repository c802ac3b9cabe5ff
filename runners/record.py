"""The result record: one per run, as results.json in the run directory and one Parquet row in the store.

The results store is a folder (``results_dir``) holding one Parquet file per run, named by its run id,
so concurrent sweep jobs never write the same file and a run written twice (``resume=true`` on a
finished run) replaces its row instead of adding one. Every file is written with one declared schema,
``STORE_SCHEMA``, so standard tools read the folder as one table::

    pd.read_parquet("outputs/results")                        # pandas
    pl.read_parquet("outputs/results/*.parquet")              # polars
    duckdb.sql("FROM 'outputs/results/*.parquet'")            # DuckDB

A store may also hold its rows as text, one JSON object per line in ``records.jsonl``
(``python -m runners.record pack DIR`` turns a folder's Parquet files into it): the form of the
record sets committed under docs/records, which ``read_store_table`` (and so the report) reads like
the Parquet files.

Nested values (per-epoch history, per-layer ledger) are kept in results.json and stored as JSON strings
in Parquet. A record field the schema does not declare goes into the ``extra`` column (a JSON object)
with a warning: declare new fields in ``STORE_FIELDS`` below, the one place that lists them.
"""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import logging

import pyarrow as pa
import pyarrow.parquet as pq

from .compiling import compile_mode
log = logging.getLogger(__name__)

COMMON_FIELDS = ("run_id", "mode", "model", "dataset", "method", "block_size", "bits", "batch_size",
                 "device", "precision", "cuda_graph", "compile", "seed", "group", "status", "error", "run_dir",
                 "started_at", "duration_s", "code_version")


_JSON = pa.string()  # nested values (lists, dicts) as JSON text

# Every column of the store, in order: the common fields, then each mode's own. Add a field here.
STORE_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    # common
    ("run_id", pa.string()), ("mode", pa.string()), ("model", pa.string()), ("dataset", pa.string()),
    ("method", pa.string()), ("block_size", pa.int64()),
    ("bits", pa.float64()),          # a float: adaptive methods (acgc) report their mean width
    ("kernels", pa.string()),        # the codec's implementation: "triton" (fused kernels), "pytorch" (ops), "inductor" (compiled), null
    ("rebuild_conv_input", pa.bool_()),  # DIVISION's method.rebuild_conv_input; null for other methods
    ("recompute_norm_input", pa.bool_()),  # DIVISION's method.recompute_norm_input; null for other methods
    ("fused_norm", pa.bool_()),  # DIVISION's method.fused_norm; null for other methods
    ("attention_bits", pa.int64()),    # DIVISION's method.attention_bits (0: exact); null for other methods, without cover_all
    ("probability_bits", pa.int64()),  # DIVISION's method.probability_bits, likewise
    ("batch_size", pa.int64()), ("device", pa.string()), ("precision", pa.string()),
    ("cuda_graph", pa.bool_()),
    ("compile", pa.string()),        # torch.compile mode ("default", "reduce-overhead", ...), null: eager
    ("seed", pa.int64()), ("group", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("run_dir", pa.string()),        # relative to the launch directory when inside it (record_run_dir), else absolute
    ("started_at", pa.string()), ("duration_s", pa.float64()),
    ("code_version", pa.string()),   # the code that produced the run (code_version()): tables never mix two
    ("world_size", pa.int64()), ("wandb_run_id", pa.string()),
    # mode=memory
    ("image_size", pa.int64()), ("memory_steps", pa.int64()), ("param_bytes", pa.int64()),
    ("batch_bytes", pa.int64()), ("output_bytes", pa.int64()), ("ledger_bytes", pa.int64()),
    ("ledger_plain_bytes", pa.int64()), ("ledger_ratio", pa.float64()), ("ledger_tensors", pa.int64()),
    ("ledger_by_codec", _JSON), ("ledger_layers", _JSON), ("cuda_baseline_bytes", pa.int64()),
    ("ledger_coverage", pa.float64()), ("ledger_by_op", _JSON),
    ("ledger_parameter_copy_bytes", pa.int64()),  # parameter copies a compiled graph keeps, not in ledger_bytes
    ("model_bytes", pa.int64()), ("optimizer_state_bytes", pa.int64()), ("grad_bytes", pa.int64()),
    ("runtime_bytes", pa.int64()), ("total_bytes", pa.int64()), ("activation_bytes", pa.int64()),
    ("activation_bytes_per_image", pa.float64()), ("peak_bytes", pa.int64()),
    ("reserved_peak_bytes", pa.int64()), ("peak_bytes_max", pa.int64()), ("reserved_peak_bytes_max", pa.int64()),
    ("max_batch", pa.int64()), ("max_batch_capped", pa.bool_()),
    # mode=speed
    ("images_per_sec", pa.float64()), ("images_per_sec_per_gpu", pa.float64()),
    ("step_ms_median", pa.float64()), ("step_ms_p10", pa.float64()), ("step_ms_p90", pa.float64()),
    ("steps_timed", pa.int64()), ("warmup_steps", pa.int64()), ("timer", pa.string()), ("step_ms", _JSON),
    # mode=train
    ("epochs", pa.int64()), ("final_val_top1", pa.float64()), ("final_val_top5", pa.float64()),
    ("best_val_top1", pa.float64()), ("final_train_loss", pa.float64()), ("images_per_sec_train", pa.float64()),
    ("peak_bytes_per_gpu", pa.int64()), ("num_classes", pa.int64()), ("history", _JSON),
    # scripts/gradient_fidelity.py (mode "fidelity"): DIVISION's parameter gradients against exact backward
    ("relu_zeros", pa.bool_()), ("grad_cosine", pa.float64()), ("grad_rel_error", pa.float64()),
    ("grad_worst_cosine", pa.float64()),
    # python -m division.bench, one record per activation (mode "bench", scripts/bench_records.py)
    ("device_name", pa.string()), ("activation", pa.string()),  # "256x64x56x56 NHWC"
    ("compress_gbps", pa.float64()), ("decompress_gbps", pa.float64()), ("copy_gbps", pa.float64()),
    ("combined_of_copy", pa.float64()), ("reference_speedup", pa.float64()),
    # mode=report
    ("report_dir", pa.string()), ("report_runs", pa.int64()), ("report_files", _JSON), ("report_note", pa.string()),
    # record fields not declared above, as one JSON object (a warning names them when written)
    ("extra", _JSON),
)
STORE_SCHEMA = pa.schema([pa.field(name, kind, nullable=True) for name, kind in STORE_FIELDS])


def new_record(cfg, run_dir: str | Path, method_fields: dict[str, Any]) -> dict[str, Any]:
    """The common fields of a run, before it starts; ``method_fields`` from ``TrainingMethod.describe``.

    A report has no model, data set, method or batch of its own (the config's defaults say nothing about
    the runs it tabulates): those fields are null in its record.
    """
    record = {
        "run_id": _resumed_run_id(cfg, run_dir) or uuid.uuid4().hex[:12],
        "mode": cfg.mode.name,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "method": method_fields["method"],
        "block_size": method_fields.get("block_size"),
        "bits": method_fields.get("bits"),
        "kernels": method_fields.get("kernels"),
        "rebuild_conv_input": method_fields.get("rebuild_conv_input"),
        "recompute_norm_input": method_fields.get("recompute_norm_input"),
        "fused_norm": method_fields.get("fused_norm"),
        "attention_bits": method_fields.get("attention_bits"),
        "probability_bits": method_fields.get("probability_bits"),
        "batch_size": int(cfg.batch_size),
        "device": None,  # filled with the resolved device (cpu / cuda) when the job starts
        "precision": cfg.precision,
        "cuda_graph": bool(cfg.get("cuda_graph", False)),
        "compile": compile_mode(cfg),  # null: eager; else the torch.compile mode
        "seed": int(cfg.seed),
        "group": cfg.get("group"),
        "status": "running",
        "error": None,
        "run_dir": record_run_dir(run_dir),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": None,
        "code_version": code_version(),
    }
    if cfg.mode.name == "report":
        record.update(dict.fromkeys(("model", "dataset", "method", "block_size", "bits", "kernels",
                                     "rebuild_conv_input", "recompute_norm_input", "fused_norm", "attention_bits",
                                     "probability_bits", "batch_size")))
    return record


def launch_dir() -> Path:
    """The directory the run was started from (Hydra's original working directory; else the cwd)."""
    try:
        from hydra.utils import get_original_cwd
        return Path(get_original_cwd()).resolve()
    except (ImportError, ValueError):  # outside a Hydra app
        return Path.cwd().resolve()


def record_run_dir(run_dir: str | Path, base: str | Path | None = None) -> str:
    """``run_dir`` as records keep it: relative to ``base`` (the launch directory) when it lies inside
    it, so a record names ``outputs/runs/...`` and not the machine's own folders; else absolute.
    Readers resolve a relative one against the directory the runs were started from."""
    path = Path(run_dir)
    path = path.resolve() if path.is_absolute() else (launch_dir() / path).resolve()
    root = Path(base).resolve() if base is not None else launch_dir()
    try:
        return str(path.relative_to(root))
    except ValueError:  # outside the launch directory (hydra.run.dir=/scratch/...): absolute
        return str(path)


CODE_VERSION_ENV = "DIVISION_CODE_VERSION"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The code a run was made with. Results of two code versions never share a table
    (runners.report_tables, scripts/results_doc.py), so every record carries it. In order:
    ``$DIVISION_CODE_VERSION`` (for a copy of the code without its git history, e.g. on a GPU machine:
    set it to the checkout's ``git describe --always --dirty``), ``git describe --always --dirty`` of
    this checkout (a tag or commit, ``-dirty`` with uncommitted changes), the installed package's
    version, pyproject.toml's."""
    if os.environ.get(CODE_VERSION_ENV, "").strip():
        return os.environ[CODE_VERSION_ENV].strip()
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout, or no git: the package's version
    try:
        from importlib.metadata import PackageNotFoundError, version
        return f"v{version('division')}"
    except PackageNotFoundError:
        pass
    try:
        import tomllib
        return "v" + tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, ValueError):
        return "unknown"


def _resumed_run_id(cfg, run_dir: str | Path) -> str | None:
    """Under ``resume=true``, the run id of the earlier attempt in ``run_dir``: the resumed run is the
    same run, so its store row replaces the earlier one instead of adding a second."""
    if not cfg.get("resume"):
        return None
    try:
        return json.loads((Path(run_dir) / "results.json").read_text()).get("run_id") or None
    except (OSError, ValueError, AttributeError):
        return None


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


def _cell(value: Any, kind: pa.DataType) -> Any:
    """``value`` as a cell of a column of type ``kind``; raises TypeError / ValueError where it cannot be."""
    if value is None:
        return None
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (list, dict)):
        value = value.item()  # numpy / torch scalars
    if pa.types.is_string(kind):
        if isinstance(value, (dict, list, tuple)):
            return json.dumps(_jsonable(value))
        return value if isinstance(value, str) else str(value)
    if pa.types.is_boolean(kind):
        if not isinstance(value, bool):
            raise TypeError(f"{value!r} is not a bool")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{value!r} is not a number")
    if pa.types.is_integer(kind):
        number = float(value)
        if not number.is_integer():
            raise ValueError(f"{value!r} is not an integer")
        return int(number)
    return float(value)  # a float column keeps inf and nan as they are ("inf" strings read back)


def to_row(record: dict[str, Any]) -> dict[str, Any]:
    """The record as one row of ``STORE_SCHEMA``: every declared column (null where the record has no
    value), nested values as JSON, undeclared fields (or values of the wrong type) in ``extra``."""
    row: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, kind in STORE_FIELDS:
        if name == "extra" or name not in record:
            row[name] = None
            continue
        try:
            row[name] = _cell(record[name], kind)
        except (TypeError, ValueError, OverflowError):
            extra[name] = record[name]
            row[name] = None
    extra.update({k: v for k, v in record.items() if k not in STORE_SCHEMA.names})
    if extra:
        log.warning("record fields not in the store's schema (kept in its `extra` column; declare them in "
                    "runners.record.STORE_FIELDS): %s", ", ".join(sorted(extra)))
        row["extra"] = json.dumps(_jsonable(extra))
    return row


def store_path(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / f"{run_id}.parquet"


def write_store_row(record: dict[str, Any], results_dir: str | Path) -> Path:
    """The run's row in the store: ``results_dir/<run_id>.parquet``, written atomically with
    ``STORE_SCHEMA``. Writing a run again (a resumed run keeps its id) replaces its row."""
    store = Path(results_dir)
    store.mkdir(parents=True, exist_ok=True)
    path = store_path(store, record["run_id"])
    table = pa.Table.from_pylist([to_row(record)], schema=STORE_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    for old in store.glob(f"*_{record['run_id']}.parquet"):  # the earlier naming, <started>_<run_id>
        old.unlink(missing_ok=True)
    return path


def conform(table: pa.Table) -> pa.Table:
    """A store file of any age as ``STORE_SCHEMA``: missing columns null, types cast (an old file's
    all-null column has type null), columns the schema lacks folded into ``extra``."""
    rows = table.num_rows
    unknown = [n for n in table.column_names if n not in STORE_SCHEMA.names]
    columns = []
    for field in STORE_SCHEMA:
        if field.name == "extra" and unknown:
            old = table.column("extra").to_pylist() if "extra" in table.column_names else [None] * rows
            merged = []
            for i in range(rows):
                values = json.loads(old[i]) if old[i] else {}
                values.update({n: table.column(n)[i].as_py() for n in unknown
                               if table.column(n)[i].as_py() is not None})
                merged.append(json.dumps(_jsonable(values)) if values else None)
            columns.append(pa.array(merged, type=field.type))
        elif field.name in table.column_names:
            column = table.column(field.name)
            columns.append(column if column.type == field.type else _cast(column, field.type))
        else:
            columns.append(pa.nulls(rows, type=field.type))
    return pa.Table.from_arrays(columns, schema=STORE_SCHEMA)


def _cast(column: pa.ChunkedArray, kind: pa.DataType) -> pa.ChunkedArray | pa.Array:
    try:
        return column.cast(kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # e.g. a number stored as text: cell by cell
        cells = []
        for value in column.to_pylist():
            try:
                cells.append(_cell(value, kind))
            except (TypeError, ValueError, OverflowError):
                cells.append(None)
        return pa.array(cells, type=kind)


PACKED = "records.jsonl"  # a store's rows as text (see the module docstring)


def store_files(results_dir: str | Path) -> list[Path]:
    store = Path(results_dir)
    if not store.is_dir():
        return []
    return sorted(store.glob("*.parquet")) + ([store / PACKED] if (store / PACKED).is_file() else [])


def _read_file(path: Path) -> pa.Table:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return pa.Table.from_pylist(rows, schema=STORE_SCHEMA)
    return conform(pq.read_table(path))


def read_store_table(results_dir: str | Path) -> pa.Table:
    """The whole store as one Arrow table of ``STORE_SCHEMA``, oldest run first (old files conformed)."""
    tables = [_read_file(path) for path in store_files(results_dir)]
    table = pa.concat_tables(tables) if tables else STORE_SCHEMA.empty_table()
    return table.sort_by([("started_at", "ascending")]) if table.num_rows else table


def migrate_store(results_dir: str | Path) -> int:
    """Rewrite every file of the store that does not have ``STORE_SCHEMA`` (stores written before it
    was declared), so that pandas and polars read the folder; returns how many files were rewritten."""
    rewritten = 0
    for path in store_files(results_dir):
        if path.suffix != ".parquet":
            continue  # records.jsonl is read with the schema
        table = pq.read_table(path)
        if table.schema.remove_metadata().equals(STORE_SCHEMA):
            continue
        sink = pa.BufferOutputStream()
        pq.write_table(conform(table), sink)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        rewritten += 1
    return rewritten



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
    return read_store_table(results_dir).to_pylist()


def write_record(record: dict[str, Any], run_dir: str | Path, results_dir: str | Path) -> tuple[Path, Path]:
    return write_json(record, run_dir), write_store_row(record, results_dir)


def pack_store(results_dir: str | Path) -> int:
    """Move every row of the store into its ``records.jsonl`` (one JSON object per line, oldest
    first, one line per run id) and remove its Parquet files; returns how many rows it holds."""
    store = Path(results_dir)
    rows = {row["run_id"]: row for row in read_store_table(store).to_pylist()}  # a later file wins
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows.values())
    atomic_write_bytes(store / PACKED, text.encode())
    for path in store.glob("*.parquet"):
        path.unlink()
    return len(rows)


if __name__ == "__main__":  # python -m runners.record migrate|pack outputs/results
    import sys
    if len(sys.argv) != 3 or sys.argv[1] not in ("migrate", "pack"):
        sys.exit("usage: python -m runners.record migrate|pack RESULTS_DIR")
    if sys.argv[1] == "migrate":
        print(f"{migrate_store(sys.argv[2])} file(s) rewritten with the store's schema")
    else:
        print(f"{pack_store(sys.argv[2])} row(s) in {Path(sys.argv[2]) / PACKED}")
