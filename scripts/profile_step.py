"""Where one training step's time goes, per method: GPU time, host time, and the top ops of each.

    python scripts/profile_step.py OUT_DIR --methods none division -- model=resnet50 precision=bf16 \
        channels_last=true batch_size=128 dataset.image_size=224 dataset.num_classes=1000

For each method it builds the ``mode=speed`` step (runners/memory.py: same model, method, optimizer
and fixed batch) and writes to OUT_DIR:
- ``summary.txt``: median step time between CUDA events (what ``mode=speed`` reports), the host time
  to issue one step (perf_counter around an unsynchronised step, where the GPU still has queued
  work), and the same host time with the GPU synchronised before each step. When the host time is
  close to the step time, the step is host-bound: the GPU waits for the CPU to launch work.
- ``METHOD_ops.txt``: torch.profiler's table of ops by self CPU time and by GPU time over 3 steps;
- ``METHOD_python.txt``: cProfile's top Python functions over 3 steps.
Overrides after ``--`` are main.py's (config groups and keys).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runners.build import seed_everything  # noqa: E402
from runners.memory import build_bench, train_step  # noqa: E402
from runners.speed import cuda_step_ms  # noqa: E402


def host_ms(bench, cfg, device, steps: int, sync_each: bool) -> float:
    times = []
    for _ in range(steps):
        if sync_each:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        train_step(bench, cfg, device)
        times.append((time.perf_counter() - start) * 1000.0)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def profile_method(name: str, overrides: list[str], out: Path, steps: int) -> str:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"method={name}", "device=cuda", *overrides])
    device = torch.device("cuda")
    seed_everything(0)
    bench = build_bench(cfg, device, int(cfg.batch_size), ledger=None)
    try:
        for _ in range(5):
            train_step(bench, cfg, device)
        step = statistics.median(cuda_step_ms(bench, cfg, device, steps))
        queued = host_ms(bench, cfg, device, steps, sync_each=False)
        idle = host_ms(bench, cfg, device, steps, sync_each=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                train_step(bench, cfg, device)
            torch.cuda.synchronize(device)
        table = prof.key_averages()
        (out / f"{name}_ops.txt").write_text(
            "by self CPU time\n" + table.table(sort_by="self_cpu_time_total", row_limit=40)
            + "\n\nby GPU time\n" + table.table(sort_by="self_cuda_time_total", row_limit=40))
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(3):
            train_step(bench, cfg, device)
        torch.cuda.synchronize(device)
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(45)
        (out / f"{name}_python.txt").write_text(buf.getvalue())
    finally:
        bench.close()
    b = int(cfg.batch_size)
    return (f"{name:>12}: step {step:7.2f} ms ({b / step * 1000:7.0f} img/s)  host issue {queued:7.2f} ms"
            f"  host from idle GPU {idle:7.2f} ms")


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--methods", nargs="+", default=["none", "division"])
    p.add_argument("--steps", type=int, default=15)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(overrides)]
    for name in args.methods:
        lines.append(profile_method(name, overrides, args.out, args.steps))
        print(lines[-1], flush=True)
    (args.out / "summary.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
