"""Test-session setup: the repository on sys.path, and wandb kept away from the network and $HOME."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Set before any test imports wandb, and inherited by subprocesses (the end-to-end tests).
_WANDB_HOME = Path(tempfile.mkdtemp(prefix="division-tests-wandb-"))
for _var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
    os.environ[_var] = str(_WANDB_HOME / _var.lower())
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["WANDB_DISABLE_GIT"] = "true"


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def clean_compiler_cache():
    """Each test compiles from a clean Dynamo cache: the session compiles dozens of models in one
    process, past Dynamo's recompile limit, which compiled models refuse to run beyond
    (``division.recompile_limit``)."""
    import torch
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: intra-op threads only add wake-up latency on a 2-core runner (CPU avg_pool2d
    always forks), so the codec tests run single-threaded and restore the setting afterwards."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    from tests import background
    background.start_for(session.items)


def pytest_sessionfinish(session, exitstatus):
    from tests import background
    background.stop_all()


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
