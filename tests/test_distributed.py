"""Training on several processes: torchrun + DDP on CPU (Gloo), end to end through main.py.

The end-to-end tests start ``python -m torch.distributed.run --nproc_per_node=2 --standalone main.py``
in a subprocess, exactly as a user would, with a tiny job (ResNet-20, 48 synthetic images, 3 steps of
8 images per process and epoch). The opt-in GPU test at the end needs two GPUs (``pytest -m gpu``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from data import DeviceLoader, build_datasets, build_loaders
from division import ByteLedger
from runners import distributed
from runners.build import build_method, build_model
from runners.checks import ConfigError
from runners.train import set_loader_epoch
from tests.helpers import ROOT, compose_config, run_together

TINY = ["logger=none", "train.progress=false", "dataset.train_size=48", "dataset.val_size=20",
        "train.max_steps_per_epoch=3"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE")


def launch_command(args: list[str], nproc: int = 2, script: Path = ROOT / "main.py") -> list[str]:
    """``script args`` under torchrun with ``nproc`` processes (nproc=0: plain python, one process)."""
    runner = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"] if nproc else []
    return [sys.executable, *runner, str(script), *args]


def launch_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # torchrun's per-process default, for both
    return env


def launch(args: list[str], cwd: Path, nproc: int = 2, script: Path = ROOT / "main.py",
           timeout: int = 180) -> subprocess.CompletedProcess:
    """``script args`` under torchrun with ``nproc`` processes (nproc=0: plain python, one process)."""
    proc = subprocess.run(launch_command(args, nproc, script), cwd=cwd, env=launch_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]  # every rank exited 0
    return proc


def store_rows(store: Path) -> list[dict]:
    return [pq.read_table(path).to_pylist()[0] for path in sorted(store.glob("*.parquet"))]


# ------------------------------------------------------------------------------- end to end
def test_two_processes_train_division_into_one_run_and_resume(tmp_path):
    store = tmp_path / "store"
    # No hydra.run.dir: both ranks must still land in one directory under ./outputs/runs.
    launch([*TINY, f"results_dir={store}", "train.epochs=2", "batch_size=8"], cwd=tmp_path)
    run_dirs = [p for p in (tmp_path / "outputs" / "runs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert len(list(tmp_path.rglob("results.json"))) == 1
    assert len(list(tmp_path.rglob("checkpoint.pt"))) == 1 and (run_dir / "checkpoint.pt").exists()
    assert len(list(tmp_path.rglob(".hydra"))) == 1  # rank 1 writes none
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "ok" and record["world_size"] == 2 and record["method"] == "division"
    first, second = record["history"]
    assert first["train_images"] == second["train_images"] == 3 * 8 * 2  # steps x batch x ranks
    assert second["train_loss"] < first["train_loss"]
    # The compressor's hooks on the inner model kept working under the DDP wrapper.
    assert record["ledger_ratio"] > 5
    rows = store_rows(store)
    assert len(rows) == 1 and rows[0]["world_size"] == 2 and rows[0]["run_id"] == record["run_id"]
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert len(checkpoint["rng_by_rank"]) == 2
    assert not any(key.startswith("module.") for key in checkpoint["model"])  # loadable without DDP

    # Resume under DDP: both ranks load the checkpoint and train the third epoch.
    launch([*TINY, f"results_dir={store}", "train.epochs=3", "batch_size=8", f"hydra.run.dir={run_dir}",
            "resume=true"], cwd=tmp_path)
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["status"] == "ok" and resumed["epochs"] == 3
    assert resumed["history"][:2] == record["history"]
    # The resumed run is the same run: its row is replaced, not joined by a second one.
    assert [(row["world_size"], row["run_id"], row["epochs"]) for row in store_rows(store)] == \
        [(2, record["run_id"], 3)]


PER_SAMPLE_NORM_MAIN = '''
"""main.py with every BatchNorm2d of the model replaced by GroupNorm, a per-sample normalisation."""
import runpy, sys
sys.path.insert(0, {root!r})
from torch import nn
import runners.build as build

def to_group_norm(module):
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        else:
            to_group_norm(child)
    return module

real = build._build_model
build._build_model = lambda name, num_classes: to_group_norm(real(name, num_classes=num_classes))
sys.argv[0] = {main!r}
runpy.run_path({main!r}, run_name="__main__")
'''


def test_two_processes_follow_one_process_with_the_global_batch(tmp_path):
    """DDP with 2 x 4 images takes the steps one process takes with 8.

    BatchNorm would normalise each rank's 4 images by their own statistics, not the 8 images' (the
    difference is the model's, not DDP's); SyncBatchNorm would fix that, but torch runs it on GPUs
    only. So the model here normalises per sample (GroupNorm), which makes the two runs the same
    computation; and method=none, since DIVISION's stochastic rounding draws differ per rank.
    """
    script = tmp_path / "per_sample_norm_main.py"
    script.write_text(PER_SAMPLE_NORM_MAIN.format(root=str(ROOT), main=str(ROOT / "main.py")))
    job = [*TINY, "method=none", "train.epochs=2", "train.lr=0.02", f"results_dir={tmp_path}/store"]
    # the two runs are independent: started together
    for proc in run_together([launch_command([*job, "batch_size=4", f"hydra.run.dir={tmp_path}/ddp"], script=script),
                              launch_command([*job, "batch_size=8", f"hydra.run.dir={tmp_path}/single"], nproc=0,
                                             script=script)],
                             cwd=tmp_path, envs=[launch_env()] * 2, timeout=180):
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]  # every rank exited 0
    ddp, single = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("ddp", "single"))
    assert (ddp["world_size"], single["world_size"]) == (2, 1)
    for ours, reference in zip(ddp["history"], single["history"], strict=True):
        assert ours["train_images"] == reference["train_images"] == 24
        for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr"):
            assert ours[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key
    weights = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["model"]
               for name in ("ddp", "single")]
    for key, value in weights[1].items():
        assert torch.allclose(weights[0][key].float(), value.float(), atol=1e-4), key


@pytest.mark.slow  # two torchrun processes start (13 s); the two training tests above launch them too
def test_speed_under_torchrun_reports_the_aggregate(tmp_path):
    launch(["logger=none", "mode=speed", "speed.warmup=1", "speed.steps=3", "batch_size=8",
            f"hydra.run.dir={tmp_path}/run", f"results_dir={tmp_path}/store"], cwd=tmp_path)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "ok" and record["world_size"] == 2
    assert record["images_per_sec_per_gpu"] == pytest.approx(8 / (record["step_ms_median"] / 1000))
    # the sum over two ranks of their own images/s: more than rank 0's alone
    assert record["images_per_sec"] > record["images_per_sec_per_gpu"]
    assert len(store_rows(tmp_path / "store")) == 1


# ---------------------------------------------------------------------------------- in process
def _sync_bn_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)}


def _one_training_forward(model: nn.Module) -> None:
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()


def test_sync_bn_inputs_go_through_the_codec():
    """SyncBatchNorm is made before the method is attached, so its saved input is compressed.

    Without a process group SyncBatchNorm computes as BatchNorm, but it is the same module class that
    DDP trains, and the hooks only look at the modules.
    """
    cfg = compose_config(["method=division", "train.sync_bn=true", "logger=none"])
    torch.manual_seed(0)
    ledger = ByteLedger()
    model = distributed.attach_method(build_model(cfg, 10, torch.device("cpu")), build_method(cfg), ledger,
                                      sync_bn=True)
    names = _sync_bn_names(model)
    assert len(names) == 19  # every BatchNorm of ResNet-20
    _one_training_forward(model)
    compressed = {e.layer for e in ledger.entries if e.kind == "norm" and e.codec == "division"}
    assert compressed == names

    # The other order, the original DIVISION code's: the new modules carry no hooks of their own. With
    # cover_all (the default) the rule for any save still compresses their inputs, under their parents'
    # names; without it the 19 inputs stay raw.
    for cover_all, raw_inputs in ((True, 0), (False, 19)):
        late = ByteLedger()
        late_cfg = compose_config(["method=division", f"method.cover_all={cover_all}", "logger=none"])
        model = build_method(late_cfg).attach(build_model(late_cfg, 10, torch.device("cpu")), ledger=late)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        _one_training_forward(model)
        assert not {e.layer for e in late.entries} & _sync_bn_names(model)
        assert sum(e.codec == "raw" and len(e.shape) == 4 for e in late.entries) == raw_inputs


def test_one_process_is_untouched(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    cfg = compose_config(["method=none", "train.sync_bn=true", "logger=none"])
    model = build_model(cfg, 10, torch.device("cpu"))
    assert distributed.prepare_model(model, build_method(cfg), cfg, torch.device("cpu")) is model
    assert not _sync_bn_names(model)  # sync_bn means nothing without other ranks
    argv = ["main.py", "mode=train"]
    assert distributed.pin_output_dir(argv, ROOT / "conf") == argv
    assert distributed.setup(cfg, torch.device("cpu")) == torch.device("cpu")
    assert (distributed.rank(), distributed.world_size(), distributed.sum_over_ranks(2, 3)) == (0, 1, [2.0, 3.0])


def test_sync_bn_on_cpu_under_torchrun_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = compose_config(["train.sync_bn=true", "device=cpu", "logger=none"])
    with pytest.raises(ConfigError, match="train.sync_bn=true.*GPUs only"):
        distributed.setup(cfg, torch.device("cpu"))


@pytest.mark.parametrize("path", ["outputs/runs/2026-01-02/03-04-05_train_resnet20_division",
                                  "/tmp/a dir, with 'quotes'/x", "ends with a backslash\\"])
def test_pinned_directory_survives_hydra_parsing(path):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    override = OverridesParser.create().parse_override(f"hydra.run.dir={distributed._quoted(path)}")
    assert override.value() == path and not override.is_sweep_override()


def _epoch_batches(loader, seed: int, epoch: int, rank: int) -> list[torch.Tensor]:
    set_loader_epoch(loader, seed, epoch, rank)
    return [labels for _, labels in loader]


@pytest.mark.parametrize("on_device", [False, True])
def test_ranks_share_the_single_process_batches(on_device):
    """The k-th batches of 4 images of ranks 0 and 1 make up the one-process k-th batch of 8, every epoch."""
    train, val, _ = build_datasets("synthetic", train_size=40, val_size=11)
    for dataset in (train, val):  # labels that name the images
        dataset.labels = torch.arange(len(dataset))
        dataset.targets = dataset.labels.tolist()
    whole, _ = build_loaders(train, val, 8, on_device=on_device, seed=3)
    shards = [build_loaders(train, val, 4, on_device=on_device, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert isinstance(whole, DeviceLoader if on_device else DataLoader)
    for epoch in (0, 1):
        reference = _epoch_batches(whole, 3, epoch, 0)
        per_rank = [_epoch_batches(train_loader, 3, epoch, r) for r, (train_loader, _) in enumerate(shards)]
        assert len(per_rank[0]) == len(per_rank[1]) == len(reference) == 5
        for k, batch in enumerate(reference):
            assert sorted(torch.cat([per_rank[0][k], per_rank[1][k]]).tolist()) == sorted(batch.tolist())
    assert not torch.equal(torch.cat(_epoch_batches(whole, 3, 0, 0)), torch.cat(_epoch_batches(whole, 3, 1, 0)))
    # Validation: every image on exactly one rank, none twice.
    seen = sorted(label for _, val_loader in shards for _, labels in val_loader for label in labels.tolist())
    assert seen == list(range(11))


def test_device_loader_pads_uneven_training_shards():
    images, labels = torch.zeros(5, 3, 8, 8, dtype=torch.uint8), torch.arange(5)
    loaders = [DeviceLoader(images, labels, 2, shuffle=True, rank=r, world_size=2, seed=r, order_seed=0)
               for r in (0, 1)]
    shards = [torch.cat([y for _, y in loader]) for loader in loaders]
    assert [len(s) for s in shards] == [3, 3] and len(loaders[0]) == len(loaders[1]) == 2
    assert set(torch.cat(shards).tolist()) == set(range(5))  # one image twice: the padding


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_sync_bn_under_nccl_keeps_its_inputs_compressed(tmp_path):
    launch(["logger=none", "mode=memory", "device=cuda", "train.sync_bn=true", "batch_size=32",
            f"hydra.run.dir={tmp_path}/run", f"results_dir={tmp_path}/store"], cwd=tmp_path)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "ok" and record["world_size"] == 2 and record["device"] == "cuda"
    norms = [row for row in record["ledger_layers"] if row["kind"] == "norm" and row["plain_bytes"]]
    assert len(norms) == 19
    assert all(row["stored_bytes"] * 4 < row["plain_bytes"] for row in norms)
    assert record["peak_bytes_max"] >= record["peak_bytes"] > 0
