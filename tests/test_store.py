"""The results store: one declared schema, so pandas, polars and DuckDB read a store of mixed runs as one
table; old files still read; a run written twice keeps one row."""
from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir

import runners.job as job
from runners.record import (STORE_SCHEMA, migrate_store, read_store, read_store_table, record_run_dir, to_row,
                            write_record, write_store_row)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose_job(tmp: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["model=resnet20", "dataset=synthetic", "batch_size=4", "logger=none",
                                            "device=cpu", f"results_dir={tmp}/store", *overrides])


def failing_runner(exc: BaseException):
    def run(cfg, env):
        raise exc
    return lambda mode: run


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory) -> Path:
    """Real jobs of every mode and outcome, written by the job as main.py runs it."""
    tmp = tmp_path_factory.mktemp("store")
    for name, overrides in (("memory", ["mode=memory", "memory.steps=1"]),
                            ("speed", ["mode=speed", "speed.warmup=0", "speed.steps=1", "method=blpa"]),
                            ("train", ["mode=train", "train.epochs=1", "train.max_steps_per_epoch=1",
                                       "dataset.train_size=16", "dataset.val_size=8", "train.progress=false",
                                       "method=none"]),
                            ("report", ["mode=report", "report.formats=[md]"])):
        assert job.run_job(compose_job(tmp, *overrides), tmp / name)["status"] == "ok"
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(job, "_runner", failing_runner(torch.OutOfMemoryError("CUDA out of memory (injected)")))
        assert job.run_job(compose_job(tmp, "mode=memory", "method=actnn"), tmp / "oom")["status"] == "oom"
        mp.setattr(job, "_runner", failing_runner(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            job.run_job(compose_job(tmp, "mode=speed", "method=none"), tmp / "error")
    finally:
        mp.undo()
    return tmp / "store"


def test_every_file_has_the_declared_schema_and_no_undeclared_field(mixed_store):
    files = sorted(mixed_store.glob("*.parquet"))
    assert len(files) == 6
    for path in files:
        table = pq.read_table(path)
        assert table.schema.remove_metadata().equals(STORE_SCHEMA), path.name
        assert table.column("extra").to_pylist() == [None], "a record field missing from STORE_FIELDS"


def test_pandas_polars_and_duckdb_read_mixed_runs_as_one_table(mixed_store):
    frame = pd.read_parquet(mixed_store)
    assert len(frame) == 6 and list(frame.columns) == STORE_SCHEMA.names
    assert sorted(frame["mode"]) == ["memory", "memory", "report", "speed", "speed", "train"]
    assert sorted(frame["status"]) == ["error", "ok", "ok", "ok", "ok", "oom"]
    report = frame[frame["mode"] == "report"].iloc[0]  # a report has no model or method of its own
    assert report[["model", "method", "batch_size"]].isna().all()

    lazy = pl.read_parquet(str(mixed_store / "*.parquet"))
    assert lazy.shape == (6, len(STORE_SCHEMA))
    assert lazy.filter(pl.col("mode") == "speed")["images_per_sec"].drop_nulls().len() == 1

    con = duckdb.connect()
    counts = con.sql(f"SELECT mode, status, count(*) FROM '{mixed_store}/*.parquet' GROUP BY ALL ORDER BY ALL").fetchall()
    assert counts == [("memory", "ok", 1), ("memory", "oom", 1), ("report", "ok", 1), ("speed", "error", 1),
                      ("speed", "ok", 1), ("train", "ok", 1)]
    history = con.sql(f"SELECT history FROM '{mixed_store}/*.parquet' WHERE mode = 'train'").fetchall()[0][0]
    assert json.loads(history)[0]["epoch"] == 1  # nested values are JSON text


def test_old_files_still_read_and_migrate(tmp_path, mixed_store):
    """A file written before the schema was declared (types from its own values, an all-null column
    typed null, a column since dropped) reads as the schema; migrate rewrites it so pandas reads the folder."""
    store = tmp_path / "store"
    store.mkdir()
    for path in mixed_store.glob("*.parquet"):
        (store / path.name).write_bytes(path.read_bytes())
    old = {"run_id": "old000000001", "mode": "memory", "model": "resnet50", "method": "division", "block_size": 8,
           "bits": 2, "batch_size": 64, "cuda_graph": False, "group": None, "status": "ok", "error": None,
           "started_at": "2025-01-01T00:00:00+00:00", "ledger_bytes": 1024, "retired_field": 7}
    pq.write_table(pa.Table.from_pylist([old]), store / "00000000T000000Z_old000000001.parquet")
    assert pq.read_table(store / "00000000T000000Z_old000000001.parquet").schema.field("group").type == pa.null()
    with pytest.raises(Exception):  # noqa: B017 - what users hit when such a file is listed first
        pd.read_parquet(store)
    table = read_store_table(store)
    assert table.schema.equals(STORE_SCHEMA) and table.num_rows == 7
    row = table.to_pylist()[0]  # the oldest first
    assert (row["run_id"], row["bits"], row["ledger_bytes"], row["images_per_sec"]) == ("old000000001", 2.0, 1024, None)
    assert json.loads(row["extra"]) == {"retired_field": 7}
    assert migrate_store(store) == 1 and migrate_store(store) == 0
    assert len(pd.read_parquet(store)) == 7


def test_a_run_written_again_replaces_its_row(tmp_path):
    store = tmp_path / "store"
    record = {"run_id": "abc123", "mode": "train", "status": "error", "started_at": "2026-01-01T00:00:00+00:00",
              "epochs": 1}
    pq.write_table(pa.Table.from_pylist([record]), store.mkdir() or store / "20260101T000000Z_abc123.parquet")
    write_record(record, tmp_path / "run", store)
    write_store_row({**record, "status": "ok", "epochs": 3}, store)
    rows = read_store(store)
    assert [(r["run_id"], r["status"], r["epochs"]) for r in rows] == [("abc123", "ok", 3)]
    assert [p.name for p in store.glob("*.parquet")] == ["abc123.parquet"]


def test_resume_on_a_finished_run_adds_no_second_row(tmp_path):
    overrides = ["mode=train", "train.epochs=1", "train.max_steps_per_epoch=1", "dataset.train_size=16",
                 "dataset.val_size=8", "train.progress=false", "method=none"]
    first = job.run_job(compose_job(tmp_path, *overrides), tmp_path / "run")
    again = job.run_job(compose_job(tmp_path, *overrides, "resume=true"), tmp_path / "run")
    assert again["run_id"] == first["run_id"]
    rows = read_store(tmp_path / "store")
    assert len(rows) == 1 and rows[0]["run_id"] == first["run_id"]
    other = job.run_job(compose_job(tmp_path, *overrides), tmp_path / "other")  # a new run: a new row
    assert other["run_id"] != first["run_id"] and len(read_store(tmp_path / "store")) == 2


def test_values_of_another_type_go_to_extra_not_into_a_new_column_type():
    row = to_row({"run_id": "x", "batch_size": 64, "bits": 2.5, "ledger_ratio": float("inf"),
                  "block_size": "eight", "history": [{"epoch": 1}], "new_field": 1})
    assert (row["batch_size"], row["bits"], row["ledger_ratio"], row["block_size"]) == (64, 2.5, float("inf"), None)
    assert json.loads(row["history"]) == [{"epoch": 1}]
    assert json.loads(row["extra"]) == {"block_size": "eight", "new_field": 1}
    assert set(row) == set(STORE_SCHEMA.names)


def test_run_dir_is_recorded_relative_to_the_launch_directory(tmp_path, monkeypatch):
    """Records name outputs/runs/..., not the machine's own folders (docs/records are committed);
    a run folder outside the launch directory stays absolute, so a reader can always find it."""
    launch = tmp_path / "launch"
    launch.mkdir()
    monkeypatch.chdir(launch)
    assert record_run_dir(launch / "outputs" / "runs" / "a") == "outputs/runs/a"
    assert record_run_dir("outputs/runs/b") == "outputs/runs/b"
    assert record_run_dir(tmp_path / "elsewhere") == str((tmp_path / "elsewhere").resolve())
    record = job.run_job(compose_job(tmp_path, "mode=memory", "memory.steps=1"), launch / "outputs" / "runs" / "m")
    assert record["run_dir"] == "outputs/runs/m"
    assert (launch / record["run_dir"] / "results.json").exists()
    assert [row["run_dir"] for row in read_store(tmp_path / "store")] == ["outputs/runs/m"]


def test_a_packed_store_reads_as_its_parquet_files_did(tmp_path):
    """``pack`` moves a store's rows into records.jsonl (the text form committed under docs/records):
    the same table, NaN and nulls included, no Parquet file left; a store may hold both forms."""
    import math
    from runners.record import PACKED, pack_store, store_files, write_store_row
    rows = [dict(run_id=f"r{i}", mode="speed", model="resnet18", method="none", status="ok", group="g",
                 started_at=f"2026-01-01T00:00:0{i}", images_per_sec=float("nan") if i else 123.5)
            for i in range(3)]
    for row in rows:
        write_store_row(row, tmp_path)
    before = read_store(tmp_path)
    assert pack_store(tmp_path) == 3
    assert store_files(tmp_path) == [tmp_path / PACKED]
    after = read_store(tmp_path)
    assert [r["run_id"] for r in after] == ["r0", "r1", "r2"]
    for a, b in zip(before, after):
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) for k in a)
    write_store_row(dict(rows[0], run_id="r3", started_at="2026-01-01T00:00:09"), tmp_path)
    assert [r["run_id"] for r in read_store(tmp_path)] == ["r0", "r1", "r2", "r3"]


def test_a_report_over_a_packed_record_set_adds_nothing_to_it(tmp_path):
    """docs/records/SET holds measurements only: ``mode=report results_dir=docs/records/SET`` keeps
    its own record in its run folder; over an ordinary store it adds its row as before."""
    from runners.job import run_job
    from runners.record import PACKED, pack_store, write_record
    from tests.helpers import compose_config

    packed, plain = tmp_path / "packed", tmp_path / "plain"
    for store in (packed, plain):
        for method in ("none", "division"):
            write_record({"run_id": f"{method}-{store.name}", "mode": "memory", "method": method,
                          "model": "resnet20", "status": "ok", "started_at": "2026-01-01T00:00:00"},
                         tmp_path / "runs" / method, store)
    pack_store(packed)
    before = (packed / PACKED).read_bytes()
    for store in (packed, plain):
        cfg = compose_config(["mode=report", f"results_dir={store}", "logger=none", "device=cpu"])
        record = run_job(cfg, tmp_path / f"report-{store.name}")
        assert record["status"] == "ok"
        assert (tmp_path / f"report-{store.name}" / "results.json").is_file()
    assert (packed / PACKED).read_bytes() == before and not list(packed.glob("*.parquet"))
    assert len(list(plain.glob("*.parquet"))) == 3  # the two runs and the report
