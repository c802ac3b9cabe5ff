"""The configuration interface: every group option composes, bad values stop with a clear message."""
from __future__ import annotations

import re

import pytest
import torch

from runners.build import build_data
from runners.checks import ConfigError, validate
from runners.job import run_job
from tests.helpers import compose_config, group_options, run_mains

GROUPS = ("model", "dataset", "method", "mode", "logger")


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(group):
    options = group_options(group)
    assert options, f"conf/{group} has no options"
    for option in options:
        cfg = compose_config([f"{group}={option}"])
        # model=torchvision takes any torchvision model by model.name (resnet18 unless given)
        assert cfg[group].name == option or cfg[group].get("source") == option


def test_defaults_are_the_embedded_cpu_job():
    cfg = compose_config([])
    assert (cfg.model.name, cfg.dataset.name, cfg.method.name, cfg.mode.name) == \
        ("resnet20", "synthetic", "division", "train")
    assert (cfg.method.block_size, cfg.method.bits) == (8, 2)
    assert cfg.logger.mode == "offline"
    assert cfg.results_dir.startswith("outputs/")
    validate(cfg)


def test_experiment_presets_compose_into_valid_configs():
    for preset in group_options("experiment"):
        cfg = compose_config([f"experiment={preset}"])
        assert cfg.group == preset, preset  # the preset's own values were applied
        validate(cfg)  # and none of them is a value a job would refuse


@pytest.mark.parametrize("override, key, allowed", [
    ("method.bits=3", "method.bits", "1, 2, 4, 8"),
    ("method.bits=16", "method.bits", "1, 2, 4, 8"),
    ("method.block_size=0", "method.block_size", ">= 1"),
    ("batch_size=0", "batch_size", ">= 1"),
    ("precision=fp64", "precision", "fp32, bf16 or fp16"),
    ("device=tpu", "device", "auto, cpu or cuda"),
    ("train.eval_every=0", "train.eval_every", ">= 1"),
    ("method.side_stream=sometimes", "method.side_stream", "auto, true or false"),
    ("method.prefetch_decode=1", "method.prefetch_decode", "auto, true or false"),
    ("method.prefetch_ahead=0", "method.prefetch_ahead", "integer >= 1"),
    ("method.attention_bits=3", "method.attention_bits", "use 0 (exact) or one of 1, 2, 4, 8"),
    ("method.probability_bits=16", "method.probability_bits", "use 0 (exact) or one of 1, 2, 4, 8"),
    ("method.relu_zeros=maybe", "method.relu_zeros", "true or false"),
    ("method.norm_from_codes=2", "method.norm_from_codes", "true or false"),
    ("method.rebuild_conv_input=maybe", "method.rebuild_conv_input", "true or false"),
    ("method.fused_norm=1", "method.fused_norm", "true or false"),
])
def test_bad_values_are_rejected_with_key_value_and_allowed(override, key, allowed, tmp_path):
    cfg = compose_config([override, f"results_dir={tmp_path}/store", "logger=none"])
    with pytest.raises(ConfigError) as info:
        run_job(cfg, tmp_path / "run")
    message = str(info.value)
    value = override.split("=", 1)[1]
    assert re.search(rf"{re.escape(key)}='?{re.escape(value)}'? is not allowed", message), message
    assert allowed in message
    assert not (tmp_path / "store").exists(), "nothing may be written before validation passes"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_rejected(tmp_path):
    cfg = compose_config(["device=cuda", "logger=none"])
    with pytest.raises(ConfigError, match="device='cuda'.*CUDA is not available"):
        validate(cfg)


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict:
    """The two main.py jobs of the tests below, each refused at its configuration, started together."""
    tmp_path = tmp_path_factory.mktemp("refused")
    procs = run_mains([["method.bits=3", f"hydra.run.dir={tmp_path}/bits/run", f"results_dir={tmp_path}/bits/store",
                        "logger=none"],
                       ["model=resnet9000", f"hydra.run.dir={tmp_path}/model/run"]])
    return dict(zip(("bits", "model"), procs))


def test_main_exits_with_clear_message_on_bad_bits(refused):
    proc = refused["bits"]
    assert proc.returncode == 2
    assert "method.bits=3" in proc.stderr + proc.stdout
    assert "1, 2, 4, 8" in proc.stderr + proc.stdout


def test_unknown_group_option_lists_the_available_ones(refused):
    proc = refused["model"]
    assert proc.returncode != 0
    out = proc.stderr + proc.stdout
    assert "resnet9000" in out and "resnet20" in out and "resnet50" in out


def test_lmdb_without_a_root_names_the_key():
    cfg = compose_config(["dataset=lmdb", "logger=none"])  # conf/dataset/lmdb.yaml: root: ??? (no default)
    with pytest.raises(ValueError, match=r"no data folder given; set dataset\.root="):
        build_data(cfg, torch.device("cpu"))


def test_num_workers_auto_follows_the_cores_this_process_may_use():
    import os

    from runners.build import AUTO_WORKERS_MAX, dataset_kwargs
    cfg = compose_config(["dataset=cifar10", "dataset.root=/nowhere"])
    assert cfg.dataset.num_workers == "auto"
    assert dataset_kwargs(cfg)["num_workers"] == min(len(os.sched_getaffinity(0)), AUTO_WORKERS_MAX)
    assert dataset_kwargs(compose_config(["dataset=cifar10", "dataset.num_workers=3"]))["num_workers"] == 3
    with pytest.raises(ConfigError, match="dataset.num_workers"):
        validate(compose_config(["dataset=cifar10", "dataset.num_workers=many"]))
