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


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
