"""How long a model takes to compile, with a method attached: the first training step's time.

    python scripts/compile_time.py --model vit_b_16 --methods none division
    python scripts/compile_time.py --model resnet50 --size 64 --batch 2 --methods division

Per method: a torchvision model (fp32, CPU unless ``--device``), attached and compiled through the
method (``method.compile``, inductor, default mode), one training step timed from the call to the
end of backward (tracing, compilation and the step itself), then a second step (the compiled step
alone). Each method runs in a process of its own with an inductor cache of its own (a temporary
folder), so neither reuses the other's kernels. The first step's time includes ``method.compile``
itself, printed apart too: DIVISION's one-time self-check (a small network compiled once per
process) runs there.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(model_name: str, method_name: str, size: int, batch: int, device: str) -> None:
    import torch
    import torch.nn.functional as F
    import torchvision
    sys.path.insert(0, str(ROOT))
    import division
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(num_classes=10, image_size=size) if model_name.startswith("vit") \
        else getattr(torchvision.models, model_name)(num_classes=10)
    model = model.to(device).train()
    method = division.build_method(method_name)
    method.attach(model)
    start = time.perf_counter()
    compiled = method.compile(model)  # (DIVISION's self-check runs here)
    check = time.perf_counter() - start
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        F.cross_entropy(compiled(x), y).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    print(f"{model_name} {method_name}: first step {times[0] + check:.1f} s (method.compile {check:.1f} s), "
          f"second step {times[1]:.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b_16")
    parser.add_argument("--methods", nargs="+", default=["none", "division"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.model, args.methods[0], args.size, args.batch, args.device)
        return
    for method in args.methods:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            subprocess.run([sys.executable, __file__, "--one", "--model", args.model, "--methods", method,
                            "--size", str(args.size), "--batch", str(args.batch), "--device", args.device],
                           env=env, check=True)


if __name__ == "__main__":
    main()
