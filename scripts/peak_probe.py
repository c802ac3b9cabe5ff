"""Where a training step's CUDA memory peak comes from: the live allocations at the peak, by origin.

    python scripts/peak_probe.py --model resnet20 --batch 128 --method division [--precision bf16]

Runs two training steps under PyTorch's allocator history recorder, replays the second step's
allocation events to find the moment of the peak, and prints what was alive then, grouped by the
Python frames that allocated it (C++-only allocations, e.g. inside autograd's backward kernels,
show as "<no python frame>"). Also prints memory_allocated at the end of forward and the peak.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import division  # noqa: E402
from models import MODEL_INFO, build_model  # noqa: E402


def frames_label(frames, root: str) -> str:
    mine = [f for f in frames if root in f.get("filename", "")]
    if not mine:
        torchish = [f for f in frames if "torch" in f.get("filename", "")]
        if not torchish:
            return "<no python frame>"
        mine = torchish
    return " <- ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in mine[:3])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--method", default="division")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--backend", default="auto")
    args = p.parse_args()
    dev = torch.device("cuda")
    size = MODEL_INFO[args.model]["image_size"]
    model = build_model(args.model, num_classes=10).to(dev)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    knobs = {"backend": args.backend} if args.method == "division" else {}
    method = division.build_method(args.method, **knobs)
    method.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, size, size, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(report: bool):
        with method.step_context():
            with amp:
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            before_backward = torch.cuda.memory_allocated()
            loss.backward()
        opt.step()
        torch.cuda.synchronize()
        if report:
            print(f"allocated before backward {before_backward / 2**20:.1f} MiB, "
                  f"peak {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")

    step(False)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                             max_entries=1_000_000)
    step(True)
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for e in snap["device_traces"][dev.index or 0] if e["action"] in ("alloc", "free_completed")]
    live, total, peak, peak_live = {}, 0, -1, {}
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
            if total > peak:
                peak, peak_live = total, dict(live)
        elif e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
    print(f"baseline (model, optimizer, batch) {base / 2**20:.1f} MiB; step peak above baseline "
          f"{peak / 2**20:.1f} MiB in {len(peak_live)} live blocks")
    root = str(Path(__file__).resolve().parents[1])
    groups = collections.Counter()
    counts = collections.Counter()
    for e in peak_live.values():
        label = frames_label(e.get("frames", []), root)
        groups[label] += e["size"]
        counts[label] += 1
    for label, size in groups.most_common(15):
        print(f"{size / 2**20:9.1f} MiB  {counts[label]:4d} blocks  {label}")


if __name__ == "__main__":
    main()
