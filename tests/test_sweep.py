"""Sweeps end to end (a 2 x 2 multirun of tiny memory jobs, then mode=report over its store), the
experiment presets and the SLURM launcher config."""
from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from PIL import Image

from runners.tracking import read_offline_run
from tests.helpers import run_together

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PRESETS = ("paper_memory", "paper_speed", "cifar10_resnet18", "block_bits", "debug")


def main_py(args: list[str], env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def sweep_env(tmp_path, monkeypatch) -> dict:
    """wandb's directories in tmp for this process and the subprocesses; WANDB_MODE unset, so logger.mode applies."""
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "RANK"):
        monkeypatch.delenv(var, raising=False)
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_block_size_by_bits_multirun_then_report(tmp_path, sweep_env):
    sweep, store = tmp_path / "sweep", tmp_path / "store"
    main = [sys.executable, str(ROOT / "main.py")]
    proc = main_py(["-m", "mode=memory", "model=resnet20", "dataset=synthetic", "batch_size=4", "memory.steps=1",
                    "method.block_size=4,8", "method.bits=2,4", "logger.mode=offline", f"hydra.sweep.dir={sweep}",
                    f"results_dir={store}"], sweep_env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # The sweep says which group its runs are in and how to report them, ready to paste.
    assert f"report: python main.py mode=report report.group=sweep results_dir={store}" in proc.stdout
    assert "memory | resnet20 on synthetic | method division (B=4, Q=2) | batch 4 | cpu fp32 | status ok" in proc.stdout

    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(records) == 4
    grid = {(r["block_size"], r["bits"]) for r in records}
    assert grid == set(itertools.product((4, 8), (2, 4)))
    assert all(r["status"] == "ok" and r["mode"] == "memory" and r["ledger_ratio"] > 1 for r in records)
    assert {r["group"] for r in records} == {"sweep"}  # a multirun without group= is grouped by its directory

    rows = [row for path in store.glob("*.parquet") for row in pq.read_table(path).to_pylist()]
    assert len(rows) == 4 and {(r["block_size"], r["bits"]) for r in rows} == grid

    for r in records:
        offline = list((Path(r["run_dir"]) / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, r["run_dir"]
        run = read_offline_run(offline[0])
        assert run["complete"]  # the job's process has exited, so wandb has flushed the whole run
        assert run["run_id"] == r["wandb_run_id"] and run["group"] == "sweep" and run["job_type"] == "memory"
        assert (run["config"]["method"]["block_size"], run["config"]["method"]["bits"]) == (r["block_size"], r["bits"])
        assert run["summary"]["run_id"] == r["run_id"] and run["summary"]["status"] == "ok"
        assert run["summary"]["ledger_ratio"] == pytest.approx(r["ledger_ratio"])

    # Three reports of the store, none reading what another writes (a report run's own store row is
    # left out of every report): started together.
    out, filtered = tmp_path / "report", tmp_path / "filtered"
    misspelt, proc, proc_filtered = run_together(
        [main + ["mode=report", f"results_dir={store}", "report.group=swep", f"hydra.run.dir={tmp_path}/x",
                 "logger=none"],
         main + ["mode=report", f"results_dir={store}", f"hydra.run.dir={out}", "logger.mode=offline"],
         main + ["mode=report", f"results_dir={store}", f"hydra.run.dir={filtered}", "logger=none",
                 "report.where=\"bits == 4 and block_size >= 4\"", "report.formats=[md,csv]"]],
        envs=[sweep_env] * 3, timeout=240)
    said = misspelt.stdout + misspelt.stderr
    assert misspelt.returncode == 2 and "Traceback" not in said
    assert "report.group='swep': no run of the store" in said and "its groups: sweep" in said

    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["report_runs"] == 4 and result["report_dir"] == str(out)
    text = (out / "report.md").read_text()
    for b, q in grid:
        assert f"| division B{b} Q{q} |" in text
    for r in records:
        assert r["run_id"] in text
    pngs = [out / name for name in result["report_files"] if name.endswith(".png")]
    assert pngs and any(p.name.startswith("sweep_memory") for p in pngs)
    for path in pngs:
        with Image.open(path) as image:
            image.verify()
    page = (out / "dashboard.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert 'id="run-count">4 runs<' in page and "division B8 Q4" in page
    report_run = read_offline_run(next((out / "wandb").glob("offline-run-*")))
    assert report_run["job_type"] == "report" and "report/runs" in report_run["summary"]

    assert proc_filtered.returncode == 0, proc_filtered.stderr[-3000:]
    result = json.loads((filtered / "results.json").read_text())
    assert result["report_runs"] == 2 and not any(f.endswith(".png") for f in result["report_files"])
    text = (filtered / "report.md").read_text()
    assert "division B4 Q4" in text and "division B4 Q2" not in text


# --- presets ------------------------------------------------------------------------------------------

def compose_preset(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def sweep_size(params) -> int:
    parser = OverridesParser.create()
    sizes = [len(list(parser.parse_override(f"{k}={v}").sweep_iterator())) for k, v in (params or {}).items()]
    return math.prod(sizes)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_compose_with_experiment_override(name):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert yaml.safe_load(text)["group"] == name
    cfg = compose_preset([f"experiment={name}"])
    assert cfg.hydra.runtime.choices.experiment == name


def test_run_directories_are_named_for_what_they_hold():
    report = compose_preset(["mode=report", "report.group=paper_memory"])
    unique = r"_\d+-[0-9a-f]{4}$"  # runners/rundir.py: no two runs share a folder
    assert re.search("_report-paper_memory" + unique, report.hydra.run.dir)
    assert re.search("_report-all" + unique, compose_preset(["mode=report"]).hydra.run.dir)
    memory = compose_preset(["mode=memory", "model=resnet18", "method=blpa"])
    assert re.search("_memory_resnet18_blpa" + unique, memory.hydra.run.dir)
    assert OmegaConf.to_container(memory.hydra.sweep)["subdir"] == "${hydra.job.num}_${mode.run_name}"
    assert memory.mode.run_name == "memory_resnet18_blpa"


def test_plus_experiment_is_refused_because_the_defaults_list_has_experiment():
    with pytest.raises(Exception, match="Multiple values for experiment"):
        compose_preset(["+experiment=debug"])


def test_preset_grids():
    expected = {"paper_memory": ("memory", 56), "paper_speed": ("speed", 56), "cifar10_resnet18": ("train", 7),
                "block_bits": ("memory", 16), "debug": ("train", 1)}
    for name, (mode, jobs) in expected.items():
        cfg = compose_preset([f"experiment={name}"])
        assert cfg.mode.name == mode, name
        assert sweep_size(cfg.hydra.sweeper.params) == jobs, name
    memory = compose_preset(["experiment=paper_memory"])
    assert (memory.dataset.image_size, memory.dataset.num_classes) == (224, 1000)
    params = memory.hydra.sweeper.params
    assert params.model == "resnet50,wrn50_2" and params.batch_size == "64,128,256,512"
    assert params.method.split(",") == ["none", "checkpoint", "swap", "blpa", "acgc", "actnn", "division"]


def test_preset_sweeps_compose_for_every_method_that_exists():
    """Each job of a preset's sweep composes: the preset with each method option present in conf/method."""
    present = {p.stem for p in (CONF / "method").glob("*.yaml")}
    methods = compose_preset(["experiment=paper_memory"]).hydra.sweeper.params.method.split(",")
    for method in sorted(present & set(methods)):
        cfg = compose_preset(["experiment=paper_memory", f"method={method}", "model=wrn50_2", "batch_size=512"])
        assert (cfg.method.name, cfg.model.name, cfg.batch_size) == (method, "wrn50_2", 512)


def test_preset_values_override_the_primary_config():
    """A preset's own values must win over conf/config.yaml's (lightning-hydra-template order)."""
    defaults = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    order = [next(iter(d)) if isinstance(d, dict) else d for d in defaults]
    assert order.index("_self_") < order.index("experiment"), (
        "conf/config.yaml lists `_self_` after `experiment: null`, so config.yaml's own keys (batch_size, "
        "precision, channels_last, group, train.*, memory.*, speed.*) shadow every preset's: move `- _self_` "
        "above `- experiment: null` in the defaults list")
    speed = compose_preset(["experiment=paper_speed"])
    assert (speed.precision, speed.channels_last, speed.group) == ("bf16", True, "paper_speed")
    cifar = compose_preset(["experiment=cifar10_resnet18"])
    assert (cifar.batch_size, cifar.train.epochs, cifar.train.lr, cifar.train.weight_decay) == (256, 100, 0.1, 5e-4)
    assert cifar.dataset.name == "imagefolder" and cifar.model.name == "resnet18"
    debug = compose_preset(["experiment=debug"])
    assert (debug.train.max_steps_per_epoch, debug.train.epochs, debug.logger.name) == (2, 1, "none")
    assert compose_preset(["experiment=block_bits"]).batch_size == 256


# --- SLURM --------------------------------------------------------------------------------------------

def test_slurm_launcher_config_extends_the_plugin():
    conf = yaml.safe_load((CONF / "hydra" / "launcher" / "slurm.yaml").read_text())
    assert conf["defaults"] == ["submitit_slurm", "_self_"]
    assert (CONF / "hydra" / "launcher" / "slurm.yaml").read_text().startswith("# @package hydra.launcher")


def has_submitit_plugin() -> bool:
    try:  # hydra_plugins is a namespace package that only exists once some plugin is installed
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not has_submitit_plugin(),
                    reason="hydra-submitit-launcher not installed (optional: pip install hydra-submitit-launcher)")
def test_slurm_launcher_composes_with_the_plugin():
    cfg = compose_preset(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "experiment=block_bits"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert sweep_size(cfg.hydra.sweeper.params) == 16


SLURM_OPTIONS = ("slurm", "submitit_slurm")


@pytest.fixture(scope="module")
def without_the_plugin() -> dict:
    """main.py -m with each SLURM launcher option, both started together: option -> its result."""
    procs = run_together([[sys.executable, str(ROOT / "main.py"), "-m", f"hydra/launcher={option}", "logger=none"]
                          for option in SLURM_OPTIONS], timeout=240)
    return dict(zip(SLURM_OPTIONS, procs))


@pytest.mark.skipif(has_submitit_plugin(), reason="the plugin is installed: nothing to explain")
@pytest.mark.parametrize("option", SLURM_OPTIONS)
def test_slurm_launcher_without_the_plugin_says_how_to_install_it(option, without_the_plugin):
    proc = without_the_plugin[option]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"hydra/launcher={option} needs the hydra-submitit-launcher plugin" in proc.stderr
    assert "pip install hydra-submitit-launcher" in proc.stderr


def test_launcher_check_leaves_other_launchers_alone():
    from runners.launcher import missing_plugin
    assert missing_plugin(["-m", "hydra/launcher=basic", "model=resnet18"]) is None
    assert missing_plugin(["mode=memory"]) is None
