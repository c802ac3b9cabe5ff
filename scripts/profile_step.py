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
- ``METHOD_kernels.txt``: GPU time per step of every kernel family (generated kernels' serial
  numbers dropped), all of them, with launches per step;
- ``METHOD_python.txt``: cProfile's top Python functions over 3 steps;
- ``METHOD_codec_calls.txt``: GPU time of every encode and decode of one step (CUDA events around
  each call), summed per codec, direction, shape, dtype and memory format, with the bandwidth of
  the full-size tensor each call reads or writes: which activations the codec time goes to.
Overrides after ``--`` are main.py's (config groups and keys).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runners.build import seed_everything, split_overrides  # noqa: E402
from runners.compiling import compile_mode  # noqa: E402
from runners.memory import train_step  # noqa: E402
from runners.speed import build_speed_bench, cuda_step_ms, warmup_steps  # noqa: E402


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
    bench = build_speed_bench(cfg, device)  # cuda_graph=true among the overrides: graph replays
    try:
        for _ in range(warmup_steps(cfg)):
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
        (out / f"{name}_kernels.txt").write_text(kernel_families(table, steps=3))
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(3):
            train_step(bench, cfg, device)
        torch.cuda.synchronize(device)
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(45)
        (out / f"{name}_python.txt").write_text(buf.getvalue())
        if bench.graphed is None and compile_mode(cfg) is None:
            # inside a graph replay or a compiled graph the codec classes are not called
            (out / f"{name}_codec_calls.txt").write_text(codec_call_table(bench, cfg, device))
    finally:
        bench.close()
    b = int(cfg.batch_size)
    return (f"{name:>12}: step {step:7.2f} ms ({b / step * 1000:7.0f} img/s)  host issue {queued:7.2f} ms"
            f"  host from idle GPU {idle:7.2f} ms")


def kernel_families(table, steps: int) -> str:
    """GPU time per step of every kernel family: a generated kernel's name without its serial number
    (inductor's ``triton_poi_fused_relu_12`` and ``_13`` are one family), with launches per step.
    A compiled step's kernels are many small generated ones, so the top-40 table hides where its
    time goes; this sums all of them."""
    families: dict[str, list[float]] = {}
    for event in table:
        if event.device_type != DeviceType.CUDA:
            continue  # host ops carry their kernels' time too: count each kernel once
        family = re.sub(r"_\d+$", "", event.key)
        entry = families.setdefault(family, [0.0, 0])
        entry[0] += event.device_time_total / 1000.0 / steps
        entry[1] += event.count / steps
    total = sum(ms for ms, _ in families.values())
    lines = [f"kernel GPU time per step: {total:.2f} ms", f"{'ms':>8} {'launches':>8}  family"]
    for family, (ms, count) in sorted(families.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{ms:8.3f} {count:8.1f}  {family}")
    return "\n".join(lines) + "\n"


def codec_call_table(bench, cfg, device) -> str:
    """GPU time of the encodes and decodes of one step, summed per codec, direction, shape, dtype
    and memory format. Each call runs in a ``record_function`` range named after it; the profiler
    adds up the GPU time of the kernels launched in each range (host gaps are not counted)."""
    originals = {}
    depth = [0]  # a fast codec falling back to its reference base class is one call, not two
    calls: dict[str, list[int]] = {}  # label -> [calls, full-size bytes]

    def labelled(kind: str, fn):
        def call(self, *a, **k):
            if depth[0]:
                return fn(self, *a, **k)
            label, nbytes = _call_label(self.name, kind, a[0])
            entry = calls.setdefault(label, [0, 0])
            entry[0] += 1
            entry[1] += nbytes
            depth[0] += 1
            try:
                with record_function(label):
                    return fn(self, *a, **k)
            finally:
                depth[0] -= 1
        return call

    for cls in {type(c) for c in _codec_classes()}:
        originals[cls] = (cls.__dict__.get("encode"), cls.__dict__.get("decode"))
        cls.encode = labelled("encode", cls.encode)
        cls.decode = labelled("decode", cls.decode)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            train_step(bench, cfg, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    finally:
        for cls, (enc, dec) in originals.items():
            for attr, fn in (("encode", enc), ("decode", dec)):
                if fn is None:
                    delattr(cls, attr)
                else:
                    setattr(cls, attr, fn)
    gpu_us = {e.key: e.device_time_total for e in prof.key_averages() if e.key in calls}
    rows = sorted(((gpu_us.get(label, 0.0) / 1000.0, label) for label in calls), reverse=True)
    total = sum(ms for ms, _ in rows)
    lines = [f"encodes and decodes of one step: {total:.2f} ms of GPU time",
             f"{'ms':>8} {'calls':>5} {'GB/s':>7}  codec direction shape dtype format (GB/s: full-size tensor bytes / time)"]
    for ms, label in rows:
        n, nbytes = calls[label]
        lines.append(f"{ms:8.3f} {n:5d} {nbytes / ms / 1e6 if ms else 0:7.0f}  {label}")
    return "\n".join(lines) + "\n"


def _call_label(codec: str, kind: str, arg) -> tuple[str, int]:
    """("codec kind shape dtype format", full-size bytes) of an encode's input or a decode's Packed."""
    if isinstance(arg, torch.Tensor):
        shape, dtype = tuple(arg.shape), arg.dtype
        cl = arg.dim() == 4 and arg.is_contiguous(memory_format=torch.channels_last) and not arg.is_contiguous()
    else:
        meta, first = arg.meta, next(iter(arg.tensors.values()), None)
        # max-pool offsets keep no shape: they decode to int64 indices of their own shape
        shape = tuple(meta.get("shape", first.shape if first is not None else ()))
        dtype = meta.get("dtype", torch.int64)
        cl = meta.get("channels_last") or meta.get("memory_format") == "channels_last"
    nbytes = math.prod(shape) * dtype.itemsize
    return f"{codec} {kind} {shape} {str(dtype).replace('torch.', '')} {'NHWC' if cl else 'NCHW'}", nbytes


def _codec_classes():
    """One instance of every codec class a compressing method can pick."""
    from division import exact
    from division.dual_precision import DivisionCodec
    from division.triton_codec import TritonDivisionCodec
    return [exact.BoolMaskCodec(), exact.DropoutMaskCodec(), exact.ReluMaskCodec(), exact.ShapeOnlyCodec(),
            exact.MaxPoolIndexCodec(2, 2, 0, 1, 8), TritonDivisionCodec(), DivisionCodec()]


def main() -> None:
    argv, overrides = split_overrides(sys.argv[1:])
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
