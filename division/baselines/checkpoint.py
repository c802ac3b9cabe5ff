"""Gradient checkpointing of a model's stages with ``torch.utils.checkpoint`` (method ``checkpoint``).

The model's forward is read as a chain of stages run one after the other, the chain is cut into
``segments`` groups of about equal length, and each group but the last runs under
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: only its input is kept, and its inside is
recomputed during backward. The last group runs plainly, as in ``checkpoint_sequential``: backward
starts with it, so recomputing it would cost time without lowering the peak.

Finding the chain (the model is never re-parented: forwards are wrapped per instance, so
``state_dict`` keys stay the same, and ``detach`` restores them):
1. an ``nn.Sequential`` model: its children;
2. torchvision's ResNet: the stem (conv1, bn1, relu, maxpool), the blocks of layer1..layer4, and the
   head (avgpool, flatten, fc), exactly what its forward runs;
3. torchvision's VisionTransformer: the patch embedding (with the class token and the position
   embedding), the encoder blocks, and the head (final LayerNorm, class token, heads);
4. a model with a body ``nn.Sequential`` child holding most of its parameters (the project's CIFAR
   ResNets, PreAct ResNet and DenseNet, torchvision's DenseNet, Swin, ConvNeXt, EfficientNet and
   MobileNet ``features``): the body's forward is replaced, the stem and head around it run plainly;
5. anything else: every top-level child's forward is checkpointed on its own (correct for any
   forward; ``segments`` does not apply).
Nested plain ``nn.Sequential`` stages are flattened into their children, so the groups balance
blocks rather than whole stages; a stage that starts with an in-place op is kept with the stage
before it (checkpoint keeps its input, which must not be modified in place).

Norm layers inside a checkpointed group would update their running statistics a second time during
the recomputation; their buffers are saved before and restored after it, so running statistics
match plain training exactly. Dropout masks are reproduced by checkpoint's RNG stashing.

Ledger. The activation compressor cannot see inside a checkpointed group (checkpoint's own
saved-tensor hooks replace any outer ones there), so this method keeps its ledger with a
``SaveRecorder`` (``division/baselines/_recorder.py``), counting every tensor by identity once for
``plain_bytes`` and once for ``stored_bytes``:
- saves outside the checkpointed groups (stem, head, the last group) are kept as plain autograd
  keeps them: codec ``raw``, plain = stored = their bytes;
- each group's input, which checkpoint keeps for the recomputation: codec ``checkpoint_input``,
  stored = its bytes, plain = 0;
- inside each group: on a step with a ledger the group is also run once more just before the real
  run, under a hook that counts and drops every tensor it would save (the graph is thrown away; norm
  buffers and the RNG are restored): codec ``recomputed``, plain = the bytes plain autograd would
  keep there, stored = 0. The group's input is the same tensor in both runs, and when that pass saves
  the group's output the real output is marked counted, so every tensor is counted once exactly as
  in plain autograd: ``plain_bytes`` equals method ``none``'s.
``stored_bytes`` is what stays resident between forward and backward; the transient peak while a
group is recomputed (about one group's activations) is not in the ledger, only in the allocator's
peak on CUDA. The counting pass costs one extra forward of the checkpointed groups on steps with a
ledger; ``mode=train`` records the first step only (it sets ``method.compressor.ledger = None``).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ledger import ByteLedger
from ..methods import TrainingMethod
from ._recorder import SaveRecorder, is_model_memory


@dataclass
class Stage:
    """One link of the chain: ``run`` maps the previous stage's output to this stage's output."""

    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    modules: list[nn.Module] = field(default_factory=list)


def _module_stage(name: str, module: nn.Module) -> Stage:
    return Stage(name, module, [module])


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _flatten(prefix: str, module: nn.Module) -> list[Stage]:
    """A plain ``nn.Sequential``'s children as stages, nested plain Sequentials expanded."""
    stages = []
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        stages.extend(_flatten(name, child) if _is_plain_sequential(child) else [_module_stage(name, child)])
    return stages


def _starts_in_place(stage: Stage) -> bool:
    first = stage.modules[0] if stage.modules else None
    return bool(getattr(first, "inplace", False))


def _merge_in_place_starts(stages: list[Stage]) -> list[Stage]:
    """Join a stage that modifies its input in place (an in-place ReLU) to the stage before it."""
    merged: list[Stage] = []
    for stage in stages:
        if merged and _starts_in_place(stage):
            prev = merged.pop()
            merged.append(Stage(f"{prev.name}+{stage.name}", _compose([prev, stage]), prev.modules + stage.modules))
        else:
            merged.append(stage)
    return merged


def _compose(stages: list[Stage]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        for stage in stages:
            x = stage.run(x)
        return x
    return run


def _torchvision_resnet_chain(model: nn.Module) -> Optional[list[Stage]]:
    """The chain of torchvision's ResNet (its ``_forward_impl``), if ``model`` is one and unmodified."""
    try:
        from torchvision.models.resnet import ResNet
    except ImportError:
        return None
    if not isinstance(model, ResNet) or type(model).forward is not ResNet.forward \
            or type(model)._forward_impl is not ResNet._forward_impl:
        return None
    m = model
    stem = Stage("stem", lambda x: m.maxpool(m.relu(m.bn1(m.conv1(x)))), [m.conv1, m.bn1, m.relu, m.maxpool])
    head = Stage("head", lambda x: m.fc(torch.flatten(m.avgpool(x), 1)), [m.avgpool, m.fc])
    blocks = []
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        blocks.extend(_flatten(layer, getattr(m, layer)))
    return [stem] + blocks + [head]


def _torchvision_vit_chain(model: nn.Module) -> Optional[list[Stage]]:
    """The chain of torchvision's VisionTransformer (its ``forward`` and its encoder's), if ``model`` is
    one and unmodified."""
    try:
        from torchvision.models.vision_transformer import Encoder, VisionTransformer
    except ImportError:
        return None
    if not isinstance(model, VisionTransformer) or type(model).forward is not VisionTransformer.forward \
            or type(model.encoder).forward is not Encoder.forward:
        return None
    m, encoder = model, model.encoder

    def embed(x: torch.Tensor) -> torch.Tensor:
        x = m._process_input(x)
        x = torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return encoder.dropout(x + encoder.pos_embedding)

    stem = Stage("embed", embed, [m.conv_proj, encoder.dropout])
    head = Stage("head", lambda x: m.heads(encoder.ln(x)[:, 0]), [encoder.ln, m.heads])
    return [stem] + _flatten("encoder.layers", encoder.layers) + [head]


def _body_sequential(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """The plain ``nn.Sequential`` child that holds most of the model's parameters, if any."""
    total = sum(p.numel() for p in model.parameters())
    best = None
    for name, child in model.named_children():
        if _is_plain_sequential(child):
            size = sum(p.numel() for p in child.parameters())
            if best is None or size > best[2]:
                best = (name, child, size)
    if best is None or total == 0 or best[2] * 2 < total:
        return None
    return best[0], best[1]


def split_evenly(stages: list[Stage], segments: int) -> list[list[Stage]]:
    """``segments`` contiguous groups whose lengths differ by at most one (longer groups first)."""
    count = min(segments, len(stages))
    size, extra = divmod(len(stages), count)
    groups, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        groups.append(stages[start:end])
        start = end
    return groups


@contextlib.contextmanager
def norm_buffers_restored(modules: list[nn.Module]):
    """Undo any running-statistics update made by norm layers inside ``modules`` in this block."""
    norms = {id(m): m for root in modules for m in root.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats}
    saved = [(buf, buf.clone()) for m in norms.values() for buf in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _rng_restored(x: torch.Tensor):
    if x.device.type == "cuda":
        return torch.random.fork_rng(devices=[x.device])
    return torch.random.fork_rng(devices=[])


class CheckpointMethod(TrainingMethod):
    """Checkpoint the model's stages in ``segments`` groups; see the module docstring."""

    compile_safe = False  # its stage wrappers and ledger work through hooks, which a compiled graph bypasses
    name = "checkpoint"
    cuda_graph_safe = False  # recomputation stashes and restores the RNG state through the host

    def __init__(self, segments: int = 4):
        super().__init__()
        if not isinstance(segments, int) or segments < 1:
            raise ValueError(f"method.segments={segments!r} is not allowed: use an integer >= 1")
        self.segments = segments
        self.groups: list[list[Stage]] = []       # the chain as grouped (empty in the fallback)
        self.checkpointed: list[str] = []         # names of what runs under checkpoint, for logs
        self._wrapped_modules: list[nn.Module] = []

    # ---------------------------------------------------------------------------- attach
    def attach(self, model: nn.Module, ledger: Optional[ByteLedger] = None) -> nn.Module:
        if ledger is not None:
            self.compressor = SaveRecorder(model, ledger, own_hooks=True)
        chain = None
        if _is_plain_sequential(model):
            host, chain = model, _flatten("", model)
        elif (resnet := _torchvision_resnet_chain(model)) is not None:
            host, chain = model, resnet
        elif (vit := _torchvision_vit_chain(model)) is not None:
            host, chain = model, vit
        elif (body := _body_sequential(model)) is not None:
            host, chain = body[1], _flatten(body[0], body[1])
        if chain:
            self.groups = split_evenly(_merge_in_place_starts(chain), self.segments)
            self._wrap(host, self._grouped_forward(self.groups))
            self.checkpointed = [_group_name(group) for group in self.groups[:-1]]
        else:
            for name, child in model.named_children():
                if getattr(child, "inplace", False):
                    continue  # checkpoint keeps its input, which an in-place op would overwrite
                self._wrap(child, self._checkpointed_forward(name, child, child.forward))
                self.checkpointed.append(name)
        return model

    def _wrap(self, module: nn.Module, forward: Callable) -> None:
        module.forward = forward  # an instance attribute: the module tree and state_dict are unchanged
        self._wrapped_modules.append(module)

    def detach(self) -> None:
        for module in self._wrapped_modules:
            del module.forward  # back to the class's forward
        self._wrapped_modules, self.checkpointed, self.groups = [], [], []
        super().detach()

    # ---------------------------------------------------------------------------- running
    def _grouped_forward(self, groups: list[list[Stage]]) -> Callable:
        """The host's new forward: the groups in order, all but the last under checkpoint."""
        runs = [(_group_name(group), _compose(group), group_modules(group)) for group in groups]
        *checkpointed, (_, run_last, _) = runs
        run_all = _compose([stage for group in groups for stage in group])

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled():  # evaluation: nothing is saved, nothing to recompute
                return run_all(x)
            for name, run, modules in checkpointed:
                x = self._run_checkpointed(name, run, modules, x)
            return run_last(x)
        return forward

    def _checkpointed_forward(self, name: str, module: nn.Module, forward: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return self._run_checkpointed(name, forward, [module], *args, **kwargs)
        return wrapped

    def _run_checkpointed(self, name: str, run: Callable, modules: list[nn.Module], *args, **kwargs):
        recorder = self.compressor if isinstance(self.compressor, SaveRecorder) else None
        recording = recorder is not None and recorder.recording
        output_saved = count_plain_saves(recorder, run, modules, *args, **kwargs) if recording else False
        if recording:
            recorder.boundary = True  # what checkpoint saves outside its region: the group's inputs
        try:
            output = checkpoint(run, *args, use_reentrant=False,
                                context_fn=lambda: (contextlib.nullcontext(), norm_buffers_restored(modules)),
                                **kwargs)
        finally:
            if recording:
                recorder.boundary = False
        if output_saved and isinstance(output, torch.Tensor):
            recorder.plain.mark(output)  # counted inside the group already
        return output


def group_modules(group: list[Stage]) -> list[nn.Module]:
    return [m for stage in group for m in stage.modules]


def _group_name(group: list[Stage]) -> str:
    return group[0].name if len(group) == 1 else f"{group[0].name}..{group[-1].name}"


def count_plain_saves(recorder: SaveRecorder, run: Callable, modules: list[nn.Module], *args, **kwargs) -> bool:
    """Record what plain autograd would save inside ``run`` without keeping any of it.

    Returns whether ``run``'s output is among those saves (e.g. a closing ReLU saves it), so that the
    caller can mark the real output as counted.
    """
    saved: list[weakref.ref] = []

    def count(t: torch.Tensor):
        if not is_model_memory(t) and recorder.plain.first(t):
            recorder.record(t, codec="recomputed", plain=True, stored=False)
            saved.append(weakref.ref(t))
        return None  # dropped: this pass's graph is never run backward

    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    with _rng_restored(inputs[0] if inputs else torch.empty(0)), norm_buffers_restored(modules), \
            torch.autograd.graph.saved_tensors_hooks(count, lambda _: None), torch.enable_grad():
        output = run(*args, **kwargs)
    return any(ref() is output for ref in saved)


def build_checkpoint(segments: int = 4, **_) -> TrainingMethod:
    return CheckpointMethod(segments=segments)
