"""Host-side cost of a method: how many top-level ATen ops one training step of a model issues.

    python scripts/op_count.py --model resnet50 --methods none division

On a GPU every such op is at least one kernel launch, and the host pays several microseconds for
each, so a method that adds thousands of small ops per step can leave the GPU waiting on the CPU
however fast its kernels are. Runs on the CPU (tiny input), with the PyTorch reference codec.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import division  # noqa: E402
from models import build_model  # noqa: E402


def top_level_ops(model: torch.nn.Module, x: torch.Tensor) -> collections.Counter:
    model(x).sum().backward()  # warm-up: lazy initialisation stays out of the count
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x).sum().backward()
    return collections.Counter(
        e.name for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=64, help="input height and width (small: only ops are counted)")
    p.add_argument("--methods", nargs="+", default=["none", "division"])
    args = p.parse_args()
    x = torch.randn(2, 3, args.size, args.size)
    for name in args.methods:
        torch.manual_seed(0)
        model = build_model(args.model, num_classes=10)
        division.build_method(name, backend="torch").attach(model)
        ops = top_level_ops(model, x)
        print(f"{name:>10}: {sum(ops.values()):5d} ops per step; most frequent: "
              + ", ".join(f"{op.removeprefix('aten::')} {n}" for op, n in ops.most_common(6)))


if __name__ == "__main__":
    main()
