"""pyproject.toml: the wheel holds the whole `division` library and nothing of the framework, and the
installed library works from any directory."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_the_library_and_the_optional_parts():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["name"] == "division"
    assert {d.split(">")[0] for d in project["project"]["dependencies"]} == {"torch", "numpy"}
    extras = project["project"]["optional-dependencies"]
    assert any(d.startswith("hydra-submitit-launcher") for d in extras["slurm"])
    framework = {d.split(">")[0].split("=")[0] for d in extras["framework"]}
    assert {"hydra-core", "duckdb", "pyarrow", "torchvision"} <= framework


def test_wheel_holds_division_only_and_imports_anywhere(tmp_path):
    pytest.importorskip("setuptools", minversion="70.1")  # bdist_wheel built in: no download
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "division", src / "division", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("division-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "division").rglob("*.py")}
    assert expected <= names, sorted(expected - names)
    assert not {n for n in names if n.split("/")[0] not in ("division",) and ".dist-info" not in n}

    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)  # a wheel is a zip of what lands in site-packages
    code = ("import division, torch; m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()); "
            "ledger = division.ByteLedger(); division.build_method('division').attach(m, ledger=ledger); "
            "m(torch.randn(2, 3, 34, 34)).sum().backward(); "
            "assert division.__file__.startswith(%r); print(ledger.plain_bytes / ledger.stored_bytes)" % str(site))
    ran = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin"},
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert float(ran.stdout) > 2
