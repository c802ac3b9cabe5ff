"""Tracking: the wandb mode is decided before init, offline runs land in the run directory, failures never
stop a job, only rank 0 logs, and groups / names come out as documented."""
from __future__ import annotations

import time
import warnings

import pytest
from omegaconf import OmegaConf

from runners import tracking
from runners.tracking import (NullLogger, WandbLogger, decide_mode, derive_group, read_offline_run, run_name,
                              start_logger)


@pytest.fixture(autouse=True)
def wandb_home(tmp_path, monkeypatch):
    """wandb's directories in tmp, no credentials, no mode from the environment, netrc in tmp."""
    home = tmp_path / "wandb-home"
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return home


def cfg(mode="offline", name="wandb", **extra):
    return OmegaConf.create({"logger": {"name": name, "mode": mode, "project": "division-tests", "entity": None,
                                        "tags": ["unit"]},
                             "mode": {"name": "memory"}, "group": None, "report": {"group": None},
                             "method": {"name": "division", "block_size": 4, "bits": 2}, **extra})


RECORD = dict(mode="memory", model="resnet20", method="division", block_size=4, bits=2, batch_size=8, seed=0,
              dataset="synthetic", group="g1")


def read_complete_run(path, timeout_s: float = 20.0) -> dict:
    """The offline run once wandb's service has written all of it (asynchronously, after finish())."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = read_offline_run(path)
        if run["complete"] or time.monotonic() > deadline:
            return run
        time.sleep(0.1)


def test_mode_is_decided_before_init(monkeypatch):
    assert decide_mode(cfg("offline")) == "offline"
    assert decide_mode(cfg("disabled")) is None
    assert decide_mode(cfg("disabled", name="none")) is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert decide_mode(cfg("offline")) is None  # the environment may switch tracking off...
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert decide_mode(cfg("online")) == "offline"  # ...or keep it off the network
    monkeypatch.setenv("WANDB_MODE", "online")
    assert decide_mode(cfg("offline")) == "offline"  # but never turns uploads on


def test_online_without_credentials_falls_back_to_offline(monkeypatch, tmp_path):
    with pytest.warns(UserWarning, match="no W&B credentials"):
        assert decide_mode(cfg("online")) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert decide_mode(cfg("online")) == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert decide_mode(cfg("online")) == "online"


def test_offline_run_in_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    logger = start_logger(cfg("offline"), str(run_dir), dict(RECORD))
    init_s = time.perf_counter() - start
    assert isinstance(logger, WandbLogger) and logger.run_id
    logger.log({"train/loss": 1.5}, step=1)
    logger.log_table("report/t", ["method", "cell"], [["none", "5.14"], ["division", "OOM"]])
    logger.summary({**RECORD, "status": "ok", "ledger_ratio": 8.5, "history": [{"epoch": 1}]})
    logger.finish()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(logger.run_id)
    run = read_complete_run(runs[0])
    assert run["run_id"] == logger.run_id and run["group"] == "g1" and run["job_type"] == "memory"
    assert run["name"] == "memory-resnet20-division-B4-Q2-b8-s0"
    assert set(run["tags"]) >= {"unit", "memory", "resnet20", "division", "synthetic"}
    assert run["config"]["method"] == {"name": "division", "block_size": 4, "bits": 2}
    assert run["summary"]["ledger_ratio"] == 8.5 and run["summary"]["status"] == "ok"
    assert "history" not in run["summary"]  # nested values stay in results.json
    # Offline init never waits on a server; it starts wandb's service process (about a second here).
    assert init_s < 30, f"offline wandb.init took {init_s:.1f}s"


def test_disabled_and_none_and_other_ranks_log_nothing(tmp_path, monkeypatch):
    assert type(start_logger(cfg("disabled"), str(tmp_path), dict(RECORD))) is NullLogger
    assert type(start_logger(cfg("disabled", name="none"), str(tmp_path), dict(RECORD))) is NullLogger
    assert type(start_logger(cfg("offline"), str(tmp_path), dict(RECORD), rank=1)) is NullLogger
    monkeypatch.setenv("RANK", "3")
    assert type(start_logger(cfg("offline"), str(tmp_path), dict(RECORD))) is NullLogger
    assert not (tmp_path / "wandb").exists()


def test_init_failure_is_a_warning_and_a_null_logger(tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("no network, no account")
    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(UserWarning, match="wandb init failed.*no network"):
        logger = start_logger(cfg("offline"), str(tmp_path), dict(RECORD))
    assert type(logger) is NullLogger and logger.run_id is None


def test_logger_calls_never_raise():
    class Broken:
        id = "x"

        def __getattr__(self, name):
            raise RuntimeError("tracker gone")
    logger = WandbLogger(Broken())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.log({"a": 1})
        logger.summary({"a": 1})
        logger.log_table("t", ["a"], [[1]])
        logger.log_image("i", "/nonexistent.png")
        logger.finish()
    assert len(caught) == 5


def test_quiet_settings_are_accepted_by_this_wandb():
    settings = tracking.wandb_settings(cfg("offline"), "offline")
    assert settings.silent and settings.console == "off"
    assert tracking.wandb_settings(cfg("online"), "online").init_timeout == tracking.DEFAULT_INIT_TIMEOUT_S


def test_run_names():
    assert run_name(RECORD) == "memory-resnet20-division-B4-Q2-b8-s0"
    assert run_name({**RECORD, "method": "none", "block_size": None, "bits": None}) == "memory-resnet20-none-b8-s0"
    assert run_name({**RECORD, "mode": "report", "group": "paper_memory"}) == "report-paper_memory"


def test_derive_group_outside_hydra():
    assert derive_group(cfg(group="mine")) == "mine"
    assert derive_group(cfg()) is None
    report = cfg(report={"group": "paper_memory"})
    report.mode.name = "report"
    assert derive_group(report) == "paper_memory"  # a report joins the group it reports on


def test_derive_group_in_a_multirun(tmp_path):
    """The group a multirun's jobs get: the sweep directory's name, or <date>_<time> for the default."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    hc = OmegaConf.create({"mode": RunMode.MULTIRUN, "sweep": {"dir": str(tmp_path / "my-sweep")},
                           "runtime": {"choices": {"experiment": None}}})
    instance = HydraConfig.instance()
    saved = instance.cfg
    try:
        instance.cfg = OmegaConf.create({"hydra": hc})
        assert derive_group(cfg()) == "my-sweep"
        instance.cfg.hydra.sweep.dir = "outputs/multirun/2026-01-02/03-04-05"
        assert derive_group(cfg()) == "2026-01-02_03-04-05"
        instance.cfg.hydra.runtime.choices.experiment = "block_bits"
        assert derive_group(cfg()) == "block_bits"
    finally:
        instance.cfg = saved


def test_read_offline_run_rejects_other_files(tmp_path):
    path = tmp_path / "run-x.wandb"
    path.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError):
        read_offline_run(path)
