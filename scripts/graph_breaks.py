"""Graph breaks and recompilations of a compiled DIVISION training step, with their reasons.

    python scripts/graph_breaks.py --model resnet50 --knobs fused_norm=true            # a GPU
    python scripts/graph_breaks.py --model resnet18 --interpret --knobs fused_norm=true rebuild_conv_input=true

A graph break inside a compiled DIVISION step splits the traced graph at a layer, and each layer's
frame is then compiled once per shape until Dynamo's recompile limit stops the run
(``division.recompile_limit``). This script compiles a torchvision model (channels_last) with
``method.compile`` and a tracing backend (``aot_eager`` by default: AOTAutograd's forward and
backward graphs, no code generation, so it takes seconds where inductor takes minutes), runs
``--steps`` training steps, and prints Dynamo's counters: the graph breaks with their reasons, the
frames compiled, and the pairs the fused BatchNorm folded (``absorbed``) and the inputs rebuilt.

``--interpret``: on the CPU, the fused kernels run under Triton's interpreter (set here before
Triton loads), as the CPU tests run them; the method is the same ``build_method("division",
backend="triton", ...)`` (the fused codec taking CPU tensors, as ``scripts/host_time.py`` builds
it), compiled without its self-check, which refuses the CPU (its partitioner's choices differ from
a GPU's; what Dynamo traces does not). Exit status 1 when there was a graph break.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="a torchvision model name")
    p.add_argument("--size", type=int, default=64, help="image side (default 64: tracing does not depend on it)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--backend", default="aot_eager", help="torch.compile backend (aot_eager, inductor, ...)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--interpret", action="store_true", help="CPU: the fused kernels under Triton's interpreter")
    p.add_argument("--knobs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="DIVISION's knobs (method.KEY), e.g. fused_norm=true rebuild_conv_input=true")
    return p.parse_args()


def main() -> int:
    args = parse()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: kernels take CPU tensors
    import torch
    import torch.nn.functional as F
    import torchvision
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import division.backends
    from division.methods import build_method, knobs_from_text

    device = torch.device("cpu" if args.interpret else "cuda")
    knobs = knobs_from_text(args.knobs)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, num_classes=10).to(device)
    model = model.to(memory_format=torch.channels_last)
    if args.interpret:
        division.backends.triton_available = lambda: True  # the fused codec, on CPU tensors
        method = build_method("division", backend="triton", **knobs)
        method._check_compiled = lambda *_args, **_kwargs: None  # (see the module's docstring)
    else:
        method = build_method("division", **knobs)
    method.attach(model)
    started = time.perf_counter()
    compiled = method.compile(model, backend=args.backend)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)
    for _ in range(args.steps):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(compiled(x), y)
        loss.backward()
    chain = method.compiled_layers.chain
    breaks = dict(counters["graph_break"])
    print(f"{args.model} {' '.join(args.knobs) or 'defaults'} ({args.backend}, {device.type}"
          f"{', bf16 autocast' if args.amp else ''}): loss {float(loss.detach()):.4f}, "
          f"{time.perf_counter() - started:.0f} s")
    print(f"frames compiled: {dict(counters['frames'])}")
    print(f"folded ReLUs: {len(chain.absorbed)}, rebuilt inputs: {len(chain.rebuilt)}")
    print(f"graph breaks: {sum(breaks.values())}")
    for reason, count in sorted(breaks.items(), key=lambda item: -item[1]):
        print(f"  {count} x {reason}")
    return 1 if breaks else 0


if __name__ == "__main__":
    sys.exit(main())
