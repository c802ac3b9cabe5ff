"""Ledger bookkeeping for the methods whose saves the activation compressor cannot see.

Checkpointing runs part of the forward under ``torch.utils.checkpoint``'s own saved-tensor hooks,
and swap under ``save_on_cpu``'s; the compressor's hooks would replace theirs. ``SaveRecorder`` keeps
the ledger for them instead: it resets the ledger at the start of each training forward, tracks
which module is running (for the rows' layer names), and counts every tensor once for
``plain_bytes`` (plain autograd keeps one reference per tensor) and once for ``stored_bytes``.

It answers to the two things the runners use on ``TrainingMethod.compressor``: ``ledger`` (set it
to ``None`` to stop recording, as ``mode=train`` does after its first step) and ``remove()``.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from ..compressor import module_kind
from ..ledger import ByteLedger, LedgerEntry


def is_model_memory(t: torch.Tensor) -> bool:
    """Parameters and views of them (Linear saves ``weight.t()``): model memory, left out of the
    ledger, as the activation compressor does."""
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


class FirstSaves:
    """Which tensors were counted already this step. Identity is held by a weak reference, so a new
    tensor that reuses a freed one's id is never mistaken for it."""

    def __init__(self) -> None:
        self._seen: dict[int, weakref.ref] = {}

    def clear(self) -> None:
        self._seen.clear()

    def mark(self, t: torch.Tensor) -> None:
        self._seen[id(t)] = weakref.ref(t)

    def first(self, t: torch.Tensor) -> bool:
        """True (and remember ``t``) if ``t`` was not counted before."""
        ref = self._seen.get(id(t))
        if ref is not None and ref() is t:
            return False
        self.mark(t)
        return True


class SaveRecorder:
    """Records a model's saves into ``ledger`` during its training forward passes.

    own_hooks: also install saved-tensor hooks for the forward (they keep every tensor as is and
        record it), for a method whose other saves happen under hooks of its own (checkpoint).
    """

    def __init__(self, model: nn.Module, ledger: ByteLedger, *, own_hooks: bool = False):
        self.ledger: Optional[ByteLedger] = ledger
        self.plain = FirstSaves()
        self.stored = FirstSaves()
        self.boundary = False        # set by checkpoint while it saves a group's inputs
        self._own_hooks = own_hooks
        self._hooks_ctx = None
        self._active = False
        self._layers: list[tuple[str, str]] = []
        self._handles = [model.register_forward_pre_hook(self._start),
                         model.register_forward_hook(self._end, always_call=True)]
        for name, module in model.named_modules():
            if name:
                kind = module_kind(module) or "other"
                self._handles.append(module.register_forward_pre_hook(self._push(name, kind)))
                self._handles.append(module.register_forward_hook(self._pop, always_call=True))

    @property
    def recording(self) -> bool:
        return self._active and self.ledger is not None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------------- forward tracking
    def _start(self, module: nn.Module, args) -> None:
        if self._active or self.ledger is None or not (module.training and torch.is_grad_enabled()):
            return
        self._active = True
        self.ledger.reset()
        self.plain.clear()
        self.stored.clear()
        self._layers.clear()
        if self._own_hooks:
            self._hooks_ctx = torch.autograd.graph.saved_tensors_hooks(self._keep, lambda t: t)
            self._hooks_ctx.__enter__()

    def _end(self, module: nn.Module, args, output) -> None:
        if not self._active:
            return
        if self._hooks_ctx is not None:
            self._hooks_ctx.__exit__(None, None, None)
            self._hooks_ctx = None
        self._active = False

    def _push(self, name: str, kind: str):
        def push(module, args):
            if self._active:
                self._layers.append((name, kind))
        return push

    def _pop(self, module, args, output) -> None:
        if self._active and self._layers:
            self._layers.pop()

    # ---------------------------------------------------------------------------------- rows
    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        """Saved-tensor pack hook: keep ``t`` (as plain autograd does) and record it."""
        if self.recording and not is_model_memory(t):
            stored = self.stored.first(t)
            if self.boundary:  # checkpoint's copy of a group input: kept, but no plain-autograd save
                self.record(t, codec="checkpoint_input" if stored else "shared", plain=False, stored=stored)
            else:
                self.record(t, codec="raw" if stored else "shared", plain=self.plain.first(t), stored=stored)
        return t

    def record(self, t: torch.Tensor, *, codec: str, plain: bool, stored: bool) -> None:
        """A row for one save of ``t``, its bytes counted as plain autograd's (``plain``) and as kept
        on the device (``stored``). Callers count each tensor once per column (``self.plain``,
        ``self.stored``)."""
        nbytes = t.numel() * t.element_size()
        layer, kind = self._layers[-1] if self._layers else ("", "other")
        self.ledger.record(LedgerEntry(layer=layer, kind=kind, codec=codec, shape=tuple(t.shape),
                                       dtype=str(t.dtype).replace("torch.", ""),
                                       plain_bytes=nbytes if plain else 0, stored_bytes=nbytes if stored else 0,
                                       op=kind, compressed=codec != "raw"))
