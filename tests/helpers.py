"""Shared test helpers: compose the project's config exactly as main.py does, run main.py (one job,
or several independent ones at once), and train one small model under several methods side by side (GPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def run_main(args: list[str], cwd: Path = ROOT, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_together(commands: list[list[str]], cwd: Path = ROOT, envs: list[dict] | None = None,
                 timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Independent commands started at once, so that two runs share the runner's two cores instead of
    one waiting for the other; their results in the order given. ``envs``: each one's whole environment."""
    envs = envs or [dict(os.environ)] * len(commands)
    procs = [subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for command, env in zip(commands, envs, strict=True)]
    try:
        results = []
        for command, proc in zip(commands, procs):
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_mains(arg_lists: list[list[str]], cwd: Path = ROOT, timeout: int = 300, envs: list[dict] | None = None,
              **env) -> list[subprocess.CompletedProcess]:
    """``run_main`` for several independent jobs at once (see ``run_together``); ``envs``: per-job variables."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    return run_together([[sys.executable, str(ROOT / "main.py"), *args] for args in arg_lists], cwd=cwd,
                        envs=[{**full_env, **extra} for extra in (envs or [{}] * len(arg_lists))], timeout=timeout)


def train_side_by_side(methods, prepare=None, steps: int = 4) -> list[dict]:
    """ResNet-20 on CUDA (bf16 autocast, channels_last) trained for ``steps`` SGD steps once per
    method, from the same weights on the same random batches, under cuDNN's deterministic
    algorithms; ``prepare(methods)`` runs after they are attached. Returns the state dicts."""
    import copy

    import torch
    import torch.nn.functional as F

    from models import build_model
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        torch.manual_seed(0)
        base = build_model("resnet20", num_classes=10).cuda().to(memory_format=torch.channels_last).train()
        models = [copy.deepcopy(base) for _ in methods]
        for model, method in zip(models, methods):
            method.attach(model)
        if prepare is not None:
            prepare(methods)
        opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
        g = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(steps):
            x = torch.randn(64, 3, 32, 32, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (64,), device="cuda", generator=g)
            for model, opt in zip(models, opts):
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x).float(), y)
                loss.backward()
                opt.step()
        return [model.state_dict() for model in models]
    finally:
        torch.backends.cudnn.deterministic = saved


def decodes_in_one_step(model, loss_of, **knobs) -> int:
    """How many times DIVISION's codec (PyTorch ops, seed 0, ``knobs``) decodes in one training step
    of ``model``, whose loss ``loss_of(model)`` gives."""
    import division
    method = division.build_method("division", seed=0, backend="torch", **knobs)
    codec, decode = method.codec, method.codec.decode
    calls = []
    codec.decode = lambda packed: (calls.append(1), decode(packed))[1]
    method.attach(model)
    loss_of(model).backward()
    method.detach()
    return len(calls)
