"""``compile=``: which torch.compile mode a run asks for, and whether it can have it.

``compile=false`` (default) trains eagerly; ``compile=true`` is ``torch.compile(model)`` in its default
mode; ``compile=<mode>`` names the mode. The method runs inside the compiled graph
(``TrainingMethod.compile``); methods that work only through saved-tensor hooks are refused.
"""
from __future__ import annotations

from typing import Optional

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def compile_mode(cfg) -> Optional[str]:
    """The ``torch.compile`` mode the config asks for (``compile=true`` is "default"), or None."""
    value = cfg.get("compile", False)
    if value is False or value is None:
        return None
    return "default" if value is True else str(value)


def compile_problem(cfg, method) -> Optional[str]:
    """Why this run cannot be compiled as configured (a message naming the key and the fix), or None."""
    value = cfg.get("compile", False)
    if not (isinstance(value, bool) or value is None or value in COMPILE_MODES):
        return (f"compile={value!r} is not allowed: use true, false or a torch.compile mode "
                f"({', '.join(COMPILE_MODES)})")
    if compile_mode(cfg) is None:
        return None
    if cfg.get("cuda_graph"):
        return ("compile and cuda_graph=true cannot be combined: use compile=reduce-overhead for "
                "torch.compile's own CUDA graphs, or cuda_graph=true without compile")
    if not method.compile_safe:
        return (f"compile={value!r} is not available for method={method.name}: it keeps activations "
                "through saved-tensor hooks, which a compiled graph bypasses (it would train "
                "uncompressed); use compile=false, or method=division or none")
    return None
