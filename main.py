"""The single entry point: ``python main.py [overrides]`` (``-m`` for sweeps). See README.md.

Several processes: ``torchrun --nproc_per_node=N main.py [overrides]`` trains with DDP (runners/distributed.py).

Errors about the user's input are printed as one message, without a traceback: a refused
configuration (``configuration error: ...``, exit status 2) and bad data or a diverging run
(``error: ...``, exit status 1; the job's record says status error). In a sweep (``-m``) such an
error ends only its own job, which gets an error record, and the other jobs run (a job whose overrides
do not even compose too: hydra_plugins/division_launcher); the sweep then exits with 2 if any job's
configuration was refused, else 1 if any job failed, else 0.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runners import distributed
from runners.checks import ConfigError
from runners.job import FAILED_JOBS, error_message, run_job, user_errors, write_config_error_record
from runners.launcher import check_launcher
from runners.rundir import register_resolvers
from runners.summary import print_summary

log = logging.getLogger("main")
register_resolvers()  # ${unique:} in the run and sweep folder names, before Hydra composes them

EXIT_CONFIG, EXIT_FAILED = 2, 1


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    run_dir = hc.runtime.output_dir
    job = f"job {hc.job.num}: " if sweep else ""
    try:
        record = run_job(cfg, run_dir)
    except ConfigError as exc:
        log.error("%sconfiguration error: %s", job, exc)
        if not sweep:
            sys.exit(EXIT_CONFIG)
        path = write_config_error_record(cfg, run_dir, exc)
        if path is not None:
            log.error("%srecord: %s", job, path)
        FAILED_JOBS.append((EXIT_CONFIG, f"{job}configuration error: {exc}"))
        return
    except user_errors() as exc:
        message = error_message(exc)
        log.error("%serror: %s", job, message)
        log.error("%srecord (status error): %s", job, Path(run_dir) / "results.json")
        if not sweep:
            sys.exit(EXIT_FAILED)
        FAILED_JOBS.append((EXIT_FAILED, f"{job}{message}"))
        return
    if distributed.is_main():
        print_summary(record)


def _sweep_exit_status() -> int:
    if not FAILED_JOBS:
        return 0
    print(f"{len(FAILED_JOBS)} job(s) of the sweep failed:", file=sys.stderr)
    for _, message in FAILED_JOBS:
        print(f"  {message}", file=sys.stderr)
    return max(code for code, _ in FAILED_JOBS)


if __name__ == "__main__":
    check_launcher(sys.argv[1:])  # e.g. hydra/launcher=slurm without its plugin: how to install it
    # Under torchrun all ranks must agree on one run directory before Hydra composes it.
    sys.argv = distributed.pin_output_dir(sys.argv, Path(__file__).resolve().parent / "conf")
    try:
        main()
    finally:
        distributed.shutdown()
    sys.exit(_sweep_exit_status())
