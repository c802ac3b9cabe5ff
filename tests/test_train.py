"""mode=train: learning, checkpoints, kill-and-resume equal to an uninterrupted run, NaN handling."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import runners.train as train_runner
from runners.job import run_job
from tests.helpers import ROOT, compose_config, run_main

SHORT = ["model=resnet20", "dataset=synthetic", "dataset.train_size=512", "dataset.val_size=128",
         "batch_size=64", "logger=none", "train.progress=false", "device=cpu"]


def test_short_run_lowers_the_loss_and_checkpoints_each_epoch(tmp_path):
    # half of SHORT's images in batches of 32: the same 8 steps an epoch at half the work (measured:
    # train loss 2.41 then 1.49, best val top-1 43.8%; with 512 images of 64: 2.12, 1.12, 39.8%)
    smaller = [o for o in SHORT if not o.startswith(("dataset.train_size=", "batch_size="))]
    cfg = compose_config(smaller + ["dataset.train_size=256", "batch_size=32", "train.epochs=2",
                                    f"results_dir={tmp_path}/store"])
    record = run_job(cfg, tmp_path / "run")
    history = record["history"]
    assert record["status"] == "ok" and record["epochs"] == 2 and len(history) == 2
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert record["best_val_top1"] > 20.0  # 10 classes: chance is 10%
    assert record["peak_bytes_per_gpu"] is None and record["images_per_sec_train"] > 0  # CPU: no GPU peak
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2 and set(state) >= {"model", "optimizer", "scheduler", "scaler", "rng", "history"}
    assert json.loads((tmp_path / "run" / "history.json").read_text()) == history


@pytest.mark.slow  # the default run kills mid-epoch with workers: tests/test_faults.py::test_kill_mid_epoch_*
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    # smaller than SHORT (four steps an epoch): each epoch still takes long enough for the kill to land
    args = SHORT + ["dataset.train_size=128", "dataset.val_size=64", "batch_size=32", "train.epochs=3",
                    "method=division", "seed=3", f"results_dir={tmp_path}/store"]
    reference = run_main(args + [f"hydra.run.dir={tmp_path}/whole"])
    assert reference.returncode == 0, reference.stderr[-2000:]

    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run_dir / "checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-way: after the first epoch's checkpoint, before the end
    proc.wait()
    assert ckpt.exists() and not (run_dir / "results.json").exists(), "the run must be killed before it ends"
    assert torch.load(ckpt, weights_only=False)["epoch"] < 3

    resumed = run_main(args + [f"hydra.run.dir={run_dir}", "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    again = torch.load(ckpt, weights_only=False)
    assert again["epoch"] == whole["epoch"] == 3
    for key, value in whole["model"].items():
        assert torch.equal(value, again["model"][key]), key
    drop_timing = lambda h: [{k: v for k, v in row.items() if k not in ("epoch_train_s", "images_per_sec")}
                             for row in h]
    assert drop_timing(again["history"]) == drop_timing(whole["history"])


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    cfg = compose_config(SHORT + ["train.epochs=2", "train.max_steps_per_epoch=2", f"results_dir={tmp_path}/store"])
    real_loss = train_runner.F.cross_entropy
    calls = {"train": 0}

    def loss_that_breaks(logits, target, reduction="mean"):
        if reduction == "mean":  # training steps; evaluation sums
            calls["train"] += 1
            if calls["train"] == 3:  # first step of the second epoch
                return torch.tensor(float("nan"))
        return real_loss(logits, target, reduction=reduction)

    monkeypatch.setattr(train_runner.F, "cross_entropy", loss_that_breaks)
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoint.pt"
    with pytest.raises(train_runner.NonFiniteLossError, match=r"non-finite training loss nan .*at epoch 2, step 1 .*checkpoint .* is kept"):
        run_job(cfg, run_dir)
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "error" and "non-finite training loss" in record["error"]
    state = torch.load(ckpt, weights_only=False)
    assert state["epoch"] == 1 and len(state["history"]) == 1  # the last good one, untouched
    assert not list(run_dir.glob(".checkpoint.pt.*")), "no half-written checkpoint left behind"
