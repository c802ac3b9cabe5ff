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

On a GPU (``--device cuda``, the default) the trace is the caching allocator's. With ``--device cpu``
it is the CPU allocator's, from ``torch.profiler``'s memory events (``cpu_trace``): the same replay,
the same report, with two differences. The floor is counted from the tensors held between steps
(parameters, gradients, optimizer state, batch; ``held_bytes``) since the CPU allocator keeps no
total (the last step's gradients are dropped before the recorded step: ``_record_cpu``), and there
is no ``max_memory_allocated`` to check against. The method runs its CPU path (the
codec in tensor ops, no fused kernels), so a decode's temporaries are those of the tensor ops, and
convolutions keep no cuDNN workspace: where the peak falls can differ from the GPU's. ``--code``
needs a GPU.

Overrides after ``--`` are main.py's (config groups and keys).
"""
from __future__ import annotations

import argparse
import csv
import gc
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

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


def _where(block: dict) -> str:
    """A block's allocation site: its frame (``frame_label``), and on the CPU the op it ran in."""
    op = block.get("op")
    return frame_label(block.get("frames", [])) + (f" [{op}]" if op else "")


def lifetimes(trace: list[dict], blocks: list[dict], after: int) -> list[tuple[int, object]]:
    """(the event that allocated each of ``blocks``, the first free of its address after event
    ``after``, or "-" where the trace ends first): which blocks live only inside the op at the
    peak and which outlive it."""
    index = {id(event): i for i, event in enumerate(trace)}
    wanted = {block["addr"] for block in blocks}
    freed: dict[int, int] = {}
    for j in range(after + 1, len(trace)):
        addr = trace[j]["addr"]
        if trace[j]["action"] == "free_completed" and addr in wanted and addr not in freed:
            freed[addr] = j
    return [(index[id(block)], freed.get(block["addr"], "-")) for block in blocks]


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
        elif action == "free_completed":
            # a block allocated before the recording (the last step's gradients, which zero_grad
            # frees) lowers the level too: it is part of the floor
            freed = live.pop(event["addr"], None)
            level -= event["size"] if freed is None else freed["size"]
        curve.append(level)
        if level > best:
            best, best_at, best_live = level, index, dict(live)
    return curve, best, best_at, best_live, marks


_AUTOGRAD_NODE = "autograd::engine::evaluate_function: "
_PY_FRAME = re.compile(r"^(?P<filename>.*)\((?P<line>\d+)\): (?P<name>.*)$")


def cpu_trace(events) -> list[dict]:
    """The CPU allocator's allocations and frees under ``torch.profiler`` (``profile_memory`` and
    ``with_stack`` on; ``events``: its ``experimental_event_tree()`` roots), in time order, as the
    CUDA trace's entries: ``alloc`` and ``free_completed`` with address, size and the Python
    frames around the allocation (innermost first), and ``op``: the autograd node it ran in (in
    backward, where the C++ nodes allocate with no Python frame of their own), else the innermost
    aten op."""
    from torch._C._profiler import _EventType
    trace: list[tuple[int, dict]] = []
    stack = [(root, (), "", "") for root in events]
    while stack:
        node, frames, autograd_node, aten_op = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            size = fields.alloc_size
            entry = {"action": "alloc" if size > 0 else "free_completed", "addr": fields.ptr, "size": abs(size),
                     "frames": list(frames) if size > 0 else [], "op": autograd_node or aten_op}
            trace.append((node.start_time_ns, entry))
        elif node.tag == _EventType.PyCall:
            found = _PY_FRAME.match(node.name)
            if found:
                frames = ({"filename": found["filename"], "line": int(found["line"]), "name": found["name"]},
                          *frames)
        elif node.tag == _EventType.TorchOp:
            if node.name.startswith(_AUTOGRAD_NODE):
                autograd_node = node.name[len(_AUTOGRAD_NODE):]
            elif node.name.startswith("aten::"):
                aten_op = node.name
        stack.extend((child, frames, autograd_node, aten_op) for child in node.children)
    trace.sort(key=lambda entry: entry[0])  # (a stable sort: an allocation keeps its place before its free)
    return [entry for _, entry in trace]


def held_bytes(bench) -> int:
    """Bytes of the tensors a training step finds allocated: parameters and their gradients,
    buffers, the optimizer's state, the batch (each storage once)."""
    seen: dict[int, int] = {}
    tensors = [*bench.model.parameters(), *bench.model.buffers(), bench.images, bench.target]
    tensors += [p.grad for p in bench.model.parameters() if p.grad is not None]
    tensors += [v for state in bench.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _record_cuda(bench, cfg, device: torch.device, mark) -> tuple[list[dict], int, Optional[int]]:
    """(the caching allocator's trace of one step, memory_allocated before it, max_memory_allocated)."""
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
    return snapshot["device_traces"][device.index or 0], floor, torch.cuda.max_memory_allocated(device)


def _record_cpu(bench, cfg, device: torch.device, mark) -> tuple[list[dict], int, Optional[int]]:
    """(the CPU allocator's trace of one step, the tensors held before it, None).

    The profiler reports no free of a block allocated before it started, so the last step's
    gradients are dropped first: the step's own ``zero_grad`` drops them before backward anyway,
    and had they been in the floor, their unseen free would count them twice once backward made
    the new ones."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    bench.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    floor = held_bytes(bench)
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
        mark("start")
        train_step(bench, cfg, device, mark)
    return cpu_trace(prof.profiler.kineto_results.experimental_event_tree()), floor, None


def profile(label: str, overrides: list[str], out: Path, steps: int, code: bool = False,
            device_type: str = "cuda") -> str:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"device={device_type}", *overrides])
    device = torch.device(device_type)
    seed_everything(0)
    if device.type == "cuda":
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
        record = _record_cuda if device.type == "cuda" else _record_cpu
        trace, floor, peak = record(bench, cfg, device, mark)
    finally:
        bench.close()
    curve, best, best_at, best_live, marks = replay(trace)
    phase = "before start"
    for name, at in zip(names, marks):
        if at <= best_at:
            phase = f"after {name}"
    groups: dict[str, list[int]] = defaultdict(list)
    for block in best_live.values():
        groups[_where(block)].append(block["size"])
    gib = 2 ** 30
    if peak is not None:
        measured = f"max_memory_allocated {peak / gib:.3f} GiB; floor before the step {floor / gib:.3f} GiB"
    else:
        measured = (f"CPU allocator (torch.profiler): {best / gib:.3f} GiB above the floor; floor (tensors "
                    f"held between steps) {floor / gib:.3f} GiB")
    lines = [f"{label}: {' '.join(overrides)}",
             f"{measured}; "
             f"replayed peak {(floor + best) / gib:.3f} GiB at event {best_at} of {len(trace)} ({phase}"
             + (f", in {trace[best_at]['op']}" if trace and trace[best_at].get("op") else "") + ")",
             f"alive at the peak, allocated during the step: {best / gib:.3f} GiB in {len(best_live)} blocks",
             "", f"{'GiB':>8} {'blocks':>6}  allocated at"]
    for where, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"{sum(sizes) / gib:8.3f} {len(sizes):6d}  {where}")
    lines += ["", "largest blocks alive at the peak (MiB, the events that allocated and freed it, allocated at):"]
    largest = sorted(best_live.values(), key=lambda b: -b["size"])[:40]
    for block, (made, freed) in zip(largest, lifetimes(trace, largest, best_at)):
        lines.append(f"{block['size'] / 2 ** 20:10.1f}  {made:>7} {freed:>7}  {_where(block)}")
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
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: the caching allocator's history; cpu: the CPU allocator's, from torch.profiler")
    args = p.parse_args(argv)
    if args.code and args.steps < 2:
        p.error("--code writes the first step's code and records the last step: it needs --steps 2 or more")
    if args.code and args.device == "cpu":
        p.error("--code writes inductor's GPU code: it needs --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here: --device cpu replays the CPU allocator instead")
    args.out.mkdir(parents=True, exist_ok=True)
    print(profile(args.label, overrides, args.out, args.steps, args.code, args.device), flush=True)


if __name__ == "__main__":
    main()
