"""Host work of a method's eager training step along the GPU path, measured on the CPU.

    python scripts/host_time.py --model thin_vit --methods none division
    python scripts/host_time.py --model thin_convnext --methods division --profile 30
    python scripts/host_time.py --model thin_vit --methods division --knobs rebuild_conv_input=true
    python scripts/host_time.py --model thin_resnet50 --channels-last --methods none division

An eager DIVISION step on a GPU can be bound by its host: the Python that chooses a codec for each
saved tensor, allocates the codes and launches the kernels (``scripts/profile_step.py`` measures it
there). This script runs that same Python without a GPU: under Triton's interpreter
(``TRITON_INTERPRET=1``, set here before anything imports Triton) the fused codec takes CPU tensors,
and every kernel launch (``division.triton_launch.CachedLaunch``) is counted and skipped, so what
remains is the host's own work: the hooks, the layouts, the allocations, the torch ops around the
kernels. The model is small (``thin_vit``: ViT-B/16's 12 blocks with class token at width 64;
``thin_convnext``: ConvNeXt-T's 3-3-9-3 stages at widths 8 to 64; ``thin_resnet50``: ResNet-50 8x
narrower; or any torchvision model by name)
so that its own ops cost little. fp32, the codes are never decoded to real values (no kernel ran).
``--channels-last`` puts the model and input in channels_last, the layout of the GPU speed runs of
CNNs: only then do BatchNorms run fused into their inputs' encodes (``method.norm_from_codes``).
One difference from a GPU: the codec's rounding generator lives on the model's device, so here each
encode draws its seed with ``torch.randint`` (a few microseconds), on a GPU from Python's generator.

Per method it prints the median wall time of a step (forward, backward, optimizer), the kernel
launches skipped per step, the allocations asked for by name in one more step (``AllocationCount``),
and with ``--profile N`` cProfile's top N functions by own time over 3
steps. The difference between methods is the host time a method adds, without the launches' own cost
(a few microseconds each on a GPU).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: kernels take CPU tensors
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import division  # noqa: E402
import division.backends  # noqa: E402
from division.methods import knobs_from_text  # noqa: E402
from division.triton_launch import CachedLaunch  # noqa: E402

LAUNCHES = [0]


def _skip_launch(self, key, grid, args, constexprs, num_warps) -> None:
    LAUNCHES[0] += 1


def _valid_pool_indices(decode_offsets):
    """The max-pool decode with its skipped kernel's output set to index 0: backward scatters
    through those indices, and the uninitialised ones of a skipped launch crash the process."""
    def decode(offsets, geometry):
        indices = decode_offsets(offsets, geometry)
        return None if indices is None else indices.zero_()
    return decode


class AllocationCount(TorchDispatchMode):
    """Counts the allocation ops (``torch.empty`` and kin) dispatched: the memory a method's Python
    asks for by name, each a call into the caching allocator on a GPU (about 10 us of host time
    there). The outputs of compute ops (a convolution's, a backward's) are not counted."""

    _ALLOCATING = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros",
                   "zeros_like", "new_zeros", "full", "full_like", "ones", "ones_like")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self._ALLOCATING:
            self.count += 1
        return func(*args, **(kwargs or {}))


def thin_model(name: str, size: int) -> torch.nn.Module:
    if name == "thin_vit":
        from torchvision.models.vision_transformer import VisionTransformer
        return VisionTransformer(image_size=size, patch_size=16, num_layers=12, num_heads=4, hidden_dim=64,
                                 mlp_dim=256, num_classes=10)
    if name == "thin_convnext":
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt
        return ConvNeXt([CNBlockConfig(8, 16, 3), CNBlockConfig(16, 32, 3), CNBlockConfig(32, 64, 9),
                         CNBlockConfig(64, None, 3)], num_classes=10)
    if name == "thin_resnet50":
        return _thin_resnet50()
    return torchvision.models.get_model(name, num_classes=10)


def _thin_resnet50() -> torch.nn.Module:
    """ResNet-50's 16 bottlenecks (3-4-6-3) and stem, every stage 8x narrower (32 to 256 channels out)."""
    from torchvision.models.resnet import Bottleneck, ResNet

    class ThinResNet(ResNet):
        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            return super()._make_layer(block, planes // 8, blocks, stride, dilate)
    model = ThinResNet(Bottleneck, [3, 4, 6, 3], num_classes=10)
    model.fc = torch.nn.Linear(64 * Bottleneck.expansion, 10)
    return model


def measure(model_name: str, method: str, size: int, batch: int, steps: int, top: int, knobs: dict,
            channels_last: bool = False) -> str:
    torch.manual_seed(0)
    model = thin_model(model_name, size)
    x = torch.randn(batch, 3, size, size)
    if channels_last:  # as the GPU speed runs train CNNs: the fused BatchNorm's layout
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if method != "none":
        division.build_method(method, backend="triton", **knobs).attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x).sum().backward()
        optimizer.step()

    for _ in range(3):  # first steps: plans, layouts and launch keys are made once
        step()
    LAUNCHES[0] = 0
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000.0)
    label = method + "".join(f" {k}={v}" for k, v in knobs.items()) if method != "none" else method
    launches = LAUNCHES[0] / steps
    with AllocationCount() as allocations:  # one more step, untimed: the count's mode costs time
        step()
    line = (f"{model_name} {label:>10}: {statistics.median(times):7.2f} ms per step (median of {steps}), "
            f"{launches:.0f} kernel launches skipped, {allocations.count} allocations by "
            f"name per step")
    if top:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(3):
            step()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
        line += "\n" + out.getvalue()
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="thin_vit", help="thin_vit, thin_convnext, thin_resnet50 or a torchvision model name")
    p.add_argument("--size", type=int, default=64, help="input height and width")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--methods", nargs="+", default=["none", "division"])
    p.add_argument("--channels-last", action="store_true",
                   help="model and input in channels_last, as the GPU speed runs train CNNs")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile's top N functions too")
    p.add_argument("--knobs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="the method's knobs (build_method keywords), e.g. rebuild_conv_input=true bits=4")
    args = p.parse_args()
    try:
        knobs = knobs_from_text(args.knobs)
    except ValueError as error:
        p.error(f"--knobs: {error}")
    torch.set_num_threads(1)
    division.backends.triton_available = lambda: True  # the fused codec, on CPU tensors
    CachedLaunch.launch = _skip_launch
    import division.triton_masks as masks
    masks.decode_offsets = _valid_pool_indices(masks.decode_offsets)
    for method in args.methods:
        print(measure(args.model, method, args.size, args.batch, args.steps, args.profile, knobs,
                      args.channels_last), flush=True)


if __name__ == "__main__":
    main()
