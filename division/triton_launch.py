"""What every Triton kernel of the project shares: where kernels can run, and launching them cheaply.

``interpreting()``, ``runs_here(t)``, ``dense_layout(x)`` and ``INT32_LIMIT`` decide whether a
tensor can go through a kernel (division/triton_codec.py, division/triton_masks.py). This module
imports torch only, so a CPU-only caller can ask without importing Triton.

``kernel[grid](*args, **constexprs)`` binds every argument, specialises each one (dtype, alignment,
integer divisibility), hashes the result and looks the kernel up: 75 us per launch under cProfile in
a ResNet-50 training step (624 launches, 47 ms; ``scripts/profile_step.py`` on an H200), for a few
hundred codec launches per step. ``CachedLaunch`` does the normal launch once per key, keeps the
compiled kernel it returns, and launches it directly after that.

The key is the caller's: it must hold everything Triton specialises on that can change between
calls with the same constexprs, i.e. the dtype of every pointer argument and whether each pointer
is 16-byte aligned. Integer arguments must be declared ``do_not_specialize`` in ``@triton.jit``
(so their values, not just their divisibility, may change under one key).

Under Triton's interpreter (``TRITON_INTERPRET=1``) launches return no compiled kernel; every call
then takes the normal path.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INT32_LIMIT = 2 ** 31 - 2 ** 20  # element / code indices stay below this in a kernel's int32 mode


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1 when this module loaded)."""
    return _INTERPRET


def runs_here(t: torch.Tensor) -> bool:
    """Can a kernel read ``t`` where it lives: on CUDA, or on the CPU under the interpreter."""
    return t.is_cuda or (_INTERPRET and t.device.type == "cpu")


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code: Triton's is a constexpr function whose call unwraps its
    arguments (about 10 us a call under cProfile, some 300 calls in a ResNet-50 step's launches)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for host code (see ``cdiv``): the smallest power of two >= n, 0 for 0."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def dense_layout(x: torch.Tensor) -> Optional[bool]:
    """False: contiguous; True: 4-D channels_last (storage in NHWC order); None: anything else."""
    if x.is_contiguous():
        return False
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return True
    return None

# How a compiled kernel's launcher takes its arguments: Triton releases differ on whether the
# constexprs are passed along (ignored) or left out. Found on the first direct launch.
_ALL_ARGS = "all"
_RUNTIME_ARGS = "runtime"
_NEVER = "none"
_style: Optional[str] = None


def aligned(t: torch.Tensor) -> bool:
    """Triton specialises pointers on 16-byte alignment; part of every launch key."""
    return t.data_ptr() % 16 == 0


class CachedLaunch:
    """One Triton kernel, launched through its compiled form once a key has been seen.

    ``launch(key, grid, args, constexprs, num_warps)``: ``args`` are the runtime arguments in the
    kernel's order (they come first in the signature), ``constexprs`` the keyword constexprs (a
    dict, or a function returning one: only called when the normal launch is needed).
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled: dict[Any, tuple[Any, tuple]] = {}

    def launch(self, key, grid: tuple[int, ...], args: tuple,
               constexprs: Union[dict[str, Any], Callable[[], dict[str, Any]]], num_warps: int) -> None:
        entry = self._compiled.get(key)
        if entry is not None and _direct(entry, grid, args):
            return
        if callable(constexprs):
            constexprs = constexprs()
        compiled = self.kernel[grid](*args, **constexprs, num_warps=num_warps)
        if compiled is not None and hasattr(compiled, "__getitem__") and _style != _NEVER:
            # the constexprs in signature order, as the normal launch hands them to the launcher
            names = self.kernel.arg_names[len(args):]
            if set(names) == set(constexprs):
                self._compiled[key] = (compiled, tuple(constexprs[n] for n in names))


def _current_stream(device_index: int) -> int:
    """The raw handle of the current CUDA stream: the call Triton's own launch makes.
    ``torch.cuda.current_stream()`` builds a Stream object first: 43 us a call under cProfile in
    the same ResNet-50 step (918 calls, 40 ms)."""
    return _raw_stream(device_index) if _raw_stream is not None \
        else torch.cuda.current_stream(device_index).cuda_stream


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _direct(entry, grid: tuple[int, ...], args: tuple) -> bool:
    """Launch a compiled kernel; False (nothing launched) when this Triton's launcher refuses both styles.

    This is the call ``JITFunction.run`` ends with once it has found the kernel; launch hooks
    (``knobs.runtime.launch_enter_hook``, set by profilers such as Proton) are not called.
    """
    global _style
    if _style == _NEVER:
        return False
    compiled, constants = entry
    stream = _current_stream(torch.cuda.current_device())
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    if _style is not None:
        full = args + constants if _style == _ALL_ARGS else args
        compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata,
                     None, None, None, *full)
        return True
    # First direct launch: the launcher parses a fixed argument tuple, so the wrong style raises
    # TypeError before anything reaches the GPU. A Triton without these attributes never goes direct.
    try:
        compiled[(grid[0], g1, g2)]   # loads the module and function handles
        run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    except (AttributeError, TypeError):
        _style = _NEVER
        return False
    for style, full in ((_ALL_ARGS, args + constants), (_RUNTIME_ARGS, args)):
        try:
            run(grid[0], g1, g2, stream, function, metadata, None, None, None, *full)
        except TypeError:
            continue
        _style = style
        return True
    _style = _NEVER
    return False


def direct_launch_style() -> Optional[str]:
    """How compiled kernels are being launched: "all", "runtime", "none" (always the normal path),
    or None (no direct launch yet)."""
    return _style
