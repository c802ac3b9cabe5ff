"""Forward, loss and backward of a training step replayed from a CUDA graph (``cuda_graph=true``).

Compressing activations adds hundreds of small kernels to a step (one encode per saved tensor,
one decode per unpack), each issued by a Python hook: on a fast GPU the host, not the GPU, sets the
pace. A CUDA graph records the step's kernels once and replays them with one call, so the hooks,
the codec's Python and the launches cost nothing after the capture.

``GraphedStep(model, method, cfg, device)`` is called like the eager block it replaces,
``loss, logits = graphed(images, target)``, and leaves the grads in ``param.grad`` for the optimizer
step, which stays eager (so learning-rate schedules and the GradScaler work unchanged):
- the first ``warmup`` calls run eagerly on a side stream (cuDNN / cuBLAS set-up, lazy buffers,
  autocast); the next one captures forward, loss and backward on static input buffers, then every
  call copies its batch into them and replays;
- a batch of another shape (the last, smaller batch of an epoch) runs eagerly, into the same grads;
- the returned ``loss`` and ``logits`` are the graph's static outputs: read them before the next call;
- the grads are the graph's too: ``optimizer.zero_grad`` is not needed (each replay writes them
  afresh) and must not set them to None, which would detach them from the graph.
Autocast runs with its weight cache off, as capture requires; DIVISION's stochastic rounding takes a
device counter into its seed, so every replay draws new random numbers. The method is told before
the first step (``method.use_cuda_graph()``): DIVISION then runs its encodes on a side stream
(``method.side_stream=auto``), which the graph records as parallel branches.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

import division

from . import distributed
from .build import forward_loss

log = logging.getLogger(__name__)

WARMUP_STEPS = 3


class CudaGraphError(ValueError):
    """``cuda_graph=true`` asked for where a captured step cannot run."""


def check_cuda_graph(cfg, method: division.TrainingMethod, device: torch.device, world_size: int) -> None:
    """Refuse, with the fix, the set-ups whose steps cannot be captured."""
    if device.type != "cuda":
        raise CudaGraphError(f"cuda_graph=true needs a CUDA device (this run is on {device.type}); "
                             "drop cuda_graph=true or run with device=cuda")
    if not method.cuda_graph_safe:
        raise CudaGraphError(f"method={method.name} cannot be captured in a CUDA graph; "
                             "drop cuda_graph=true for it")
    if world_size > 1:
        raise CudaGraphError("cuda_graph=true is single-process only (DDP's all-reduce is not captured); "
                             "drop it under torchrun")


class GraphedStep:
    """Forward, loss and backward of ``model``, captured after ``warmup`` eager steps; see the module doc."""

    def __init__(self, model: nn.Module, method: division.TrainingMethod, cfg, device: torch.device,
                 scaler: Optional[torch.amp.GradScaler] = None, warmup: int = WARMUP_STEPS):
        check_cuda_graph(cfg, method, device, distributed.world_size())
        self.model = model
        self.method = method
        self.cfg = cfg
        self.device = device
        self.scaler = scaler
        self.warmup = warmup
        self.calls = 0
        self.replays = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._stream = torch.cuda.Stream(device)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._static: Optional[tuple[torch.Tensor, ...]] = None   # images, target, loss, logits
        self._grads: list[Optional[torch.Tensor]] = []
        division.prepare_cuda_graph(device)
        method.use_cuda_graph()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self.graph is None and self.calls > self.warmup:
            self._capture(images, target)
        if self.graph is None or not self._fits(images, target):
            return self._eager(images, target)
        static_images, static_target, loss, logits = self._static
        static_images.copy_(images)
        static_target.copy_(target)
        self.graph.replay()
        self.replays += 1
        self._restore_grads()
        return loss, logits

    # ------------------------------------------------------------------------------ internals
    def _forward_backward(self, images: torch.Tensor, target: torch.Tensor):
        with self.method.step_context():
            logits, loss = forward_loss(self.model, images, target, self.cfg, self.device, cache_enabled=False)
            scaled = self.scaler.scale(loss) if self.scaler is not None else loss
            scaled.backward()
        return loss, logits

    def _eager(self, images: torch.Tensor, target: torch.Tensor):
        """An ordinary step, on the side stream: the capture's stream must have seen the work first."""
        if self.graph is not None:
            self._restore_grads()
            for g in self._grads:
                if g is not None:
                    g.zero_()  # backward accumulates into the graph's grads, in place
        else:
            for p in self._params:
                p.grad = None
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            loss, logits = self._forward_backward(images, target)
        current.wait_stream(self._stream)
        return loss.detach(), logits.detach()

    def _capture(self, images: torch.Tensor, target: torch.Tensor) -> None:
        static_images = images.detach().clone(memory_format=torch.preserve_format)
        static_target = target.detach().clone()
        for p in self._params:
            p.grad = None  # the captured backward allocates them, so replays write, not accumulate
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._stream):
            loss, logits = self._forward_backward(static_images, static_target)
        self._static = (static_images, static_target, loss.detach(), logits.detach())
        self._grads = [p.grad for p in self._params]
        self.graph = graph
        log.info("training step captured in a CUDA graph after %d eager steps", self.warmup)

    def _fits(self, images: torch.Tensor, target: torch.Tensor) -> bool:
        static_images, static_target = self._static[0], self._static[1]
        return (images.shape == static_images.shape and images.dtype == static_images.dtype
                and images.stride() == static_images.stride() and target.shape == static_target.shape)

    def _restore_grads(self) -> None:
        # something (an optimizer's zero_grad(set_to_none=True), a user) may have dropped them
        for p, g in zip(self._params, self._grads):
            if p.grad is not g:
                p.grad = g
