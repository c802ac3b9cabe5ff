"""Where one training step's allocator peak falls, and what is alive at it.

    python scripts/peak_profile.py OUT_DIR --label both -- model=resnet50 batch_size=128 \
        dataset.image_size=224 dataset.num_classes=1000 method=division method.rebuild_conv_input=true

Builds the step of ``mode=memory`` (runners/memory.py: same model, method, optimizer, fixed batch),
runs ``--steps`` steps and records the caching allocator's history over the last one
(``torch.cuda.memory._record_memory_history``, Python stacks). Replaying the recorded allocations
and frees gives the allocated bytes after every event; their maximum plus what was allocated before
the recording is the step's peak (``max_memory_allocated``, checked against it). Writes
OUT_DIR/LABEL_peak.txt:

- the peak, the floor between steps, and the phase the peak falls in (forward, backward, optimizer:
  the step's marks, as ``mode=memory`` places them);
- the blocks alive at the peak that the step allocated, grouped by the innermost frame of this
  project's code on their allocation stack (or of PyTorch's; "(no Python frame)" for the C++ autograd
  nodes of backward, which run on autograd's own thread), largest group first, and the largest
  blocks one by one;
- OUT_DIR/LABEL_curve.csv: allocated bytes over the step's events (about 2000 rows), with the marks;
- with ``--code`` (a compiled step, ``compile=true``): OUT_DIR/LABEL_code.py, inductor's generated
  code of the first step's graphs (forward, then backward): where each buffer is allocated and freed,
  i.e. which decoded activations its backward keeps alive together.

CUDA only. Overrides after ``--`` are main.py's (config groups and keys).
"""
from __future__ import annotations

import argparse
import csv
import gc
import sys
from collections import defaultdict
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runners.build import seed_everything, split_overrides  # noqa: E402
from runners.memory import build_bench, start_meter, train_step  # noqa: E402

MARKER = "_phase_marker"


def _phase_marker(device: torch.device) -> torch.Tensor:
    """A one-element allocation whose stack names this function: a mark in the allocator's trace."""
    return torch.empty(1, device=device)


def frame_label(frames: list[dict]) -> str:
    """The innermost frame of this project's code (else of PyTorch's) of an allocation stack."""
    for prefer in (str(ROOT), "torch"):
        for frame in frames:
            name = frame.get("filename", "")
            if prefer in name and "peak_profile" not in name:
                short = name.split(str(ROOT) + "/")[-1] if prefer == str(ROOT) else name[name.find("torch"):]
                return f"{short}:{frame.get('line')} {frame.get('name')}"
    return "(no Python frame)"


def replay(trace: list[dict]):
    """Allocated bytes after every event, the index of the maximum and the blocks alive there."""
    live: dict[int, dict] = {}
    level, best, best_at, best_live, curve, marks = 0, -1, -1, {}, [], []
    for index, event in enumerate(trace):
        action = event["action"]
        if action == "alloc":
            if any(f.get("name") == MARKER for f in event.get("frames", [])):
                marks.append(index)
            live[event["addr"]] = event
            level += event["size"]
        elif action == "free_completed" and event["addr"] in live:
            level -= live.pop(event["addr"])["size"]
        curve.append(level)
        if level > best:
            best, best_at, best_live = level, index, dict(live)
    return curve, best, best_at, best_live, marks


def profile(label: str, overrides: list[str], out: Path, steps: int, code: bool = False) -> str:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["device=cuda", *overrides])
    device = torch.device("cuda")
    seed_everything(0)
    start_meter(cfg, device, int(cfg.batch_size))
    bench = build_bench(cfg, device, int(cfg.batch_size), ledger=None)
    names: list[str] = []
    markers: list[torch.Tensor] = []

    def mark(name: str) -> None:
        names.append(name)
        markers.append(_phase_marker(device))

    try:
        for index in range(steps - 1):
            if code and index == 0:
                from torch._inductor.utils import run_and_get_code
                _, sources = run_and_get_code(train_step, bench, cfg, device)
                (out / f"{label}_code.py").write_text("\n\n# ======== next graph\n".join(sources))
            else:
                train_step(bench, cfg, device)
        gc.collect()
        torch.cuda.synchronize(device)
        floor = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        mark("start")
        train_step(bench, cfg, device, mark)
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        peak = torch.cuda.max_memory_allocated(device)
    finally:
        bench.close()
    trace = snapshot["device_traces"][device.index or 0]
    curve, best, best_at, best_live, marks = replay(trace)
    phase = "before start"
    for name, at in zip(names, marks):
        if at <= best_at:
            phase = f"after {name}"
    groups: dict[str, list[int]] = defaultdict(list)
    for block in best_live.values():
        groups[frame_label(block.get("frames", []))].append(block["size"])
    gib = 2 ** 30
    lines = [f"{label}: {' '.join(overrides)}",
             f"max_memory_allocated {peak / gib:.3f} GiB; floor before the step {floor / gib:.3f} GiB; "
             f"replayed peak {(floor + best) / gib:.3f} GiB at event {best_at} of {len(trace)} ({phase})",
             f"alive at the peak, allocated during the step: {best / gib:.3f} GiB in {len(best_live)} blocks",
             "", f"{'GiB':>8} {'blocks':>6}  allocated at"]
    for where, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"{sum(sizes) / gib:8.3f} {len(sizes):6d}  {where}")
    lines += ["", "largest blocks alive at the peak (MiB, allocated at):"]
    for block in sorted(best_live.values(), key=lambda b: -b["size"])[:40]:
        lines.append(f"{block['size'] / 2 ** 20:10.1f}  {frame_label(block.get('frames', []))}")
    (out / f"{label}_peak.txt").write_text("\n".join(lines) + "\n")
    stride = max(1, len(curve) // 2000)
    with open(out / f"{label}_curve.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["event", "allocated_bytes", "mark"])
        mark_at = dict(zip(marks, names))
        for index, level in enumerate(curve):
            if index % stride == 0 or index in mark_at or index == best_at:
                writer.writerow([index, floor + level, mark_at.get(index, "peak" if index == best_at else "")])
    return lines[1]


def main() -> None:
    argv, overrides = split_overrides(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--label", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--code", action="store_true", help="also write inductor's code of a compiled step")
    args = p.parse_args(argv)
    if args.code and args.steps < 2:
        p.error("--code writes the first step's code and records the last step: it needs --steps 2 or more")
    args.out.mkdir(parents=True, exist_ok=True)
    print(profile(args.label, overrides, args.out, args.steps, args.code), flush=True)


if __name__ == "__main__":
    main()
