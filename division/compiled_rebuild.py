"""Rebuilt convolution inputs under ``torch.compile`` (``method.rebuild_conv_input``).

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
The BatchNorm's input is decoded twice in backward (for the convolution and for the BatchNorm),
where the eager path shares one decode.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn
from torch._dynamo.comptime import comptime

from .compiled import (_BatchNorm, _Relu, _cast, _compute_dtype, _memory_format, _unpack_mask, Layout, TensorCodec,
                       batch_norm_affine, batch_statistics, conv_arguments)

# A source: (the tensor the convolution must read, x's layout, x's codes, mean, invstd, weight,
# bias, the ReLU's mask bits or None); a tuple, which Dynamo keeps in a dict without a graph break.
Source = tuple


class ConvInputChain:
    """The BatchNorm sources of one traced forward, and the convolutions rebuilt from one."""

    def __init__(self):
        _CHAINS[id(self)] = self
        self._sources: dict[str, Source] = {}  # BatchNorm or ReLU name -> the source of its output
        self.rebuilt: dict[str, str] = {}  # convolution name -> the BatchNorm it is rebuilt from
        self.inputs: dict[str, tuple] = {}  # convolution name -> (shape, dtype) of its rebuilt input
        self.proven: set[tuple[str, str]] = set()  # (ReLU or convolution, BatchNorm) links (``prove``)

    def forward(self, name: str, module: nn.Module, x: torch.Tensor, codec: TensorCodec, compressed_forward):
        """The compressing forward of a module on the chain's terms (module docstring)."""
        source = self._source_of(x)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            y, source = _norm_with_source(module, x, codec)
            self._sources[name] = source + (name,)
            return y
        if source is not None and (name, source[8]) in self.proven:
            if isinstance(module, nn.ReLU):
                y, bits = _ReluKeepingMask.apply(x)
                self._sources[name] = (y,) + source[1:7] + (bits, source[8])
                return y
            if _rebuildable_conv(module):
                self._note(name, source[8], x)
                return _conv_from_norm(module, x, codec, source)
        return compressed_forward(module, x, codec)

    def prove(self, model: nn.Module, modules, args: tuple) -> None:
        """Which (ReLU or convolution, BatchNorm) links hold, from one eager forward of ``model``
        on ``args`` (no gradients, leaving no trace): a ReLU module whose input is a BatchNorm's
        output unchanged since (its version counter), a convolution whose input is such a
        BatchNorm or ReLU output, among ``modules`` (the names the compiled layers cover). The
        traced forward follows only these: identity alone cannot see an in-place change in
        between (a residual ``out += identity`` on a BatchNorm's output, then a ReLU)."""
        from .compiled import traceless_forward
        outputs: dict[int, tuple] = {}  # id -> (tensor, version, BatchNorm, through a ReLU)
        links: dict[int, str] = {}      # a ReLU module's BatchNorm while it runs
        proven: set[tuple[str, str]] = set()

        def source_of(inputs) -> Optional[tuple]:
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            entry = outputs.get(id(x)) if x is not None else None
            return entry if entry is not None and entry[0] is x and entry[1] == x._version else None

        def after_norm(name):
            def hook(_module, _inputs, output):
                outputs[id(output)] = (output, output._version, name, False)
            return hook

        def before_relu(name):
            def hook(module, inputs):
                entry = source_of(inputs)
                if entry is not None and not entry[3]:
                    links[id(module)] = entry[2]
                    proven.add((name, entry[2]))
            return hook

        def after_relu(module, _inputs, output):
            norm = links.pop(id(module), None)
            if norm is not None:
                outputs[id(output)] = (output, output._version, norm, True)

        def before_conv(name):
            def hook(_module, inputs):
                entry = source_of(inputs)
                if entry is not None:
                    proven.add((name, entry[2]))
            return hook

        handles = []
        for name, module in model.named_modules():
            if name not in modules:
                continue
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                handles.append(module.register_forward_hook(after_norm(name)))
            elif isinstance(module, nn.ReLU):
                handles.append(module.register_forward_pre_hook(before_relu(name)))
                handles.append(module.register_forward_hook(after_relu))
            elif _rebuildable_conv(module):
                handles.append(module.register_forward_pre_hook(before_conv(name)))
        with torch.no_grad():
            traceless_forward(model, args, handles)
        self.proven = proven

    def _note(self, conv: str, norm: str, x: torch.Tensor) -> None:
        """Name the rebuilt convolution (and the shape and dtype of its input). While Dynamo traces,
        at compile time (``comptime``): a dict written from the traced code would be guarded on,
        and recompiled for once it had changed."""
        shape, dtype = tuple(x.shape), str(x.dtype).replace("torch.", "")
        if torch.compiler.is_compiling():
            chain = id(self)  # noqa: F841 - read by _note_when_compiling through comptime's frame
            comptime(_note_when_compiling)
        else:
            self.rebuilt[conv] = norm
            self.inputs[conv] = (shape, dtype)

    def _source_of(self, x: torch.Tensor) -> Optional[Source]:
        for source in self._sources.values():
            if source[0] is x:
                return source
        return None

    def clear(self) -> None:
        self._sources.clear()


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
    chain, conv = _CHAINS[value("chain")], value("conv")
    chain.rebuilt[conv] = value("norm")
    chain.inputs[conv] = (value("shape", ()), value("dtype", ""))


def _norm_with_source(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, codec: TensorCodec):
    """``batch_norm_forward`` with x encoded here, so that the codes can be handed on."""
    mean, invstd = batch_statistics(module, x)
    layout, encoded = codec.encode(x.detach())
    y = _BatchNorm.apply(x, module.weight, module.bias, mean, invstd, module.eps, codec, layout, *encoded)
    return y, (y, layout, tuple(encoded), mean, invstd, module.weight, module.bias, None)


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


def rebuild_input(codec: TensorCodec, layout: Layout, encoded, mean, invstd, weight, bias,
                  bits: Optional[torch.Tensor], dtype: torch.dtype, memory_format: Optional[str]) -> torch.Tensor:
    """BN(x) (or ReLU(BN(x)) with the mask's zeros) from x's codes, in ``dtype`` and ``memory_format``."""
    x_hat = codec.decode(layout, tuple(encoded)).float()
    shape = [1, -1] + [1] * (x_hat.dim() - 2)
    scale, shift = batch_norm_affine(weight, bias, mean, invstd)
    y = torch.addcmul(shift.view(shape), x_hat, scale.view(shape))
    if bits is not None:
        keep = _unpack_mask(bits, tuple(y.shape), memory_format == "channels_last") > 0  # packed from the conv's input
        # 0 where the ReLU's output was 0; where it was positive, at least the smallest normal (as
        # the eager rebuild, division.exact.apply_relu_mask)
        y = torch.where(keep, y.clamp_min(torch.finfo(dtype).tiny), y.new_zeros(()))
    y = y if y.dtype == dtype else y.to(dtype)
    return y.contiguous(memory_format=torch.channels_last) if memory_format == "channels_last" else y


class _ConvFromNorm(torch.autograd.Function):
    """A convolution that keeps nothing of its input: backward rebuilds it (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, codec: TensorCodec, conv_args: tuple, layout: Layout,
                mean, invstd, norm_weight, norm_bias, bits, *encoded):
        y = torch.ops.aten.convolution(x, weight, bias, *conv_args)
        ctx.save_for_backward(weight, mean, invstd, norm_weight, norm_bias, bits, *encoded)
        ctx.codec, ctx.layout, ctx.conv_args = codec, layout, conv_args
        ctx.input_dtype, ctx.input_format = x.dtype, _memory_format(x)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, mean, invstd, norm_weight, norm_bias, bits, *encoded = ctx.saved_tensors
        x = rebuild_input(ctx.codec, ctx.layout, encoded, mean, invstd, norm_weight, norm_bias, bits,
                          ctx.input_dtype, ctx.input_format)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.bias_shape is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(grad, x, weight, ctx.bias_shape, *ctx.conv_args, mask)
        return (gx, gw, gb) + (None,) * (len(ctx.needs_input_grad) - 3)


def _conv_from_norm(module: nn.modules.conv._ConvNd, x: torch.Tensor, codec: TensorCodec,
                    source: Source) -> torch.Tensor:
    dtype = _compute_dtype(x)
    _, layout, encoded, mean, invstd, norm_weight, norm_bias, bits, _name = source
    return _ConvFromNorm.apply(_cast(x, dtype), _cast(module.weight, dtype), _cast(module.bias, dtype), codec,
                               conv_arguments(module), layout, mean, invstd, norm_weight, norm_bias, bits, *encoded)
