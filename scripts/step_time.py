"""Step time of ``mode=speed``'s bench under sets of config overrides, one after another (CUDA).

    python scripts/step_time.py OUT.jsonl --variant b128 method=division batch_size=128 \
        --variant b128_noprefetch method=division batch_size=128 method.prefetch_decode=false \
        --variant b128_none method=none batch_size=128 [--base ...] [--steps 20] [--rounds 1]
    python scripts/step_time.py OUT.jsonl --variant fused method=division batch_size=128 \
        --variant unfused method=division batch_size=128 tuning:triton_norm.fused_forward=false

Each variant composes main.py's config from ``--base`` (default: ResNet-50, 224x224, 1000 classes,
bf16 autocast, channels_last, replayed from a CUDA graph) plus its overrides, builds the bench
``mode=speed`` times (runners/speed.py), runs its warm-up steps, then times ``--steps`` steps
between CUDA events. One JSON line per variant and round: median and minimum milliseconds, the
decodes the prefetcher started (eager warm-up and capture only: replays run no Python) and the peak
allocated memory. Rounds repeat the variants in turn, so a drift of the machine shows as a spread.

An override ``tuning:MODULE.KEY=VALUE`` sets an entry of ``division.MODULE.TUNING`` (the kernels'
tunables, e.g. ``triton_plan``, ``triton_norm``) for that variant only; VALUE is read as YAML.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runners.build import seed_everything  # noqa: E402
from runners.speed import build_speed_bench, cuda_step_ms, warmup_steps  # noqa: E402

BASE = ["model=resnet50", "dataset.image_size=224", "dataset.num_classes=1000", "precision=bf16",
        "channels_last=true", "cuda_graph=true", "device=cuda", "logger=none"]


TUNING_PREFIX = "tuning:"


@contextlib.contextmanager
def tuned(overrides: list[str]):
    """Apply the ``tuning:MODULE.KEY=VALUE`` overrides to the kernels' TUNING dicts; restore them after."""
    saved = []
    try:
        for item in overrides:
            target, _, value = item[len(TUNING_PREFIX):].partition("=")
            module, _, key = target.rpartition(".")
            table = importlib.import_module(f"division.{module}").TUNING
            if key not in table:
                raise KeyError(f"{item}: division.{module}.TUNING has no entry {key!r} (has {sorted(table)})")
            saved.append((table, key, table[key]))
            table[key] = yaml.safe_load(value)
        yield
    finally:
        for table, key, old in reversed(saved):
            table[key] = old


def time_variant(overrides: list[str], steps: int) -> dict:
    tuning = [o for o in overrides if o.startswith(TUNING_PREFIX)]
    with tuned(tuning):
        return _time_config([o for o in overrides if not o.startswith(TUNING_PREFIX)], steps)


def _time_config(overrides: list[str], steps: int) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    device = torch.device("cuda")
    seed_everything(0)
    torch.cuda.reset_peak_memory_stats(device)
    bench = build_speed_bench(cfg, device)
    try:
        cuda_step_ms(bench, cfg, device, warmup_steps(cfg))
        ms = cuda_step_ms(bench, cfg, device, steps)
        prefetcher = getattr(getattr(bench.method, "compressor", None), "prefetcher", None)
        return {"median_ms": statistics.median(ms), "min_ms": min(ms),
                "prefetched": getattr(prefetcher, "launched", None),
                "peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30}
    finally:
        bench.close()
        del bench
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="JSON lines are appended here")
    p.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "OVERRIDE"),
                   help="a name, then main.py overrides (repeatable)")
    p.add_argument("--base", nargs="*", default=BASE, help="overrides every variant starts from")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    with args.out.open("a") as out:
        for _ in range(args.rounds):
            for name, *overrides in args.variant:
                rec = {"name": name, "overrides": overrides, **time_variant([*args.base, *overrides], args.steps)}
                print(json.dumps(rec), flush=True)
                out.write(json.dumps(rec) + "\n")
                out.flush()


if __name__ == "__main__":
    main()
