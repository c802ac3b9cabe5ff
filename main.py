"""The single entry point: ``python main.py [overrides]`` (``-m`` for sweeps). See README.md.

Several processes: ``torchrun --nproc_per_node=N main.py [overrides]`` trains with DDP (runners/distributed.py).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from runners import distributed
from runners.checks import ConfigError
from runners.job import run_job
from runners.launcher import check_launcher
from runners.summary import print_summary

log = logging.getLogger("main")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        record = run_job(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        sys.exit(2)
    if distributed.is_main():
        print_summary(record)


if __name__ == "__main__":
    check_launcher(sys.argv[1:])  # e.g. hydra/launcher=slurm without its plugin: how to install it
    # Under torchrun all ranks must agree on one run directory before Hydra composes it.
    sys.argv = distributed.pin_output_dir(sys.argv, Path(__file__).resolve().parent / "conf")
    try:
        main()
    finally:
        distributed.shutdown()
