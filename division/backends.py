"""Choice of codec implementation: the plain-PyTorch reference, or fused GPU kernels when present.

``backend="torch"`` is the reference and the CPU path. ``backend="triton"`` asks for the fused
kernels (an error if they cannot run here); ``backend="auto"`` takes them on a CUDA machine with
Triton and falls back to the reference elsewhere. Both produce the same stored format.
"""
from __future__ import annotations

import importlib.util

import torch

from .codec import ActivationCodec

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def division_codec(backend: str = "auto", **knobs) -> ActivationCodec:
    if backend not in BACKENDS:
        raise ValueError(f"method.backend={backend!r} is not one of {BACKENDS}")
    use_triton = backend == "triton" or (backend == "auto" and triton_available())
    if use_triton:
        if not triton_available():
            raise RuntimeError("method.backend=triton needs CUDA and the triton package; "
                               "use method.backend=torch (the reference) on this machine")
        from .triton_codec import TritonDivisionCodec
        return TritonDivisionCodec(**knobs)
    from .dual_precision import DivisionCodec
    return DivisionCodec(**knobs)


def prepare_cuda_graph(device) -> None:
    """Ready the fused codec for training steps captured in a CUDA graph on ``device``.

    A captured encode cannot draw a fresh seed on the host at each replay; it mixes in a device
    counter instead, which has to exist before the capture starts.
    """
    if triton_available() and torch.device(device).type == "cuda":
        from .triton_codec import prepare_graph_capture
        prepare_graph_capture(torch.device(device))
