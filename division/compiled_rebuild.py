"""Rebuilt convolution inputs, recomputed BatchNorm inputs and shared convolution input codes under
``torch.compile`` (``method.rebuild_conv_input``, ``method.recompute_norm_input``, and always).

The compiled twin of ``division.rebuild``: in conv-BN-ReLU-conv the second convolution's input,
ReLU(BN(x)), is not kept; its backward rebuilds it as

    relu(x_hat * scale + shift) with the ReLU's 1-bit mask,  scale = weight * invstd,  shift = bias - mean * scale

from what the BatchNorm and the ReLU keep for their own backward anyway: x's codes, the batch
statistics, the affine parameters and the mask. A convolution reading BN(x) itself is rebuilt the
same way without the mask.

The layers' compiled functions (``division.compiled``) run one module at a time, so the link from
a BatchNorm to the convolution that reads its output is made while Dynamo traces the forward:
``ConvInputChain`` holds a source for each BatchNorm output: the tensor the BatchNorm returned and
what rebuilds it. A ReLU module whose input *is* such a tensor adds a source for its own output,
with its mask; every convolution whose input *is* a source's tensor (a ResNet block's input is read
by two) takes the rebuilding function. Identity (``is``), not position, decides: a residual sum, a
functional ReLU or anything else between the two breaks the link, and the convolution keeps its
input's codes as usual. Identity cannot see an in-place change (torchvision's ResNets add the
shortcut into the last BatchNorm's output in place, then apply the block's ReLU): so each link is
also proved once, before the first trace, by an eager forward that checks version counters
(``prove``, run with the compiled coverage on the first training call), and the trace follows
proved links only. The model's forward drops the sources when it returns, so they live only
while the forward is traced (Dynamo turns the mutations into nothing: no tensor leaves the graph
through them); in an eager run of these functions (``CompiledLayers(eager=True)``) they live until
the forward returns.

The rebuilt convolution's saved tensors are the BatchNorm's and the ReLU's own (the same graph
nodes), so the compiled graph keeps them once: it saves nothing for the convolution's input.

Transformers and ConvNeXt, the twin of the eager ``output_source``: a GELU or SiLU module encodes its
input itself and hands on its output's recipe, act(x_hat); an ``nn.LayerNorm`` (with its affine
parameters) hands on x_hat_norm * weight + bias, from the codes of its normalized input that its
own backward keeps (no statistics recomputed). A Linear, a self-attention's input projection
(``division.compiled_attention``) or a convolution whose input *is* such an output, on a link
``prove`` holds, keeps nothing of it. A dropout of p = 0 in between (a ViT's MLP: Linear, GELU,
dropout, Linear) returns its input itself when traced, as eagerly, so the link passes through it.

The compiled twin of the eager recompute (``division.rebuild.ConvSource``): a 1x1 or depthwise convolution (with
``recompute_norm_input``) encodes its input itself, or reads it rebuilt, and hands on its output's
recipe; a BatchNorm whose input *is* that output (a link proved by ``prove`` too) keeps nothing of
it, and its backward runs the convolution again on the decoded (or rebuilt) input. What backward
makes from what is a recipe (below), nested where a recompute reads a rebuilt input (a bottleneck's
conv3) and a rebuild a recomputed one (its conv2 reads ReLU(bn1), whose input conv1 recomputes).

Shared input codes (``CompiledLayers(share_conv_inputs=True)``, the default): a convolution whose
input a later convolution reads unchanged (a ResNet block's input, read by conv1 and by the
downsample convolution; a link ``prove`` holds, version counters included) encodes it itself, and
the later one's backward decodes those codes: one encode and one copy of the codes in the traced
graph, where two encodes of the GPU's fused op would both be kept (``division.compiled_ops``). The
ledger shows the later convolution's input as ``shared``, naming the first.

Each reader makes its recipe itself: a rebuilt BatchNorm input is decoded twice in backward (for
the convolution and for the BatchNorm), and so is a recomputing convolution's input (for the
BatchNorm and for the convolution), where the eager path shares one decode.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.comptime import comptime
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from . import compiled_ops
from .rebuild import cheap_to_recompute
from .compiled import (_ACTIVATIONS, _Activation, _BatchNorm, _LayerNorm, _Relu, _cast, _compute_dtype,
                       _memory_format, _unpack_mask, TensorCodec, activation, activation_applies,
                       batch_norm_affine, batch_norm_gradients, batch_norm_output, batch_statistics,
                       conv_applies, conv_arguments, fused_batch_norm, fused_relu_applies, layer_norm_affine,
                       layer_norm_codes, linear_gradients)

# How backward makes a tensor that was not stored, a recipe (nested tuples, which Dynamo keeps in a dict
# without a graph break, and hands to an autograd function's apply flattened, ``_flatten``):
#   ("codes", layout, encoded)                                  x's codes: decode them
#   ("norm", inner, mean, invstd, weight, bias, bits, mask_cl)  BN(inner), with a ReLU's mask (bits) if any
#   ("conv", inner, weight, bias, conv_args, dtype, format)     a cheap convolution of inner
#   ("act", inner, kind, approximate)                            GELU or SiLU of inner
#   ("ln", inner, weight, bias)                                  a LayerNorm's output from its normalized input
Recipe = tuple
# A source: (the tensor a module must read, its recipe, the layer it comes from, its kind: "norm" for
# BN(x) or ReLU(BN(x)), "conv" for a cheap convolution's output, "act" for a GELU's or SiLU's output,
# "ln" for a LayerNorm module's).
Source = tuple
# Which sources each reader rebuilds its input from (a convolution also from a ReLU of a BatchNorm,
# which ``prove`` tracks as "relu")
READ_BY = ((nn.Linear, ("act", "ln")), (nn.MultiheadAttention, ("ln",)), (nn.modules.conv._ConvNd, ("norm", "act")))


def read_by(module: nn.Module) -> tuple:
    """The kinds of source ``module`` rebuilds its input from (``READ_BY``)."""
    return next((kinds for cls, kinds in READ_BY if isinstance(module, cls)), ())


class ConvInputChain:
    """The BatchNorm and cheap-convolution sources of one traced forward, the convolutions
    rebuilt from a BatchNorm (``rebuild``), the BatchNorms whose input is recomputed by a
    convolution (``recompute``, ``method.recompute_norm_input``) and the convolutions that read
    the codes of an earlier convolution's input (``share``)."""

    def __init__(self, rebuild: bool = True, recompute: bool = False, share: bool = True, fused_relu: bool = True):
        _CHAINS[id(self)] = self
        self.rebuild, self.recompute, self.share, self.fused_relu = rebuild, recompute, share, fused_relu
        self._sources: dict[str, Source] = {}  # module name -> the source of its output
        # first reader's name -> (its input tensor, that input's codes as a recipe), while traced
        self._read: dict[str, tuple] = {}
        self.rebuilt: dict[str, str] = {}  # convolution name -> the BatchNorm it is rebuilt from
        self.inputs: dict[str, tuple] = {}  # convolution name -> (shape, dtype) of its rebuilt input
        self.recomputed: dict[str, str] = {}  # BatchNorm name -> the convolution that recomputes its input
        self.norm_inputs: dict[str, tuple] = {}  # BatchNorm name -> (shape, dtype) of its recomputed input
        self.shared: dict[str, str] = {}  # convolution name -> the convolution whose input's codes it reads
        self.shared_inputs: dict[str, tuple] = {}  # convolution name -> (shape, dtype) of that input
        self.ops: dict[str, str] = {}  # reader name -> its module's type (Conv2d, Linear, BatchNorm2d, ...)
        # proven (reader, BatchNorm or convolution) links (``prove``)
        self.proven: set[tuple[str, str]] = set()
        # proven (convolution, the convolution that read the same tensor before it) links (``prove``),
        # and those first convolutions, which encode their input outside their function to hand it on
        self.shares: set[tuple[str, str]] = set()
        self.first_readers: set[str] = set()
        # BatchNorm name -> the ReLU module that ``prove`` saw read its output first and alone
        # (``_absorbed_reads``): the fused BatchNorm applies that ReLU itself (``fused_relu``)
        self.absorbed: dict[str, str] = {}
        self._absorbed_outputs: dict[str, tuple] = {}  # ReLU name -> (its input, recipe, BatchNorm), while traced

    def forward(self, name: str, module: nn.Module, x: torch.Tensor, codec: TensorCodec, compressed_forward):
        """The compressing forward of a module on the chain's terms (module docstring)."""
        source = self._linked_source(name, x)
        linked = source is not None
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and name in self.absorbed \
                and not (self.recompute and linked and source[3] == "conv") and fused_relu_applies(module, x, codec):
            y, layout, encoded, mean, invstd, mask = fused_batch_norm(module, x, codec, relu=True)
            recipe = _norm_recipe(module, ("codes", layout, encoded), mean, invstd, mask)
            relu = self.absorbed[name]
            if relu in self._absorbed_outputs:  # (a ReLU module shared by two BatchNorms, as torchvision's)
                self._unread_folds()  # its earlier BatchNorm's output was not read by it
            self._absorbed_outputs[relu] = (y, recipe, name)
            return y
        if isinstance(module, nn.ReLU) and name in self._absorbed_outputs and self._absorbed_outputs[name][0] is x:
            # the BatchNorm before it applied it (and keeps its mask): its output is this ReLU's
            _, recipe, norm = self._absorbed_outputs.pop(name)
            if self.rebuild:
                self._sources[name] = (x, recipe, norm, "norm")
            return x
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (self.rebuild or self.recompute):
            inner = None
            if self.recompute and linked and source[3] == "conv":
                inner = source[1]
                self._note("recomputed", name, source[2], x, module)
            y, recipe = _norm_with_recipe(module, x, codec, inner)
            self._sources[name] = (y, recipe, name, "norm")
            return y
        if self.rebuild and linked and source[3] == "norm" and isinstance(module, nn.ReLU):
            y, bits = _ReluKeepingMask.apply(x)
            recipe = source[1][:6] + (bits, _memory_format(y) == "channels_last")
            self._sources[name] = (y, recipe, source[2], "norm")
            return y
        if self.rebuild and _output_source(module):
            y, recipe, kind = (_layer_norm_with_recipe if isinstance(module, nn.LayerNorm)
                               else _activation_with_recipe)(module, x, codec)
            self._sources[name] = (y, recipe, name, kind)
            return y
        if self.rebuild and linked and isinstance(module, nn.Linear) and source[3] in read_by(module):
            self._note("rebuilt", name, source[2], x, module)
            return linear_with_recipe(x, module.weight, module.bias, codec, source[1])
        if self.rebuild and linked and _rebuildable_conv(module) and source[3] in read_by(module):
            self._note("rebuilt", name, source[2], x, module)
            y, recipe = _conv_with_recipe(module, x, codec, source[1])
            if self.recompute and _cheap_conv(module):
                self._sources[name] = (y, recipe, name, "conv")
            return y
        if not _rebuildable_conv(module):
            return compressed_forward(module, x, codec)
        inner = self._shared_codes(name, module, x)
        first_reader = name in self.first_readers
        recomputable = self.recompute and _cheap_conv(module)
        if inner is not None or first_reader or recomputable:
            y, recipe = _conv_with_recipe(module, x, codec, inner)
            if first_reader and inner is None:
                self._read[name] = (x, recipe[1])
            if recomputable:
                self._sources[name] = (y, recipe, name, "conv")
            return y
        return compressed_forward(module, x, codec)

    def _shared_codes(self, reader: str, module: nn.Module, x: torch.Tensor) -> Optional[Recipe]:
        """The codes of ``x`` that an earlier convolution encoded (a ResNet block's input, read by
        conv1 and by the downsample convolution), on a link ``prove`` holds; else None."""
        for first, (tensor, recipe) in self._read.items():
            if tensor is x and (reader, first) in self.shares:
                layout = recipe[1]
                if layout.dtype != (_compute_dtype(x) or x.dtype):  # coded in another dtype
                    return None
                self._note("shared", reader, first, x, module)
                return recipe
        return None

    def attention_input(self, name: str, module: nn.Module, x: torch.Tensor) -> Optional[Recipe]:
        """The recipe a self-attention's input projection rebuilds its input ``x`` from (a
        LayerNorm module's output, a proven link), or None: it keeps x's codes."""
        source = self._linked_source(name, x)
        if not (self.rebuild and source is not None and source[3] in read_by(module)):
            return None
        self._note("rebuilt", name, source[2], x, module)
        return source[1]

    def prove(self, model: nn.Module, modules, args: tuple) -> None:
        """Which (ReLU or convolution, BatchNorm) links hold, from one eager forward of ``model``
        on ``args`` (no gradients, leaving no trace): a ReLU module whose input is a BatchNorm's
        output unchanged since (its version counter), a convolution whose input is such a
        BatchNorm or ReLU output, among ``modules`` (the names the compiled layers cover). The
        traced forward follows only these: identity alone cannot see an in-place change in
        between (a residual ``out += identity`` on a BatchNorm's output, then a ReLU)."""
        from .compiled import traceless_forward
        outputs: dict[int, tuple] = {}  # id -> (tensor, version, BatchNorm or convolution, kind)
        links: dict[int, str] = {}      # a ReLU module's BatchNorm while it runs
        proven: set[tuple[str, str]] = set()

        def source_of(inputs) -> Optional[tuple]:
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            entry = outputs.get(id(x)) if x is not None else None
            return entry if entry is not None and entry[0] is x and entry[1] == x._version else None

        def after(name, kind):
            def hook(_module, _inputs, output):
                outputs[id(output)] = (output, output._version, name, kind)
            return hook

        def before(name, kinds):
            def hook(_module, inputs):
                entry = source_of(inputs)
                if entry is not None and entry[3] in kinds:
                    proven.add((name, entry[2]))
            return hook

        def before_relu(name):
            def hook(module, inputs):
                entry = source_of(inputs)
                if entry is not None and entry[3] == "norm":
                    links[id(module)] = entry[2]
                    proven.add((name, entry[2]))
            return hook

        def after_relu(module, _inputs, output):
            norm = links.pop(id(module), None)
            if norm is not None:
                outputs[id(output)] = (output, output._version, norm, "relu")

        read: dict[int, tuple] = {}  # id -> (a convolution's input, its version, that convolution)
        shares: set[tuple[str, str]] = set()

        def before_conv(name):
            def hook(_module, inputs):
                x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
                if x is None:
                    return
                entry = read.get(id(x))
                if entry is not None and entry[0] is x and entry[1] == x._version:
                    shares.add((name, entry[2]))
                else:
                    read[id(x)] = (x, x._version, name)
            return hook

        handles = []
        for name, module in model.named_modules():
            if name not in modules:
                continue
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if self.recompute:
                    handles.append(module.register_forward_pre_hook(before(name, ("conv",))))
                handles.append(module.register_forward_hook(after(name, "norm")))
            elif isinstance(module, nn.ReLU):
                handles.append(module.register_forward_pre_hook(before_relu(name)))
                handles.append(module.register_forward_hook(after_relu))
            elif _output_source(module):
                handles.append(module.register_forward_hook(
                    after(name, "ln" if isinstance(module, nn.LayerNorm) else "act")))
            elif isinstance(module, (nn.Linear, nn.MultiheadAttention)):
                handles.append(module.register_forward_pre_hook(before(name, read_by(module))))
            elif _rebuildable_conv(module):
                handles.append(module.register_forward_pre_hook(before(name, read_by(module) + ("relu",))))
                if self.share:
                    handles.append(module.register_forward_pre_hook(before_conv(name)))
                if self.recompute and _cheap_conv(module):
                    handles.append(module.register_forward_hook(after(name, "conv")))
        watch = _ReadWatch() if self.fused_relu else None
        if watch is not None:
            for name, module in model.named_modules():
                if name in modules and isinstance(module, nn.modules.batchnorm._BatchNorm):
                    handles.append(module.register_forward_hook(watch.output_of(name)))
                elif name in modules and isinstance(module, nn.ReLU):
                    handles += watch.reader(name, module)
        with torch.no_grad(), (watch if watch is not None else contextlib.nullcontext()):
            traceless_forward(model, args, handles)
        self.proven, self.shares = proven, shares
        self.first_readers = {first for _, first in shares}
        self.absorbed = watch.absorbed() if watch is not None else {}

    def _note(self, which: str, reader: str, source: str, x: torch.Tensor, module: nn.Module) -> None:
        """Name the layer input that ``reader`` does not keep itself (``which``: "rebuilt" from
        ``source``, a BatchNorm input "recomputed" by ``source``, or "shared": the codes
        convolution ``source`` keeps), its shape and dtype, and the reader's type (``ops``). While
        Dynamo traces, at compile time (``comptime``): a dict written from the traced code would
        be guarded on, and recompiled for once it had changed."""
        shape, dtype = tuple(x.shape), str(x.dtype).replace("torch.", "")
        op = type(module).__name__
        if torch.compiler.is_compiling():
            chain = id(self)  # noqa: F841 - read by _note_when_compiling through comptime's frame
            comptime(_note_when_compiling)
        else:
            self._record(which, reader, source, shape, dtype, op)

    def _record(self, which: str, reader: str, source: str, shape: tuple, dtype: str, op: str) -> None:
        names, inputs = {"rebuilt": (self.rebuilt, self.inputs), "recomputed": (self.recomputed, self.norm_inputs),
                         "shared": (self.shared, self.shared_inputs)}[which]
        names[reader] = source
        inputs[reader] = (shape, dtype)
        self.ops[reader] = op

    def _linked_source(self, reader: str, x: torch.Tensor) -> Optional[Source]:
        """The source whose tensor ``x`` is, on a link ``prove`` holds for ``reader``; else None."""
        for source in self._sources.values():
            if source[0] is x:
                return source if (reader, source[2]) in self.proven else None
        return None

    def clear(self) -> None:
        pending = bool(self._absorbed_outputs)
        self._sources.clear()
        self._read.clear()
        if pending:
            self._unread_folds()

    def _unread_folds(self) -> None:
        """Raise: a BatchNorm wrote ReLU(BN(x)) for a ReLU that then did not read it, so whatever
        read it instead got the ReLU's output where BN(x) was meant (a forward unlike the proof's)."""
        pending = dict(self._absorbed_outputs)
        self._absorbed_outputs.clear()
        raise RuntimeError(
            f"BatchNorm {', '.join(norm for _, _, norm in pending.values())} applied the ReLU after it "
            f"({', '.join(pending)}), but that ReLU did not read its output in this forward, unlike the "
            "forward that proved the pair: train with method.fused_norm=false (TensorCodec(fused_norm=False))")


class _ReadWatch(TorchFunctionMode):
    """Which BatchNorm outputs a ReLU module may be folded into (``ConvInputChain.absorbed``), from
    every torch function call of one eager forward (``prove``): those whose first reader is a ReLU
    module, which then is their only reader, or an in-place one (later readers read the ReLU's
    output either way). Anything else that reads the output before the ReLU (a functional op, a
    residual sum, another module) would see BN(x) without the ReLU once the two are one kernel, so
    it leaves the pair apart. Calls inside the ReLU module are its own; metadata reads
    (``Tensor.shape`` and the like) read no values."""

    def __init__(self):
        super().__init__()
        self._outputs: dict[int, tuple] = {}  # id -> (BatchNorm output, BatchNorm name)
        self._readers: dict[str, list] = {}   # BatchNorm name -> readers in order: ReLU name or None
        self._inplace: dict[str, bool] = {}   # ReLU name -> inplace
        self._in_relu: Optional[str] = None

    def output_of(self, name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor):
                self._outputs[id(output)] = (output, name)
                self._readers[name] = []
        return hook

    def reader(self, name: str, module: nn.ReLU) -> list:
        self._inplace[name] = module.inplace

        def enter(_module, _inputs):
            self._in_relu = name

        def leave(_module, _inputs, _output):
            self._in_relu = None
        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") != "__get__":
            for t in pytree.tree_leaves((args, kwargs)):
                entry = self._outputs.get(id(t)) if isinstance(t, torch.Tensor) else None
                if entry is not None and entry[0] is t:
                    readers = self._readers[entry[1]]
                    if not readers or readers[-1] != self._in_relu or self._in_relu is None:
                        readers.append(self._in_relu)
        return func(*args, **kwargs)

    def absorbed(self) -> dict[str, str]:
        folded = {}
        for norm, readers in self._readers.items():
            if readers and readers[0] is not None and (len(readers) == 1 or self._inplace[readers[0]]):
                folded[norm] = readers[0]
        return folded


def _rebuildable_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd)


_CHAINS: "weakref.WeakValueDictionary[int, ConvInputChain]" = weakref.WeakValueDictionary()


def _note_when_compiling(ctx) -> None:
    """``ConvInputChain._note`` at compile time: a comptime function may not close over anything,
    so it reads the chain's id, the names, shape and dtype from the traced frame (a dynamic shape
    has no constant value: () then)."""
    def value(name, default=None):
        try:
            return ctx.get_local(name).as_python_constant()
        except Exception:  # noqa: BLE001 - a symbolic value
            return default
    _CHAINS[value("chain")]._record(value("which"), value("reader"), value("source"), value("shape", ()),
                                    value("dtype", ""), value("op", ""))


def _cheap_conv(module: nn.Module) -> bool:
    """A convolution cheap to run again in backward (``division.rebuild.cheap_to_recompute``)."""
    return conv_applies(module) and cheap_to_recompute(module)


def _flatten(recipe: Recipe) -> tuple[tuple, list[torch.Tensor]]:
    """(the recipe with each tensor replaced by ("@", its index), the tensors): an autograd
    function takes the tensors as arguments (to save them) and the structure as a constant."""
    tensors: list[torch.Tensor] = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            tensors.append(v)
            return ("@", len(tensors) - 1)
        return tuple(walk(e) for e in v) if isinstance(v, tuple) else v
    return walk(recipe), tensors


def _unflatten(structure, tensors) -> Recipe:
    if isinstance(structure, tuple):
        if len(structure) == 2 and structure[0] == "@":
            return tensors[structure[1]]
        return tuple(_unflatten(e, tensors) for e in structure)
    return structure


def materialize(codec: TensorCodec, recipe: Recipe, dtype: torch.dtype) -> torch.Tensor:
    """The tensor a recipe describes, for a reader in ``dtype`` (the dtype and memory format are the
    caller's to set; ``dtype`` gives a ReLU's positive values their floor, its smallest normal)."""
    kind = recipe[0]
    if kind == "codes":
        _, layout, encoded = recipe
        return codec.decode(layout, tuple(encoded))
    if kind == "norm":
        _, inner, mean, invstd, weight, bias, bits, mask_cl = recipe
        scale, shift = batch_norm_affine(weight, bias, mean, invstd)
        fused = _fused_rebuild(codec, inner, scale, shift, bits, mask_cl)
        if fused is not None:
            return fused
        x_hat = materialize(codec, inner, dtype).float()
        shape = [1, -1] + [1] * (x_hat.dim() - 2)
        y = torch.addcmul(shift.view(shape), x_hat, scale.view(shape))
        if bits is not None:
            keep = _unpack_mask(bits, tuple(y.shape), mask_cl) > 0
            # 0 where the ReLU's output was 0; where it was positive, at least the smallest normal
            # (as the eager rebuild, division.exact.apply_relu_mask)
            y = torch.where(keep, y.clamp_min(torch.finfo(dtype).tiny), y.new_zeros(()))
        return y
    if kind == "act":
        _, inner, act_kind, approximate = recipe
        return activation(materialize(codec, inner, dtype), act_kind, approximate)
    if kind == "ln":
        _, inner, weight, bias = recipe
        return layer_norm_affine(materialize(codec, inner, dtype), weight, bias)
    _, inner, weight, bias, conv_args, in_dtype, memory_format = recipe
    u = _as_input(materialize(codec, inner, in_dtype), in_dtype, memory_format)
    return torch.ops.aten.convolution(u, weight, bias, *conv_args)


def _fused_rebuild(codec: TensorCodec, inner: Recipe, scale: torch.Tensor, shift: torch.Tensor,
                   bits: Optional[torch.Tensor], mask_cl: bool) -> Optional[torch.Tensor]:
    """BN(x) (with the ReLU's zeros of ``bits``) in one fused decode of x's codes, or None where x
    is not the fused encode's codes or that decode has no plan for them (``materialize`` then
    decodes x and applies the affine map and the mask with tensor ops: a full-size decode written,
    then read again)."""
    if inner[0] != "codes":
        return None
    _, layout, encoded = inner
    channels_last = layout.memory_format == "channels_last"
    if not layout.fused or layout.view is not None or not compiled_ops.affine_applies(
            layout.shape, layout.dtype, channels_last, None if bits is None else mask_cl,
            codec.block_size, codec.bits, encoded[1].device):
        return None
    return compiled_ops.fused_decode_affine(*encoded, scale.contiguous(), shift.contiguous(), bits,
                                           list(layout.shape), layout.dtype, channels_last,
                                           codec.block_size, codec.bits)


def _as_input(t: torch.Tensor, dtype: torch.dtype, memory_format: Optional[str]) -> torch.Tensor:
    t = t if t.dtype == dtype else t.to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if memory_format == "channels_last" else t


def _norm_with_recipe(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, codec: TensorCodec,
                      inner: Optional[Recipe]):
    """``batch_norm_forward`` that hands on its output's recipe: x encoded here (``inner`` None),
    so that the codes can be handed on, or recomputed in backward from ``inner``. Where the fused
    BatchNorm applies (``compiled.fused_batch_norm``), its encode is the one that hands them on."""
    fused = fused_batch_norm(module, x, codec) if inner is None else None
    if fused is not None:
        y, layout, encoded, mean, invstd, _ = fused
        return y, _norm_recipe(module, ("codes", layout, encoded), mean, invstd)
    mean, invstd = batch_statistics(module, x)
    if inner is None:
        layout, encoded = codec.encode(x.detach())
        y = _BatchNorm.apply(x, module.weight, module.bias, mean, invstd, module.eps, codec, layout, *encoded)
        inner = ("codes", layout, tuple(encoded))
    else:
        structure, tensors = _flatten(inner)
        y = _BatchNormFromRecipe.apply(x, module.weight, module.bias, mean, invstd, module.eps, codec,
                                       structure, *tensors)
    return y, _norm_recipe(module, inner, mean, invstd)


def _norm_recipe(module: nn.modules.batchnorm._BatchNorm, inner: Recipe, mean, invstd,
                 mask: Optional[torch.Tensor] = None) -> Recipe:
    """BN(inner) with the batch statistics given; with ``mask`` (a channels_last ReLU mask kept by
    the fused BatchNorm that applied the ReLU) ReLU(BN(inner))."""
    return ("norm", inner, mean, invstd, module.weight, module.bias, mask, mask is not None)


class _BatchNormFromRecipe(torch.autograd.Function):
    """``compiled._BatchNorm`` that keeps nothing of its input: backward recomputes it (a cheap
    convolution of what that convolution keeps anyway)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, eps: float, codec: TensorCodec, structure, *tensors):
        y = batch_norm_output(x, weight, bias, mean, invstd)
        ctx.save_for_backward(weight, mean, invstd, *tensors)
        ctx.codec, ctx.structure, ctx.input_dtype = codec, structure, x.dtype
        ctx.input_format = _memory_format(x)
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, mean, invstd, *tensors = ctx.saved_tensors
        x = _as_input(materialize(ctx.codec, _unflatten(ctx.structure, tensors), ctx.input_dtype),
                      ctx.input_dtype, ctx.input_format)
        gx, gw, gb = batch_norm_gradients(ctx, grad, x, weight, mean, invstd)
        return (gx, gw, gb) + (None,) * (len(ctx.needs_input_grad) - 3)


class _ReluKeepingMask(torch.autograd.Function):
    """``compiled._Relu`` that also returns its mask, for a rebuilt input to read."""

    @staticmethod
    def forward(ctx, x):
        y = torch.relu(x)
        bits = _Relu.keep_mask(ctx, y)
        ctx.mark_non_differentiable(bits)
        return y, bits

    @staticmethod
    def backward(ctx, grad, _grad_bits):
        (bits,) = ctx.saved_tensors
        return grad * _unpack_mask(bits, ctx.shape, ctx.channels_last).to(grad.dtype)


class _ConvFromRecipe(torch.autograd.Function):
    """A convolution whose backward makes its input from a recipe: rebuilt from a BatchNorm (the
    module docstring), or decoded from codes encoded by the caller (so that a recompute of its
    output can read them too)."""

    @staticmethod
    def forward(ctx, x, weight, bias, codec: TensorCodec, conv_args: tuple, structure, *tensors):
        y = torch.ops.aten.convolution(x, weight, bias, *conv_args)
        ctx.save_for_backward(weight, *tensors)
        ctx.codec, ctx.structure, ctx.conv_args = codec, structure, conv_args
        ctx.input_dtype, ctx.input_format = x.dtype, _memory_format(x)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, *tensors = ctx.saved_tensors
        x = _as_input(materialize(ctx.codec, _unflatten(ctx.structure, tensors), ctx.input_dtype),
                      ctx.input_dtype, ctx.input_format)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.bias_shape is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(grad, x, weight, ctx.bias_shape, *ctx.conv_args, mask)
        return (gx, gw, gb) + (None,) * (len(ctx.needs_input_grad) - 3)


def _output_source(module: nn.Module) -> bool:
    """A GELU or SiLU module (a Hardswish keeps its derivative, not its input) or an
    ``nn.LayerNorm`` with its affine parameters: its output can be made from what it keeps."""
    if type(module) is nn.LayerNorm:
        return module.elementwise_affine
    return activation_applies(module) and not isinstance(module, nn.Hardswish)


def _activation_with_recipe(module: nn.Module, x: torch.Tensor, codec: TensorCodec):
    """``activation_forward`` with x encoded here, and its output's recipe: act(x's decode)."""
    kind, approximate = _ACTIVATIONS[type(module)], getattr(module, "approximate", "none")
    layout, encoded = codec.encode(x.detach(), feature_last=False)
    y = _Activation.apply(x, kind, approximate, codec, layout, *encoded)
    return y, ("act", ("codes", layout, tuple(encoded)), kind, approximate), "act"


def _layer_norm_with_recipe(module: nn.LayerNorm, x: torch.Tensor, codec: TensorCodec):
    """``layer_norm_forward`` with the normalized input encoded here, and its output's recipe:
    the decoded normalized input times the weight plus the bias (no statistics recomputed)."""
    dtype = torch.float32 if _compute_dtype(x) is not None else None
    x, weight, bias = _cast(x, dtype), _cast(module.weight, dtype), _cast(module.bias, dtype)
    layout, mean, rstd, encoded = layer_norm_codes(module, x, codec)
    y = _LayerNorm.apply(x, weight, bias, list(module.normalized_shape), module.eps, codec,
                         layout, mean, rstd, *encoded)
    return y, ("ln", ("codes", layout, encoded), weight, bias), "ln"


class _LinearFromRecipe(torch.autograd.Function):
    """A linear layer whose backward makes its input from a recipe (a GELU's, SiLU's or
    LayerNorm's output rebuilt from what that layer keeps)."""

    @staticmethod
    def forward(ctx, x, weight, bias, codec: TensorCodec, structure, *tensors):
        y = F.linear(x, weight, bias)
        ctx.save_for_backward(weight, *tensors)
        ctx.codec, ctx.structure, ctx.input_dtype = codec, structure, x.dtype
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, *tensors = ctx.saved_tensors

        def rebuilt():
            x = materialize(ctx.codec, _unflatten(ctx.structure, tensors), ctx.input_dtype)
            return x if x.dtype == ctx.input_dtype else x.to(ctx.input_dtype)
        return linear_gradients(ctx, grad, weight, rebuilt) + (None,) * (len(ctx.needs_input_grad) - 3)


def linear_with_recipe(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        codec: TensorCodec, recipe: Recipe) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (in autocast's dtype, as ``linear_forward``) keeping nothing of
    x: its backward rebuilds x from ``recipe``."""
    dtype = _compute_dtype(x)
    x, weight, bias = _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)
    structure, tensors = _flatten(recipe)
    return _LinearFromRecipe.apply(x, weight, bias, codec, structure, *tensors)


def _conv_with_recipe(module: nn.modules.conv._ConvNd, x: torch.Tensor, codec: TensorCodec,
                      inner: Optional[Recipe]):
    """The convolution, its input rebuilt in backward from ``inner`` (a BatchNorm's recipe), or
    (``inner`` None) encoded here; and its output's recipe (for a recompute of it)."""
    dtype = _compute_dtype(x)
    x, weight, bias = _cast(x, dtype), _cast(module.weight, dtype), _cast(module.bias, dtype)
    if inner is None:
        layout, encoded = codec.encode(x.detach())
        inner = ("codes", layout, tuple(encoded))
    structure, tensors = _flatten(inner)
    conv_args = conv_arguments(module)
    y = _ConvFromRecipe.apply(x, weight, bias, codec, conv_args, structure, *tensors)
    return y, ("conv", inner, weight, bias, conv_args, x.dtype, _memory_format(x))
