"""Faults on purpose, as a careless user or a bad day would make them: bad config values, jobs started
together, kills, divergence, unwritable outputs, damaged data files, a tracker that cannot be reached.

Each test asserts that the fault is named (key and value, or the file), that user errors end without a
traceback, and that nothing already written is lost or overwritten. Everything runs on the CPU on tiny
data; a few cases go through main.py in a subprocess, the rest call the functions directly.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import runners.train as train_runner
from data.errors import CorruptDataError, DataError
from data.folder2lmdb import LMDBRecordError, convert_split
from data.loaders import EpochSampler, SeededSamples
from runners.checkpoint import load_checkpoint, remove_stale_temp_files, rng_state, save_checkpoint
from runners.checks import ConfigError, OutputError, validate
from runners.job import error_message, run_job, write_config_error_record
from tests.helpers import ROOT, compose_config, run_main, run_mains

COMMON = ["model=resnet20", "batch_size=8", "logger=none", "train.progress=false", "device=cpu", "train.epochs=1",
          "train.max_steps_per_epoch=2"]
TINY = ["dataset=synthetic", "dataset.train_size=32", "dataset.val_size=16"] + COMMON


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


# main.py jobs that end within seconds of starting (a refused value, missing or damaged data, tiny
# sweeps): mostly Python and torch starting up, one core each. They are independent, so the first
# test that needs one starts those of every selected test together (``quick_jobs``); each test's
# function below makes its jobs' arguments in a folder of its own and returns them.
QUICK_JOBS: dict = {}  # test name -> function(folder, request) -> main.py argument lists


def quick_jobs_of(test_name: str):
    def register(make):
        QUICK_JOBS[test_name] = make
        return make
    return register


@pytest.fixture(scope="module")
def quick_jobs(request, tmp_path_factory) -> dict:
    """test name -> (its folder, its jobs' finished processes), for the selected tests."""
    names = sorted({item.originalname for item in request.session.items
                    if item.module.__name__ == __name__ and item.originalname in QUICK_JOBS})
    folders = {name: tmp_path_factory.mktemp(name[5:30]) for name in names}
    jobs = [(name, args) for name in names for args in QUICK_JOBS[name](folders[name], request)]
    procs = run_mains([args for _, args in jobs])
    return {name: (folders[name], [proc for (job, _), proc in zip(jobs, procs) if job == name]) for name in names}


def make_jpeg_folder(root: Path, per_class: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """root/<split>/c0, c1 with small random JPEGs (``per_class``: split -> images per class)."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for c in range(2):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
                pixels[..., c] //= 3  # a class cue
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return root


# ------------------------------------------------------------------------------- bad config values
# (override, key as named in the message, a piece of what is allowed)
BAD_INPUTS = [
    ("seed=abc", "seed", "integer"),
    ("seed=1.5", "seed", "integer"),
    ("seed=-1", "seed", "from 0"),
    ("train.lr=-0.1", "train.lr", "> 0"),
    ("train.lr=0", "train.lr", "> 0"),
    ("train.lr=fast", "train.lr", "number"),
    ("train.momentum=-1", "train.momentum", ">= 0"),
    ("train.weight_decay=-0.5", "train.weight_decay", ">= 0"),
    ("train.nesterov=yes", "train.nesterov", "true or false"),
    ("method.bits=2.0", "method.bits", "1, 2, 4, 8"),
    ("method.bits=3", "method.bits", "1, 2, 4, 8"),
    ("method.bits=true", "method.bits", "1, 2, 4, 8"),
    ("method.block_size=2.5", "method.block_size", "integer >= 1"),
    ("train.epochs=1.5", "train.epochs", "integer >= 1"),
    ("train.epochs=0", "train.epochs", "integer >= 1"),
    ("train.warmup_epochs=-1", "train.warmup_epochs", "integer >= 0"),
    ("train.max_steps_per_epoch=0", "train.max_steps_per_epoch", "null or an integer >= 1"),
    ("train.eval_every=0", "train.eval_every", ">= 1"),
    ("train.log_every=-1", "train.log_every", ">= 0"),
    ("dataset.image_size=0", "dataset.image_size", "integer >= 1"),
    ("dataset.num_classes=0", "dataset.num_classes", "integer >= 1"),
    ("dataset.num_workers=-2", "dataset.num_workers", "integer >= 0"),
    ("dataset.train_size=0", "dataset.train_size", "integer >= 1"),
    ("dataset.on_device=sometimes", "dataset.on_device", "auto, true or false"),
    ("channels_last=maybe", "channels_last", "true or false"),
    ("resume=maybe", "resume", "true or false"),
    ("cuda_graph=yes", "cuda_graph", "true or false"),
    ("batch_size=0", "batch_size", "integer >= 1"),
    ("batch_size=8.5", "batch_size", "integer >= 1"),
    ("precision=fp64", "precision", "fp32, bf16 or fp16"),
    ("device=tpu", "device", "auto, cpu or cuda"),
    ("method.rounding=up", "method.rounding", "stochastic or nearest"),
    ("method.backend=cuda", "method.backend", "auto, torch or triton"),
    ("method.keep_lfc=1", "method.keep_lfc", "true or false"),
    ("method=checkpoint method.segments=0", "method.segments", "integer >= 1"),
    ("method=actnn method.group_size=0", "method.group_size", "integer >= 1"),
    ("method=acgc method.error_bound=0", "method.error_bound", "> 0"),
    ("memory.steps=0", "memory.steps", "integer >= 1"),
    ("speed.warmup=-1", "speed.warmup", "integer >= 0"),
    ("logger.mode=loud", "logger.mode", "offline, online or disabled"),
    ("logger.init_timeout=0", "logger.init_timeout", "> 0"),
    ("report.formats=[md,pdf]", "report.formats", "md, csv, png, html"),
    ("results_dir=''", "results_dir", "non-empty"),
    ("+method.bit=4", "method.bit", "did you mean method.bits?"),
    ("+train.learning_rate=0.1", "train.learning_rate", "not a configuration key"),
    ("+trian.lr=0.1", "trian.lr", "did you mean train.lr?"),
    ("+sead=1", "sead", "did you mean seed?"),
    ("compile=maybe", "compile", "default, reduce-overhead, max-autotune-no-cudagraphs"),
    ("report.include_errors=sometimes", "report.include_errors", "true or false"),
]
if not torch.cuda.is_available():
    BAD_INPUTS += [
        ("method.backend=triton", "method.backend", "need CUDA"),
        ("cuda_graph=true", "cuda_graph", "needs a CUDA device"),
        ("mode=speed cuda_graph=true", "cuda_graph", "needs a CUDA device"),
    ]


@pytest.mark.parametrize("overrides, key, allowed", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_every_bad_value_is_refused_naming_key_value_and_what_is_allowed(overrides, key, allowed):
    cfg = compose_config(["logger=wandb"] + overrides.split())
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert message.startswith(f"{key}="), message  # the key first, then its value
    value = overrides.split()[-1].split("=", 1)[1].strip("'")
    if not value.startswith("["):
        assert value in message, message
    assert "is not allowed" in message and allowed in message, message


def test_good_values_of_the_same_keys_pass():
    for overrides in (["seed=7", "train.lr=1", "train.momentum=0", "method.bits=4", "train.warmup_epochs=1",
                       "dataset.num_classes=null", "channels_last=true", "resume=false", "train.epochs=2"],
                      ["method=checkpoint", "method.segments=2"], ["compile=true"], ["compile=reduce-overhead"],
                      ["experiment=debug"], ["mode=report", "report.formats=[md,csv]"]):
        validate(compose_config(overrides))


@quick_jobs_of("test_main_refuses_bad_values_with_one_line_and_exit_2")
def _bad_value_jobs(tmp_path, _):
    return [[bad, f"hydra.run.dir={tmp_path}/run{i}", f"results_dir={tmp_path}/store", "logger=none"]
            for i, bad in enumerate(("seed=abc", "+method.bit=4"))]


def test_main_refuses_bad_values_with_one_line_and_exit_2(quick_jobs):
    tmp_path, procs = quick_jobs["test_main_refuses_bad_values_with_one_line_and_exit_2"]
    assert len(procs) == 2
    for proc in procs:
        assert proc.returncode == 2, proc.stderr[-2000:]
        out = proc.stdout + proc.stderr
        assert "configuration error: " in out and ("seed='abc'" in out or "did you mean method.bits" in out), out
        no_traceback(proc)
    assert not (tmp_path / "store").exists(), "nothing may be written before the config is valid"


@quick_jobs_of("test_missing_dataset_folder_is_named_without_a_traceback")
def _missing_dataset_jobs(tmp_path, _):
    return [["dataset=imagefolder", f"dataset.root={tmp_path / 'no-such-data'}", "dataset.num_workers=0",
             f"hydra.run.dir={tmp_path}/run", f"results_dir={tmp_path}/store"] + COMMON]


def test_missing_dataset_folder_is_named_without_a_traceback(quick_jobs):
    tmp_path, (proc,) = quick_jobs["test_missing_dataset_folder_is_named_without_a_traceback"]
    missing = tmp_path / "no-such-data"
    assert proc.returncode == 1
    assert str(missing) in proc.stdout + proc.stderr and "dataset.root=" in proc.stdout + proc.stderr
    no_traceback(proc)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "error" and str(missing) in record["error"]


# ------------------------------------------------------------------------------- sweeps
@quick_jobs_of("test_a_bad_job_of_a_sweep_is_its_error_record_and_the_others_run")
def _sweep_with_a_bad_job(tmp_path, _):
    return [["-m", "mode=memory", "batch_size=2", "memory.steps=1", "method.bits=3,2", "logger=none",
             f"hydra.sweep.dir={tmp_path / 'sweep'}", f"results_dir={tmp_path / 'store'}"]]


def test_a_bad_job_of_a_sweep_is_its_error_record_and_the_others_run(quick_jobs):
    tmp_path, (proc,) = quick_jobs["test_a_bad_job_of_a_sweep_is_its_error_record_and_the_others_run"]
    sweep, store = tmp_path / "sweep", tmp_path / "store"
    assert proc.returncode == 2, proc.stderr[-2000:]  # a refused config: the sweep's status says so
    no_traceback(proc)
    records = {r["bits"]: r for r in (json.loads(p.read_text()) for p in sweep.glob("*/results.json"))}
    assert records[3]["status"] == "error" and "method.bits=3 is not allowed" in records[3]["error"]
    assert records[2]["status"] == "ok" and records[2]["ledger_ratio"] > 1  # job 1 ran after job 0 failed
    rows = [row for path in store.glob("*.parquet") for row in pq.read_table(path).to_pylist()]
    assert sorted(r["status"] for r in rows) == ["error", "ok"]


@quick_jobs_of("test_a_sweep_job_that_does_not_compose_is_its_error_record")
def _sweep_with_jobs_that_do_not_compose(tmp_path, _):
    # job 0: no such model; job 1: method=none has no rounding key; job 2 runs
    return [["-m", "model=resnet9000,resnet20", "method=none,division", "method.rounding=nearest",
             "mode=memory", "batch_size=2", "memory.steps=1", "logger=none", f"hydra.sweep.dir={tmp_path / 'sweep'}",
             f"results_dir={tmp_path / 'store'}"]]


def test_a_sweep_job_that_does_not_compose_is_its_error_record(quick_jobs):
    tmp_path, (proc,) = quick_jobs["test_a_sweep_job_that_does_not_compose_is_its_error_record"]
    sweep, store = tmp_path / "sweep", tmp_path / "store"
    assert proc.returncode == 2, proc.stderr[-2000:]
    no_traceback(proc)
    records = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert sorted(records) == ["0_config_error", "1_config_error", "2_config_error", "3_memory_resnet20_division"]
    assert "Could not find 'model/resnet9000'" in records["0_config_error"]["error"]
    assert records["3_memory_resnet20_division"]["status"] == "ok"
    assert {r["status"] for name, r in records.items() if "config_error" in name} == {"error"}
    rows = [row for path in store.glob("*.parquet") for row in pq.read_table(path).to_pylist()]
    assert sorted(r["status"] for r in rows) == ["error", "error", "error", "ok"]


def test_an_error_record_never_overwrites_another_runs_record(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text('{"run_id": "earlier"}')
    cfg = compose_config(TINY + [f"results_dir={tmp_path}/store"])
    assert write_config_error_record(cfg, run_dir, OutputError("hydra.run.dir=... is not allowed")) is None
    assert json.loads((run_dir / "results.json").read_text()) == {"run_id": "earlier"}
    rows = [r for p in (tmp_path / "store").glob("*.parquet") for r in pq.read_table(p).to_pylist()]
    assert [r["status"] for r in rows] == ["error"] and rows[0]["seed"] == 0


# ------------------------------------------------------------------------------- concurrent jobs
def test_concurrent_jobs_and_sweeps_get_their_own_folders_and_groups(tmp_path):
    """Four runs and two sweeps started together, with the default folder names (cwd = tmp_path)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # six processes on a small runner
    main = [sys.executable, str(ROOT / "main.py")]
    runs = [subprocess.Popen(main + TINY + [f"seed={seed}", "train.max_steps_per_epoch=1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for seed in range(4)]
    sweeps = [subprocess.Popen(main + ["-m", "mode=memory", "batch_size=2", "memory.steps=1", "logger=none",
                                       f"seed={seed}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for seed in (10, 11)]
    for proc in runs + sweeps:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "outputs" / "runs").glob("*/*/results.json")]
    assert len(records) == 4 and sorted(r["seed"] for r in records) == [0, 1, 2, 3]
    assert len({r["run_dir"] for r in records}) == 4
    for record in records:  # each folder holds its own run, end to end
        assert record["run_dir"].startswith("outputs/runs/")  # relative to the launch directory
        assert Path(record["run_dir"]).name.endswith(tuple("0123456789abcdef"))
        state = load_checkpoint(tmp_path / record["run_dir"] / "checkpoint.pt")
        assert state["history"] == [{k: v for k, v in h.items()} for h in record["history"]]
    swept = [json.loads(p.read_text()) for p in (tmp_path / "outputs" / "multirun").glob("*/*/*/results.json")]
    assert sorted(r["seed"] for r in swept) == [10, 11]
    assert len({Path(r["run_dir"]).parent for r in swept}) == 2, "two sweeps, two sweep folders"
    assert len({r["group"] for r in swept}) == 2, "two sweeps, two default groups"
    rows = [row for p in (tmp_path / "outputs" / "results").glob("*.parquet") for row in pq.read_table(p).to_pylist()]
    assert len(rows) == 6
    by_dir = {r["run_dir"]: r for r in records + swept}
    for row in rows:  # every store row points at the folder that holds that very run
        assert by_dir[row["run_dir"]]["run_id"] == row["run_id"]


def test_a_new_run_never_writes_into_a_folder_holding_another_run(tmp_path):
    cfg = compose_config(TINY + [f"results_dir={tmp_path}/store"])
    first = run_job(cfg, tmp_path / "run")
    before = (tmp_path / "run" / "results.json").read_bytes()
    with pytest.raises(OutputError, match=r"already holds another run .*resume=true"):
        run_job(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "results.json").read_bytes() == before
    assert json.loads(before)["run_id"] == first["run_id"]


# ------------------------------------------------------------------------------- unwritable outputs
def test_unwritable_results_store_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = compose_config(TINY + [f"results_dir={blocker}/store"])
    started = time.perf_counter()
    with pytest.raises(OutputError) as info:
        run_job(cfg, tmp_path / "run")
    message = str(info.value)
    assert f"results_dir='{blocker}/store'" in message and "not writable" in message and "set results_dir=" in message
    assert time.perf_counter() - started < 5  # before any data, model or training
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_results_store_fails_before_training(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o500)
    try:
        with pytest.raises(OutputError, match=r"results_dir=.*not writable"):
            run_job(compose_config(TINY + [f"results_dir={store}"]), tmp_path / "run")
    finally:
        store.chmod(0o700)


# ------------------------------------------------------------------------------- non-finite values
def test_non_finite_buffer_stops_the_run_and_the_kept_checkpoint_is_finite(tmp_path, monkeypatch):
    cfg = compose_config(TINY + ["train.epochs=3", f"results_dir={tmp_path}/store"])
    real_evaluate = train_runner.evaluate
    calls = []

    def evaluate_after_breaking(model, loader, device, cfg):
        calls.append(1)
        if len(calls) == 2:  # epoch 2: BatchNorm's running variance overflows
            model.bn1.running_var.fill_(float("inf"))
        return real_evaluate(model, loader, device, cfg)

    monkeypatch.setattr(train_runner, "evaluate", evaluate_after_breaking)
    run_dir = tmp_path / "run"
    with pytest.raises(train_runner.NonFiniteError, match=r"after epoch 2.*buffer bn1\.running_var.*inf.*epoch 1\) is kept"):
        run_job(cfg, run_dir)
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "error" and "bn1.running_var" in record["error"]
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len(json.loads((run_dir / "history.json").read_text())) == 1


def test_nan_validation_loss_stops_the_run(tmp_path, monkeypatch):
    cfg = compose_config(TINY + ["train.epochs=2", f"results_dir={tmp_path}/store"])
    real_evaluate = train_runner.evaluate

    def nan_loss(*args):
        out = real_evaluate(*args)
        return {**out, "val_loss": float("nan")}

    monkeypatch.setattr(train_runner, "evaluate", nan_loss)
    with pytest.raises(train_runner.NonFiniteError, match=r"after epoch 1.*val loss nan.*no checkpoint was written"):
        run_job(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "error"


def test_huge_learning_rate_ends_in_error_and_leaves_no_non_finite_checkpoint(tmp_path):
    # lr=30, one step per epoch: every training loss is finite (the step-wise check never fires), but the
    # weights it leaves give a NaN validation loss (here after epoch 2, with epoch 1's checkpoint kept)
    cfg = compose_config(TINY + ["train.epochs=3", "train.max_steps_per_epoch=1", "train.lr=30",
                                 "method=none", f"results_dir={tmp_path}/store"])
    with pytest.raises(train_runner.NonFiniteError, match=r"non-finite values after epoch \d"):
        run_job(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "error"
    ckpt = tmp_path / "run" / "checkpoint.pt"
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        assert state["epoch"] < 3
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
        assert all(math.isfinite(h["val_loss"]) for h in state["history"])


# ------------------------------------------------------------------------------- checkpoints
def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".checkpoint.pt.{dead_pid}.tmp"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f".checkpoint.pt.{os.getpid()}.tmp"
    live.write_bytes(b"y")
    other = tmp_path / "keep.tmp"
    other.write_bytes(b"z")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_checkpoints_load_weights_only_and_restore_numpy_rng(tmp_path):
    np.random.seed(5)
    state = {"rng": rng_state(), "model": {"w": torch.ones(2)}, "history": [{"epoch": 1, "loss": 0.5}]}
    expected = np.random.rand(3)
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    assert not list(tmp_path.glob(".*.tmp"))
    torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # no custom class inside
    from runners.checkpoint import restore_rng
    np.random.seed(0)
    restore_rng(load_checkpoint(tmp_path / "checkpoint.pt")["rng"])
    assert np.array_equal(np.random.rand(3), expected)
    # A checkpoint of the previous format (NumPy's state as an array) still loads, weights_only.
    old = {"rng": {**state["rng"], "numpy": np.random.get_state()}}
    torch.save(old, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["rng"]["numpy"][0] == "MT19937"


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "bad": Unpicklable()})
    assert load_checkpoint(path) == {"epoch": 1}
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------- resume with workers
def test_augmentation_does_not_depend_on_workers():
    from torch.utils.data import DataLoader, TensorDataset

    class Noisy(TensorDataset):
        def __getitem__(self, i):
            return self.tensors[0][i] + torch.rand(1), i

    base = Noisy(torch.arange(12.0))

    def epoch_batches(workers, epoch, persistent):
        sampler = EpochSampler(range(12))
        loader = DataLoader(SeededSamples(base, seed=3), batch_size=4, sampler=sampler, num_workers=workers,
                            persistent_workers=persistent)
        out = []
        for e in range(epoch + 1):
            sampler.set_epoch(e)
            out = [b[0] for b in loader]
        return torch.cat(out)

    reference = epoch_batches(0, 1, False)
    assert torch.equal(epoch_batches(2, 1, True), reference)  # persistent workers, second epoch
    assert not torch.equal(epoch_batches(0, 0, False), reference)  # another epoch, other draws
    before = torch.get_rng_state()
    SeededSamples(base, seed=3)[(0, 1)]
    assert torch.equal(torch.get_rng_state(), before)  # the process's own generator untouched


def test_kill_mid_epoch_and_resume_with_workers_matches_the_uninterrupted_run(tmp_path):
    data = make_jpeg_folder(tmp_path / "jpeg", {"train": 16, "val": 4})
    args = ["model=resnet20", "dataset=imagefolder", f"dataset.root={data}", "dataset.num_workers=2", "dataset.num_classes=2",
            "batch_size=8", "train.epochs=2", "logger=none", "train.progress=false", "device=cpu", "seed=4",
            "method=division", f"results_dir={tmp_path}/store"]
    whole = run_main(args + [f"hydra.run.dir={tmp_path}/whole"])
    assert whole.returncode == 0, whole.stderr[-2000:]
    run_dir = tmp_path / "killed"
    killed = run_main(args + [f"hydra.run.dir={run_dir}"], DIVISION_TEST_KILL_AT_STEP="6")  # epoch 2, step 2 of 4
    assert killed.returncode == -9 and not (run_dir / "results.json").exists()
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 1
    resumed = run_main(args + [f"hydra.run.dir={run_dir}", "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    b = load_checkpoint(run_dir / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] == 8
    differing = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert differing == []
    timing = ("epoch_train_s", "images_per_sec")
    strip = lambda h: [{k: v for k, v in row.items() if k not in timing} for row in h]
    assert strip(a["history"]) == strip(b["history"])


# ------------------------------------------------------------------------------- damaged data
@pytest.fixture(scope="module")
def lmdb_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmdb")
    folder = make_jpeg_folder(root / "jpeg", {"train": 12, "val": 4})
    for split in ("train", "val"):
        convert_split(folder, split, root / "db", commit_every=4)
    return root / "db"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@quick_jobs_of("test_truncated_lmdb_is_an_error_record_not_a_sigbus")
def _truncated_lmdb_jobs(tmp_path, request):
    db = _copy(request.getfixturevalue("lmdb_data"), tmp_path / "db")
    data_file = db / "train.lmdb" / "data.mdb"
    os.truncate(data_file, data_file.stat().st_size // 2)
    return [["dataset=lmdb", f"dataset.root={db}", "dataset.num_workers=0", "dataset.num_classes=2",
             f"hydra.run.dir={tmp_path}/run", f"results_dir={tmp_path}/store"] + COMMON]


def test_truncated_lmdb_is_an_error_record_not_a_sigbus(quick_jobs):
    tmp_path, (proc,) = quick_jobs["test_truncated_lmdb_is_an_error_record_not_a_sigbus"]
    data_file = tmp_path / "db" / "train.lmdb" / "data.mdb"
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # not -7 (SIGBUS)
    assert f"{data_file} is truncated" in proc.stdout + proc.stderr
    no_traceback(proc)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "error" and "truncated" in record["error"]


def test_garbled_lmdb_pages_name_the_database(tmp_path, lmdb_data):
    db = _copy(lmdb_data, tmp_path / "db")
    data_file = db / "train.lmdb" / "data.mdb"
    size = data_file.stat().st_size
    rng = np.random.default_rng(1)
    with open(data_file, "r+b") as handle:  # every page but the two meta pages
        handle.seek(2 * 4096)
        handle.write(rng.integers(0, 256, size - 2 * 4096, dtype=np.uint8).tobytes())
    cfg = compose_config(["dataset=lmdb", f"dataset.root={db}", "dataset.num_workers=0", "dataset.num_classes=2",
                          f"results_dir={tmp_path}/store"] + COMMON)
    with pytest.raises((DataError, LMDBRecordError)) as info:
        run_job(cfg, tmp_path / "run")
    assert str(db / "train.lmdb") in str(info.value)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "error" and str(db / "train.lmdb") in record["error"]


@quick_jobs_of("test_truncated_jpeg_names_the_file_through_the_workers")
def _truncated_jpeg_jobs(tmp_path, _):
    data = make_jpeg_folder(tmp_path / "jpeg", {"train": 8, "val": 4})
    victim = data / "train" / "c1" / "005.jpg"
    victim.write_bytes(victim.read_bytes()[:300])
    return [["dataset=imagefolder", f"dataset.root={data}", "dataset.num_workers=2", "dataset.num_classes=2",
             f"hydra.run.dir={tmp_path}/run", f"results_dir={tmp_path}/store"] + COMMON
            + ["train.max_steps_per_epoch=null"]]


def test_truncated_jpeg_names_the_file_through_the_workers(quick_jobs):
    tmp_path, (proc,) = quick_jobs["test_truncated_jpeg_names_the_file_through_the_workers"]
    victim = tmp_path / "jpeg" / "train" / "c1" / "005.jpg"
    assert proc.returncode == 1, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert f"cannot read the image {victim}" in out and "truncated" in out, out[-2000:]
    no_traceback(proc)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "error" and str(victim) in record["error"] and "Traceback" not in record["error"]


def test_worker_error_message_loses_the_worker_traceback():
    wrapped = CorruptDataError("Caught CorruptDataError in DataLoader worker process 1.\nOriginal Traceback "
                               "(most recent call last):\n  File \"x.py\", line 1, in f\n"
                               "data.errors.CorruptDataError: cannot read the image /d/a.jpg (OSError: x)\n")
    assert error_message(wrapped) == "cannot read the image /d/a.jpg (OSError: x)"
    assert error_message(ValueError("plain")) == "plain"


# ------------------------------------------------------------------------------- tracker offline
def test_unreachable_wandb_server_falls_back_to_offline_within_seconds(tmp_path):
    code = (
        "import sys, time, warnings; sys.path.insert(0, sys.argv[1])\n"
        "from tests.helpers import compose_config\n"
        "from runners.tracking import start_logger\n"
        "cfg = compose_config(['logger.mode=online', 'logger.init_timeout=2'])\n"
        "t = time.perf_counter()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    logger = start_logger(cfg, sys.argv[2], {'mode': 'train', 'model': 'm', 'method': 'x', 'batch_size': 1, 'seed': 0})\n"
        "print('waited', round(time.perf_counter() - t, 2))\n"
        "print('run', logger.run_id)\n"
        "print('warned', any('logging offline instead' in str(w.message) for w in caught))\n"
        "logger.log({'a': 1.0}, step=1); logger.finish()\n")
    env = {**os.environ, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "f" * 40}
    env.pop("WANDB_MODE", None)
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    waited = float(re.search(r"waited ([\d.]+)", proc.stdout).group(1))
    assert waited < 10, proc.stdout
    assert "run None" not in proc.stdout and "warned True" in proc.stdout, proc.stdout
    assert list((tmp_path / "wandb").glob("offline-run-*")), "the run is tracked offline"
