"""The embedded default job, end to end in a subprocess, and the record it writes."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from runners.record import COMMON_FIELDS
from tests.helpers import run_main


def test_default_job_trains_and_writes_its_record(tmp_path):
    run_dir, store = tmp_path / "run", tmp_path / "store"
    # The default job, shortened: two steps of one epoch on a smaller synthetic set.
    proc = run_main([f"hydra.run.dir={run_dir}", f"results_dir={store}", "train.epochs=1",
                     "train.max_steps_per_epoch=2", "dataset.train_size=256", "dataset.val_size=128",
                     "train.progress=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    for field in COMMON_FIELDS:
        assert field in record, field
    assert record["status"] == "ok" and record["mode"] == "train" and record["method"] == "division"
    assert (record["block_size"], record["bits"], record["device"]) == (8, 2, "cpu")
    assert record["epochs"] == 1 and 0.0 <= record["final_val_top1"] <= 100.0
    assert record["ledger_plain_bytes"] > 5 * record["ledger_bytes"] > 0
    assert (run_dir / "checkpoint.pt").exists()
    # The summary the user sees names the accuracy and the bytes kept vs plain autograd.
    assert "val top-1" in proc.stdout and "plain autograd" in proc.stdout
    # Exactly one store row, equal to results.json (nested fields are JSON strings in Parquet).
    files = list(store.glob("*.parquet"))
    assert len(files) == 1
    row = pq.read_table(files[0]).to_pylist()[0]
    for key, value in record.items():
        stored = json.loads(row[key]) if isinstance(value, (list, dict)) else row[key]
        assert stored == value, key
    # The offline wandb run lives inside the run directory.
    assert list((run_dir / "wandb").glob("offline-run-*")), "offline wandb run missing"


def test_method_none_has_null_block_and_bits(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_main([f"hydra.run.dir={run_dir}", f"results_dir={tmp_path}/store", "method=none", "logger=none",
                     "train.epochs=1", "train.max_steps_per_epoch=1", "dataset.train_size=128", "dataset.val_size=64",
                     "train.progress=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["method"] == "none" and record["block_size"] is None and record["bits"] is None
    assert record["ledger_ratio"] == 1.0


def test_redirected_output_gets_log_lines_not_a_progress_bar(tmp_path):
    proc = run_main([f"hydra.run.dir={tmp_path}/run", f"results_dir={tmp_path}/store", "logger=none",
                     "train.epochs=1", "train.max_steps_per_epoch=3", "train.log_every=1", "dataset.train_size=96",
                     "dataset.val_size=32", "batch_size=16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "\r" not in said and "it/s" not in said  # no bar redrawn into a file
    for step in (1, 2, 3):
        assert f"epoch 1/1 step {step}/3 loss " in said
