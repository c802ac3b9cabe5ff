"""A compiled model that stops compiling says so, instead of training on uncompiled.

Dynamo keeps at most ``torch._dynamo.config.recompile_limit`` (8) graphs per code object, and
every model a process compiles adds its graphs to the same one (``nn.Module.__call__``'s). Past
the limit, Dynamo's default is to run the frame without compiling it, with a logged warning
only. For DIVISION that is the worst outcome: its layers compress inside the traced graph
(``division.compiled``), so an uncompiled frame can train with nothing compressed while the run
reports DIVISION; and a compiled speed record would time an eager step. This happens in one
process that compiles many models: a sweep (``python main.py -m ... compile=true``), a notebook,
a test session.

``refuse_recompile_limit`` makes the calls of a compiled model ask Dynamo to fail instead, and
turns that failure into ``RecompileLimitReached``, which names the limit and the two ways out.
Inside those calls Dynamo's ``suppress_errors`` is off as well (it may not be on together with
the failure, and it would run a frame whose compilation failed uncompiled, in silence too).
The runners also reset Dynamo before each run they compile (``runners.distributed.prepare_model``),
so a sweep's runs do not add up.
"""
from __future__ import annotations

import torch
from torch import nn

# (the key's name before torch 2.6, and since)
_FAIL_KEYS = ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")
_LIMIT_ERRORS = tuple(getattr(torch._dynamo.exc, name) for name in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")
                      if hasattr(torch._dynamo.exc, name))


class RecompileLimitReached(RuntimeError):
    """torch.compile reached its recompile limit: the model would have run uncompiled."""


def _fail_key() -> str:
    for key in _FAIL_KEYS:
        if key in torch._dynamo.config._config:
            return key
    raise RuntimeError(f"this torch ({torch.__version__}) has none of the Dynamo settings {_FAIL_KEYS}: "
                       "a compiled model could run uncompiled without an error")


def refuse_recompile_limit(compiled: nn.Module, method: str) -> nn.Module:
    """Make each call of ``compiled`` (``torch.compile``'s module) raise ``RecompileLimitReached``
    where Dynamo would run it uncompiled; return it."""
    forward = compiled.forward
    key = _fail_key()
    config = torch._dynamo.config
    # one patch, made once: making one costs several times what entering it does, on every step
    patch = config.patch(**{key: True, "suppress_errors": False})

    def checked(*args, **kwargs):
        try:
            if getattr(config, key) and not config.suppress_errors:  # set already (a call inside a call)
                return forward(*args, **kwargs)
            with patch:
                return forward(*args, **kwargs)
        except _LIMIT_ERRORS as err:
            limit = config.recompile_limit
            raise RecompileLimitReached(
                f"torch.compile reached its recompile limit ({limit} graphs for one piece of code; "
                f"every model this process compiles counts): past it, this model would run "
                f"uncompiled, and method {method!r} would not do what it reports. Call "
                "torch._dynamo.reset() before compiling a new model, or raise "
                "torch._dynamo.config.recompile_limit") from err
    compiled.forward = checked
    return compiled
