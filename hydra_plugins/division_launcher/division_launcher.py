"""The sweeper and launcher of this project (``hydra/sweeper=division``, ``hydra/launcher=division``, the
defaults): Hydra's basic ones, except that a job whose overrides do not compose (an unknown option such as
``model=resnet9000``, a key the chosen option lacks) does not end the sweep. The basic sweeper composes
every job before launching any and stops the whole sweep at the first that fails; this one leaves that
to the launcher, job by job. That job gets an error record, in
``<sweep dir>/<job number>_config_error/results.json`` and in the results store, and the other jobs run;
main.py's exit status then says that a job failed (2, as for any refused configuration).

Jobs that compose are run exactly as the basic launcher runs them. Kept light: Hydra imports every
plugin module at start-up, so the project's own modules are imported only when a job is refused.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class DivisionLauncherConf:
    _target_: str = "hydra_plugins.division_launcher.division_launcher.DivisionLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="division", node=DivisionLauncherConf,
                             provider="division")


@dataclass
class DivisionSweeperConf:
    _target_: str = "hydra_plugins.division_launcher.division_launcher.DivisionSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="division", node=DivisionSweeperConf,
                             provider="division")


class DivisionSweeper(BasicSweeper):
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Nothing up front: the launcher gives each job that does not compose its own error record."""


class DivisionLauncher(BasicLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs locally")
        runs: List[JobReturn] = []
        for idx, overrides in enumerate(job_overrides):
            idx = initial_job_idx + idx
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            try:
                sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            except Exception as exc:  # noqa: BLE001 - a job that does not compose is that job's failure
                runs.append(self._refused(sweep_dir, idx, overrides, exc))
                continue
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            runs.append(run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                config=sweep_config, job_dir_key="hydra.sweep.dir",
                                job_subdir_key="hydra.sweep.subdir"))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs

    def _refused(self, sweep_dir: Path, idx: int, overrides: Sequence[str], exc: Exception) -> JobReturn:
        from runners.checks import ConfigError
        from runners.job import FAILED_JOBS, write_config_error_record

        text = str(exc).split("Config search path")[0]  # the search path says nothing about this job
        message = f"{' '.join(overrides)} does not compose: {' '.join(text.split())}"
        log.error("job %d: configuration error: %s", idx, message)
        job_dir = sweep_dir / f"{idx}_config_error"
        job_dir.mkdir(parents=True, exist_ok=True)
        cfg = OmegaConf.create({"results_dir": self.config.get("results_dir")})
        write_config_error_record(cfg, job_dir, ConfigError(message))
        FAILED_JOBS.append((2, f"job {idx}: configuration error: {message}"))
        return JobReturn(overrides=list(overrides), working_dir=str(job_dir), status=JobStatus.COMPLETED,
                         _return_value=None)
