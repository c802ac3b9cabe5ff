"""Checks that run in their own process beside the rest of the suite.

The fused kernels' CPU checks run through Triton's interpreter, which must be switched on before the
kernels' module loads, so they need a subprocess; they take minutes of one core. Started the moment
collection ends (tests/conftest.py) they run on the runner's second core while the main process, mostly
single-threaded, goes through the other tests, and the fixture that reads their results waits only for
what is left. A module declares them in ``BACKGROUND``: fixture name -> function of the results path
returning the command to run. Nothing is started for a module none of whose selected tests use them.

They run at a lower priority (``NICE``): the main process is the longer of the two, and its
multi-process tests (main.py in subprocesses, torchrun) need both cores while they run; the checks
take the time it leaves.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

HANG_LIMIT_S = 1800  # a check that runs this long has hung: the suite itself must end within 90 minutes
INTERPRETER_ENV = {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
                   # one core each: the main process has the other
                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
NICE = 10  # added to the checks' niceness

_folder: Path | None = None
_running: dict[str, tuple[subprocess.Popen, Path, float]] = {}


def start(key: str, command) -> None:
    """Start ``command(results_path)`` under the interpreter environment unless ``key`` already runs."""
    global _folder
    if key in _running:
        return
    if _folder is None:
        _folder = Path(tempfile.mkdtemp(prefix="division-tests-background-"))
    out = _folder / f"{key}.json"
    log = open(_folder / f"{key}.log", "w")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(command(str(out)), cwd=str(root), env={**os.environ, **INTERPRETER_ENV},
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(NICE))
    log.close()
    _running[key] = (proc, out, time.monotonic())


def result(key: str, command) -> dict:
    """The results ``key`` wrote (started now if collection did not start it), after it ends."""
    start(key, command)
    proc, out, began = _running[key]
    try:
        proc.wait(timeout=max(1.0, HANG_LIMIT_S - (time.monotonic() - began)))
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{key}: still running after {HANG_LIMIT_S} s, killed") from None
    log = (out.parent / f"{key}.log").read_text()
    assert proc.returncode == 0, f"{key} exited with {proc.returncode}:\n{log[-6000:]}"
    return json.loads(out.read_text())


def skip_dropped_overflow_checks() -> None:
    """In the interpreter subprocess, before any kernel runs: stop Triton's interpreter from
    computing overflow checks that it then throws away.

    For every integer add, sub and mul the interpreter redoes the operation in int64 and compares
    it with the type's range (``sanitize_overflow``), then hands the result to ``device_assert``,
    which does nothing unless ``options.debug`` is set (it is not: the interpreter's options are
    fixed defaults). A compiled kernel drops that dead code; interpreted, it is half the run time.
    With it off the kernels compute exactly what they computed before.
    """
    import dataclasses
    try:
        from triton.runtime import interpreter
        options = interpreter.interpreter_builder.options
    except (ImportError, AttributeError):
        return
    if not getattr(options, "debug", True) and getattr(options, "sanitize_overflow", False):
        interpreter.interpreter_builder.options = dataclasses.replace(options, sanitize_overflow=False)


def start_for(items) -> None:
    """Start every declared check that a selected test uses (from pytest_collection_finish)."""
    for item in items:
        declared = getattr(getattr(item, "module", None), "BACKGROUND", {})
        for name in set(item.fixturenames) & set(declared):
            start(f"{item.module.__name__}.{name}", declared[name])


def stop_all() -> None:
    """Kill what still runs (a failed or interrupted session) and remove the results folder."""
    for proc, _, _ in _running.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _running.clear()
    if _folder is not None:
        shutil.rmtree(_folder, ignore_errors=True)
