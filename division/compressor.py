"""Make autograd keep compressed activations for an unmodified model.

``compress_activations(model, codec)`` installs hooks and returns an ``ActivationCompressor``:
- a forward pre-hook on the root enters ``torch.autograd.graph.saved_tensors_hooks`` for the
  duration of a training forward pass (nothing happens in eval mode or under ``no_grad``);
- pre/post hooks on the leaf modules it knows (conv, norm, linear, ReLU, dropout, max- and average-pooling) keep a
  stack of "who is saving now", so the pack hook can choose the storage for each saved tensor:
  conv / norm / linear inputs go through the codec, ReLU outputs and dropout noise become exact 1-bit
  masks, max-pool indices become uint8 window offsets, and the inputs of max- and average-pooling,
  whose backward reads only their shape, need no storage;
  parameters, tiny tensors and anything saved elsewhere are kept as they are;
- with ``cover_all`` (DIVISION's default), every other floating-point tensor autograd saves goes
  through the codec too, whoever saves it (an activation function, attention, a layer scale, a
  functional call): any tensor of at least ``min_numel`` elements that is part of the differentiable
  graph (``requires_grad``) and does not derive from a parameter alone (a weight's transpose or
  autocast copy, an expanded class token: model memory, held anyway). Statistics that backward reads
  exactly (LayerNorm's mean / rstd, attention's log-sum-exp, BatchNorm's batch statistics) are not
  differentiable outputs, so they stay exact. The codec's canonical view gives each shape its
  blocks: 2-D blocks for (N, C, H, W) maps (and attention's (N, heads, L, E)), blocks of tokens for
  (N, L, C) sequences, features for (N, F) (``division.dual_precision``);
- attention is stored at more bits (``attention_codec``, DIVISION's ``attention_bits``). The fused
  attention kernels (``F.scaled_dot_product_attention``'s flash, memory-efficient and cuDNN paths,
  on CPU and CUDA) save query, key, value, output and the exact log-sum-exp; their backward
  recomputes the probabilities as exp(q.k / sqrt(E) - lse) from the decoded q and k (an error in q.k
  lands in an exponent, against a normalizer of the exact q and k) and the softmax gradient as
  P (dO.V - dO.O), a difference of two nearly equal terms once attention is sharp, that only
  cancels where the decoded V and O agree. Measured (scripts/gradient_fidelity.py, README): with
  sharp attention, any subset of the four at more bits leaves the gradients wrong; all four
  restore them. So all four go through ``attention_codec``: the output when it is saved (its
  grad_fn is the kernel's node), query, key and value, saved a moment earlier, by redoing their
  encodes then (``_attention_output``: the node's first three inputs);
- the math fallback and an explicit ``softmax(q k^T) v`` (Swin's window attention) save the
  probabilities, whose softmax backward has a milder form of that cancellation: softmax outputs
  (and views of them) go through ``probability_codec`` (DIVISION's ``probability_bits``). On
  swin_t with its attention sharpened (logits 9x), Q = 2 elsewhere, probabilities at 4 bits keep
  the gradient as 8 bits do (cosine 0.914 against 0.917) and at 2 bits do not (0.678);
- every module without a family of its own also marks "who is saving now", so the ledger names the
  operator (module type) behind each save, and the first training forward measures coverage: the
  fraction of the bytes plain autograd would keep that are stored compressed. Under
  ``coverage_warning`` (90%) a warning names the fraction and the operators kept raw.
The model itself is untouched: same modules, same ``state_dict``. ``remove()`` uninstalls.

A ReLU output that the next save encodes through the activation codec (a convolution's input) gets
its mask from that encode where the codec can pack it while it reads the output
(``packs_relu_mask``: the fused CUDA encode of channels_last maps): the mask's Packed is reserved at
the ReLU's save and filled by the encode, or packed on its own at the next save or the end of forward.

With ``norm_from_codes``, a BatchNorm's forward runs under ``division.norm_from_codes.NormFromCodes``
(entered and left by the module's hooks): where the codec's fused kernels can store its input, the
input is encoded here and the backward reads the codes, with no decoded input in memory.

With ``rebuild_conv_input``, a convolution's (or Linear's) input that is provably ReLU(BN(x)) or
BN(x) of a training BatchNorm whose input x is stored here holds no bytes: backward rebuilds it from
x's codes, the BatchNorm's statistics and parameters, and the ReLU's exact mask (``division.rebuild``).
With ``recompute_norm_input``, a BatchNorm's input that is provably the output of a 1x1 or depthwise
convolution whose input is stored here (as codes, raw, or itself rebuilt) holds no bytes either:
backward recomputes it from that input and the convolution's weight. Such a BatchNorm runs as
PyTorch's, not fused into an encode (``norm_from_codes``): there is nothing to encode.

A tensor saved twice (a ResNet block input read by conv1 and by the downsample conv) is encoded and
stored once. The cache that makes this possible is keyed by the tensor's identity, which is held
by a weak reference: an entry dies with its tensor, so a new tensor that reuses the freed memory
(same pointer, shape and version) can never be mistaken for it. The version counter guards
in-place changes between the two saves.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .codec import ActivationCodec, Packed, RawCodec, SaveContext
from .decode_prefetch import PREVIOUS, DecodePrefetcher
from .encode_stream import SideStreamEncoder
from .exact import (RELU_MASK, BoolMaskCodec, DropoutMaskCodec, MaxPoolIndexCodec, ReluMaskCodec,
                    ShapeOnlyCodec, add_reader)
from .layouts import FlattenedRowsCodec, LayoutCodec, NormalizedCodec, fit, flattened_activation
from .activations import KEEPS_DERIVATIVE
from .ledger import PARAMETER_COPY, RECOMPUTED, REBUILT, SHARED, ByteLedger, LedgerEntry
from .norm_from_codes import NormFromCodes
from .rebuild import ChainTracker, RebuildCodec, RecomputeCodec, output_source, take_decoded

log = logging.getLogger(__name__)

# Module families whose saved input goes through the activation codec.
ACTIVATION_KINDS = ("conv", "norm", "linear")

_MODULE_KINDS: tuple[tuple[tuple[type, ...], str], ...] = (
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "conv"),
    ((nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm), "norm"),
    ((nn.Linear,), "linear"),
    ((nn.ReLU,), "relu"),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d), "dropout"),
    ((nn.MaxPool2d,), "maxpool"),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
      nn.AdaptiveAvgPool3d), "avgpool"),
)


# Containers only route their children's calls: they save nothing themselves.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
OTHER = "other"  # SaveContext.kind of a module without a family of its own (GELU, attention, a block)
OUTSIDE = "(functional)"  # the ledger's op for a save outside every module below the root


def module_kind(module: nn.Module) -> Optional[str]:
    for types, kind in _MODULE_KINDS:
        if isinstance(module, types):
            return kind
    return None


def _derives_from_parameter(t: torch.Tensor, depth: int = 8) -> bool:
    """Does ``t`` come from a parameter through one-input ops only? A weight's transpose, its
    autocast copy, an expanded class token, a gathered relative-position bias: model memory, not
    activations. An activation meets an op of two graph inputs (or the graph's start, the data, which
    may be a leaf that requires grad) before any parameter."""
    return _source_parameter(t, depth) is not None


def _source_parameter(t: torch.Tensor, depth: int = 8) -> Optional[torch.Tensor]:
    """The parameter ``t`` comes from through one-input ops only (see ``_derives_from_parameter``), or None."""
    if _is_parameter(t):
        return t if t._base is None else t._base
    fn = t.grad_fn
    for _ in range(depth):
        if fn is None:
            return None
        if type(fn).__name__ == "AccumulateGrad":
            variable = getattr(fn, "variable", None)
            return variable if isinstance(variable, nn.Parameter) else None
        # every input of the op, those that need no gradient (the data: None) included
        if len(fn.next_functions) != 1:
            return None
        fn = fn.next_functions[0][0]
    return None


@dataclass
class _Frame:
    """The module currently running forward, as the pack hook needs to see it."""

    ctx: SaveContext  # the module's name and family, made once at install and handed to the codec
    module: nn.Module
    input: Optional[torch.Tensor]
    param_shapes: tuple = field(default_factory=tuple)
    norm_mode: Optional["NormFromCodes"] = None  # entered for this module's forward (BatchNorm)
    op: str = ""  # the module's type name, the ledger's operator
    input_packed: Optional[Packed] = None  # how its input was stored (a BatchNorm's, for rebuilds;
                                           # a convolution's, for recomputes)
    saved_input: Optional[torch.Tensor] = None  # the tensor stored as input_packed (autocast's copy)


@dataclass
class _CacheEntry:
    ref: weakref.ref
    version: int
    packed: Packed


_RAW = RawCodec()
_SHAPE_ONLY = ShapeOnlyCodec()

# The autograd nodes of the fused attention kernels start with this (ScaledDotProductFlashAttention-
# ForCpuBackward0, ...EfficientAttention..., ...FlashAttention..., ...CudnnAttention...); their first
# three inputs are query, key and value. The math fallback records plain matmul / softmax nodes instead.
_FUSED_ATTENTION = "ScaledDotProduct"
_SOFTMAX = ("SoftmaxBackward0", "SafeSoftmaxBackward0")
_RECENT = 8  # codec saves remembered for _attention_output (query, key, value and a few more)


@dataclass(eq=False)  # found by identity: comparing fields would compare tensors
class _Recent:
    """A save through the codec that the attention kernel being recorded may turn out to own."""

    ref: weakref.ref
    packed: Packed
    entry: Optional[LedgerEntry]  # its ledger row, whose bytes change if the encode is redone


class ActivationCompressor:
    """Hooks that store a model's saved activations through a codec. Build with ``compress_activations``.

    codec: what conv / norm / linear inputs are stored with; ``None`` keeps them raw (plain
        autograd, useful to run the ledger alone).
    exact_masks: store ReLU / dropout / max-pool tensors in their exact compact forms.
    min_numel: tensors with fewer elements are kept as they are (per-channel statistics, biases).
    ledger: a ``ByteLedger`` to record every save into; reset at the start of each forward.
    exact_kernels: the exact codecs may use their fused kernels (False: the PyTorch path only).
    encode_stream: a ``SideStreamEncoder`` to run CUDA encodes on a side stream (None: inline).
    prefetcher: a ``DecodePrefetcher`` to decode ahead of backward on a side stream (None: each
        decode when its layer's backward asks for it).
    norm_from_codes: BatchNorm layers whose input the codec stores in the fused kernels' format
        compute their backward from the codes (``division.norm_from_codes``); needs a codec with
        ``norm_plan``.
    cover_all: every other float activation autograd saves goes through the codec too (see the
        module docstring); False: only conv / norm / linear inputs (and the exact codecs).
    coverage_warning: warn when the first training forward stores less than this fraction of the
        bytes plain autograd would keep compressed (with a codec; 0 never warns).
    attention_codec: with cover_all, what the tensors of attention (a fused kernel's query, key,
        value and output) are stored with (see the module docstring): the codec at more bits, or
        ``RawCodec()`` to keep them exact; None: the codec, like every other save.
    probability_codec: with cover_all, what softmax outputs (attention probabilities) are stored
        with, as ``attention_codec``.
    rebuild_conv_input: a convolution's input that is ReLU(BN(x)) or BN(x) of a BatchNorm whose input
        is stored here is rebuilt in backward instead of stored (``division.rebuild``; with a codec).
    recompute_norm_input: a BatchNorm's (or other norm's) input that is the output of a 1x1 or
        depthwise convolution whose input is stored here is recomputed in backward instead of stored (with a codec).
    """

    def __init__(self, model: nn.Module, codec: Optional[ActivationCodec], *, exact_masks: bool = True,
                 min_numel: int = 1024, ledger: Optional[ByteLedger] = None, exact_kernels: bool = True,
                 encode_stream: Optional[SideStreamEncoder] = None,
                 prefetcher: Optional[DecodePrefetcher] = None, norm_from_codes: bool = False,
                 cover_all: bool = False, coverage_warning: float = 0.9,
                 attention_codec: Optional[ActivationCodec] = None,
                 probability_codec: Optional[ActivationCodec] = None, rebuild_conv_input: bool = False,
                 recompute_norm_input: bool = False):
        self.model = model
        self.cover_all = cover_all and codec is not None
        self.attention_codec = attention_codec if self.cover_all else None
        self.probability_codec = probability_codec if self.cover_all else None
        self._recent: deque[_Recent] = deque(maxlen=_RECENT)
        self.coverage_warning = coverage_warning
        # the first training forward's coverage (plain bytes, bytes stored compressed, raw bytes by
        # operator), checked once against coverage_warning; then None
        self._coverage: Optional[ByteLedger] = ByteLedger() if codec is not None else None
        self.coverage: Optional[float] = None
        self.codec = codec
        self.exact_masks = exact_masks
        self.exact_kernels = exact_kernels
        self._bool = BoolMaskCodec(exact_kernels)
        self._relu = ReluMaskCodec(exact_kernels)
        self._dropout = DropoutMaskCodec(exact_kernels)
        self.min_numel = min_numel
        self.ledger = ledger
        self.encode_stream = encode_stream
        self.prefetcher = prefetcher
        self._last_saved: Optional[weakref.ref] = None  # the codec's latest Packed (prefetch order)
        # A ReLU mask whose bits the next save may write: (output, its version, the mask's Packed)
        self._pending_mask: Optional[tuple[torch.Tensor, int, Packed]] = None
        self._fuse_masks = exact_kernels and hasattr(codec, "packs_relu_mask")
        # set by the method when division.compiled covers the codec: the layers it leaves to the compiler
        self.compiled_uncovered: Optional[list[str]] = None
        # the BN(x) / ReLU(BN(x)) tensors of this forward, whose conv saves are rebuilt, and the
        # 1x1 and depthwise convolutions' outputs, whose norm saves are recomputed (None: both off)
        self._rebuild_inputs = rebuild_conv_input and codec is not None
        self._recompute_norms = recompute_norm_input and codec is not None
        self._chains = ChainTracker() if self._rebuild_inputs or self._recompute_norms else None
        self._rebuild = RebuildCodec()
        # with rebuild_conv_input: each tensor saved this step by its autograd (node, output number),
        # with its Packed, layer and module, where a GELU's, SiLU's or LayerNorm's output is rebuilt
        # from its stored input
        self._stored_by_node: dict[tuple, tuple[Packed, str, Optional[nn.Module]]] = {}
        self._recompute = RecomputeCodec()
        self.norm_mode: Optional[NormFromCodes] = None
        if norm_from_codes and hasattr(codec, "norm_plan"):
            self.norm_mode = NormFromCodes(codec.norm_plan, self._norm_forward, self._store_norm_input,
                                           self._save_as_is)
        # tensors a custom Function saves that are stored already (a BatchNorm's codes): autograd
        # packs them after the Function's forward returns, so they are marked, not flagged
        self._as_is: dict[int, weakref.ref] = {}
        # the codec seen through views of other layouts (division.layouts), one per layout
        self._layouts: dict[str, ActivationCodec] = {}
        self._stack: list[_Frame] = []
        self._cache: dict[tuple[int, int], _CacheEntry] = {}
        self._plain_seen: dict[int, weakref.ref] = {}
        self._hooks_ctx: Optional[torch.autograd.graph.saved_tensors_hooks] = None
        self._handles = []
        self._install()

    # ----------------------------------------------------------------------------------- install
    def _install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._enter_step))
        self._handles.append(self.model.register_forward_hook(self._exit_step, always_call=True))
        for name, module in self.model.named_modules():
            kind = module_kind(module)
            if kind is None:
                # modules without a family: only to name the operator behind a save (and, with
                # cover_all, their saves go through the codec by the general rule)
                if module is self.model or isinstance(module, _CONTAINERS):
                    continue
                kind = OTHER
            self._handles.append(module.register_forward_pre_hook(self._make_push(name, kind)))
            self._handles.append(module.register_forward_hook(self._pop, always_call=True))

    def remove(self) -> None:
        """Uninstall every hook; the model is back to plain autograd."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "ActivationCompressor":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ----------------------------------------------------------------------------- forward hooks
    def _active(self) -> bool:
        return self._hooks_ctx is not None

    def compressing(self) -> bool:
        """Is an eager step's compression on (its hooks active), or paused on purpose (``paused``)?"""
        return self._active() or getattr(self, "_paused", False)

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside run as if these hooks were not there (nothing stored, nothing counted):
        for a look at what plain autograd saves (``division.compiled.plain_save_coverage``)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _enter_step(self, module, args) -> None:
        if getattr(self, "_paused", False):
            return
        if torch.compiler.is_compiling():
            # compiled: the layers' own functions store the codes (division.compiled), where the
            # codec has them; a compiled graph never runs these hooks, so say so where it has not
            if self.codec is None or not module.training:
                return
            uncovered = self.compiled_uncovered
            if uncovered is None:
                warnings.warn(f"torch.compile bypasses the saved-tensor hooks of codec "
                              f"{getattr(self.codec, 'name', type(self.codec).__name__)!r}: this compiled "
                              "model trains UNCOMPRESSED; train it without torch.compile, or use "
                              "DIVISION, whose layers compress inside compiled graphs", RuntimeWarning)
            elif uncovered:
                warnings.warn(f"compiled, {len(uncovered)} layer(s) keep what they save as the compiler "
                              "chooses, not compressed (the eager path compresses them, and the "
                              "functional ops outside modules): "
                              + ", ".join(uncovered[:8]) + (", ..." if len(uncovered) > 8 else ""),
                              RuntimeWarning)
            return
        if self._active() or not (module.training and torch.is_grad_enabled()):
            return
        self._cache.clear()
        self._plain_seen.clear()
        self._recent.clear()
        if self._chains is not None:
            self._chains.clear()
        self._stored_by_node.clear()
        self._last_saved = None
        self._pending_mask = None
        if self.prefetcher is not None:
            self.prefetcher.join()  # a backward that stopped early may have left a decode behind
        if self.ledger is not None:
            self.ledger.reset()
        self._hooks_ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks_ctx.__enter__()

    def _exit_step(self, module, args, output) -> None:
        if self._hooks_ctx is None or getattr(self, "_paused", False):
            return
        self._hooks_ctx.__exit__(None, None, None)
        self._hooks_ctx = None
        self._settle_mask(None, None)
        if self._coverage is not None:
            self._check_coverage()
        if self.encode_stream is not None:
            self.encode_stream.join()  # backward reads finished codes
        self._stack.clear()
        self._cache.clear()
        self._plain_seen.clear()
        self._recent.clear()
        self._as_is.clear()
        if self._chains is not None:
            self._chains.clear()  # its autograd nodes and weak references, no longer needed
        self._stored_by_node.clear()

    def _make_push(self, name: str, kind: str):
        # Read at the first call, not at install: a lazy module (nn.LazyConv2d) has no parameter
        # shapes until its own pre-hook has run on the first input.
        param_shapes: Optional[tuple] = None
        ctx = SaveContext(name, kind)
        op: Optional[str] = None

        def push(module, args):
            nonlocal param_shapes, op
            if self._active():
                if param_shapes is None:
                    param_shapes = tuple(p.shape for p in module.parameters(recurse=False))
                    op = type(module).__name__
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                mode = self.norm_mode if isinstance(module, nn.modules.batchnorm._BatchNorm) else None
                if mode is not None and self._recomputed_input(first):
                    mode = None  # its input is recomputed, not encoded: PyTorch's BatchNorm runs
                self._stack.append(_Frame(ctx, module, first, param_shapes, mode, op))
                if mode is not None:
                    mode.__enter__()  # only this module's own calls go through it
        return push

    def _pop(self, module, args, output) -> None:
        if self._stack and self._stack[-1].module is module:
            frame = self._stack.pop()
            if frame.norm_mode is not None:
                frame.norm_mode.__exit__(None, None, None)
            if self._rebuild_inputs:
                if frame.ctx.kind == "norm":
                    self._chains.after_norm(module, frame.ctx.layer, frame.input, frame.input_packed, output)
                elif frame.ctx.kind == "relu":
                    self._chains.after_relu(frame.input, output)
            if self._recompute_norms and frame.ctx.kind == "conv":
                self._chains.after_conv(module, frame.ctx.layer, frame.saved_input, frame.input_packed, output)

    def _save_as_is(self, ctx, tensors, stored) -> None:
        """``ctx.save_for_backward(*tensors)``, where the tensors in ``stored`` (a BatchNorm's codes,
        recorded by ``_store_norm_input``) pass the codecs and the ledger as they are; the rest
        (its per-channel statistics) are saved as any tensor is."""
        for t in stored:
            self._as_is[id(t)] = weakref.ref(t)
        ctx.save_for_backward(*tensors)

    def _store_norm_input(self, x: torch.Tensor) -> Packed:
        """Encode a BatchNorm's input for ``NormFromCodes`` (its backward reads the codes)."""
        frame = self._stack[-1]
        self._settle_mask(None, None)
        packed = self._encode(self.codec, x, frame.ctx)
        frame.input_packed = packed  # what a rebuild of its output decodes
        if self.ledger is not None or self._coverage is not None:
            self._record(x, frame, packed, False)
        return packed

    def _norm_forward(self, x: torch.Tensor, plan, *batch_norm_args) -> Optional[tuple]:
        """A BatchNorm's forward fused into its input's encode, for ``NormFromCodes``:
        (y, mean, invstd, Packed), or None where ``triton_norm.forward_applies`` says no. It runs
        on the current stream, since its output is the next layer's input."""
        from . import triton_norm
        if not triton_norm.forward_applies(plan):
            return None
        frame = self._stack[-1]
        self._settle_mask(None, None)
        y, mean, invstd, packed = triton_norm.batch_norm_forward(self.codec, x, plan, *batch_norm_args)
        frame.input_packed = packed  # what a rebuild of its output decodes
        if self.ledger is not None or self._coverage is not None:
            self._record(x, frame, packed, False)
        return y, mean, invstd, packed

    # ---------------------------------------------------------------------------------- pack hook
    def _pack(self, t: torch.Tensor):
        as_is = self._as_is.pop(id(t), None) if self._as_is else None
        if (as_is is not None and as_is() is t) or _is_parameter(t):
            # parameters (and views of them, e.g. Linear's weight.t()) are model memory;
            # autograd keeps a reference, never a copy
            return t
        frame = self._stack[-1] if self._stack else None
        codec = self._choose_codec(t, frame)
        key = (id(t), id(codec))
        entry = self._cache.get(key)
        shared = entry is not None and entry.ref() is t and entry.version == t._version
        rebuilt = None if shared else self._rebuilt(t, frame, codec)
        if rebuilt is None and not shared:
            rebuilt = self._recomputed(t, frame, codec)
        relu_bits = None
        if self._pending_mask is not None and codec is not _RAW:
            # a rebuilt (or recomputed) tensor is never encoded: its ReLU mask is packed on its own
            relu_bits = self._settle_mask(None if shared or rebuilt is not None else t, codec)
        if shared:
            packed = entry.packed
            add_reader(packed)
        elif rebuilt is not None:
            packed = rebuilt
            self._cache[key] = _CacheEntry(weakref.ref(t, self._forget(key)), t._version, packed)
        else:
            if codec is self._relu and self._fuse_masks and self.codec.packs_relu_mask(t):
                packed = self._relu.reserve(t)  # bits written by the next save (_settle_mask)
                self._pending_mask = (t, t._version, packed)
            else:
                packed = self._encode(codec, t, frame.ctx if frame else None, relu_bits)
            self._cache[key] = _CacheEntry(weakref.ref(t, self._forget(key)), t._version, packed)
            if codec is _SHAPE_ONLY:
                self._link_relu_mask(t, packed)  # its decode is the mask's (see ShapeOnlyCodec)
            elif codec is self.codec:
                if getattr(codec, "relu_zeros", False):
                    self._link_relu_mask(t, packed)
                if self.prefetcher is not None and hasattr(codec, "decode_ahead"):
                    packed.meta[PREVIOUS] = self._last_saved  # backward decodes in about reverse order
                    self._last_saved = weakref.ref(packed)
        if self._rebuild_inputs and t.grad_fn is not None and codec is not _SHAPE_ONLY:
            self._stored_by_node[(t.grad_fn, t.output_nr)] = (packed, frame.ctx.layer if frame else "",
                                                              frame.module if frame else None)
        entry = None
        if frame is not None and (t is frame.input or (frame.ctx.kind == "conv" and self._recompute_norms
                                                       and self._is_input(t, frame))):
            # a BatchNorm's: what a rebuild of its output decodes; a convolution's: what a
            # recompute of its output convolves (its autocast copy, where autocast made one)
            frame.input_packed = packed
            frame.saved_input = t
        if self.ledger is not None or self._coverage is not None:
            entry = self._record(t, frame, packed, shared)
        if self.attention_codec is not None and not shared:
            if packed.codec is self.codec or getattr(packed.codec, "codec", None) is self.codec:
                self._recent.append(_Recent(weakref.ref(t), packed, entry))
            if type(t.grad_fn).__name__.startswith(_FUSED_ATTENTION):  # stored by _general already
                self._attention_output(t.grad_fn)
        return packed

    def _attention_output(self, node) -> None:
        """``node``, a fused attention kernel's autograd node, is saving its output (stored through
        the attention codec by ``_general``): store its query, key and value (its first three inputs,
        saved just before) through the attention codec too. The Packed objects autograd holds are
        refilled in place; their ledger rows follow."""
        wanted = [fn_nr for fn_nr in node.next_functions[:3] if fn_nr[0] is not None]
        for recent in list(self._recent):
            t = recent.ref()
            if t is None or (t.grad_fn, t.output_nr) not in wanted or recent.packed.codec is _RAW:
                continue
            self._recent.remove(recent)
            codec = self._fitted_apart(t, self.attention_codec)
            redone = self._encode(codec, t, None)
            packed = recent.packed
            packed.codec, packed.tensors = redone.codec, redone.tensors
            packed.meta = {**redone.meta, **{k: v for k, v in packed.meta.items() if k in (PREVIOUS, RELU_MASK)}}
            if recent.entry is not None:
                recent.entry.codec = packed.codec.name
                recent.entry.stored_bytes = packed.nbytes
                recent.entry.compressed = packed.codec is not _RAW

    def _fitted_apart(self, t: torch.Tensor, codec: ActivationCodec) -> ActivationCodec:
        """``codec`` (attention's or the probabilities': stored apart from the rest) fitted to t."""
        if isinstance(codec, RawCodec):
            return _RAW
        codec.generator = getattr(self.codec, "generator", None)  # one rounding stream
        return self._fitted(t, False, codec)

    def _unpack(self, packed):
        if not isinstance(packed, Packed):
            return packed
        decoded = take_decoded(packed)  # decoded already, by a rebuild of the BatchNorm's output
        if decoded is None:
            decoded = packed.unpack()
        if self.prefetcher is not None and PREVIOUS in packed.meta:
            self.prefetcher.after_unpack(packed)  # the next decode backward needs, on a side stream
        return decoded

    def _rebuilt(self, t: torch.Tensor, frame: Optional[_Frame], codec: ActivationCodec) -> Optional[Packed]:
        """The zero-byte Packed of a convolution's (or Linear's) input that ``division.rebuild``
        can rebuild in backward, or of a GELU's, SiLU's or LayerNorm module's output (whoever saves
        it) whose input is stored (``division.rebuild.output_source``), or None to store it as usual."""
        if not self._rebuild_inputs or codec is _RAW:
            return None
        source = output_source(t, self._stored_by_node)
        if source is not None:
            return self._rebuild.reference(t, source, None)
        if frame is None or frame.ctx.kind not in ("conv", "linear") or t is not frame.input:
            return None
        chain = self._chains.lookup(t)
        if chain is None:
            return None
        mask = None
        if chain.relu:
            # the ReLU's exact mask of this very value gives the rebuilt input its zeros
            entry = self._cache.get((id(t), id(self._relu)))
            if entry is None or entry.ref() is not t or entry.version != t._version:
                return None
            mask = entry.packed
        return self._rebuild.reference(t, chain.source, mask)

    def _recomputed_input(self, t: Optional[torch.Tensor]) -> bool:
        """Will a norm's input ``t`` be recomputed (``recompute_norm_input``)?"""
        return self._recompute_norms and t is not None and self._chains.lookup_conv(t) is not None

    def _recomputed(self, t: torch.Tensor, frame: Optional[_Frame], codec: ActivationCodec) -> Optional[Packed]:
        """The zero-byte Packed of a norm's input that backward can recompute from the cheap
        convolution that produced it, or None to store it as usual."""
        if not self._recompute_norms or frame is None or frame.ctx.kind != "norm" or t is not frame.input \
                or codec is _RAW:
            return None
        conv = self._chains.lookup_conv(t)
        return None if conv is None else self._recompute.reference(t, conv.source)

    def _link_relu_mask(self, t: torch.Tensor, packed: Packed) -> None:
        """``t`` is also a ReLU output kept as its mask (same tensor, same version): give the
        codec's Packed the mask (``exact.RELU_MASK``), whose zeros (DIVISION with relu_zeros) or
        whole decode (a pooling input stored by shape only) its decode then takes."""
        entry = self._cache.get((id(t), id(self._relu)))
        if entry is not None and entry.ref() is t and entry.version == t._version:
            packed.meta[RELU_MASK] = entry.packed

    def _encode(self, codec: ActivationCodec, t: torch.Tensor, ctx: Optional[SaveContext],
                relu_bits: Optional[torch.Tensor] = None) -> Packed:
        if relu_bits is not None:
            return self._run(lambda x: codec.encode(x, ctx, relu_mask=relu_bits), t)
        if codec is _RAW or codec is _SHAPE_ONLY:
            return codec.encode(t, ctx)  # nothing to overlap: no kernel runs
        return self._run(lambda x: codec.encode(x, ctx), t)

    def _run(self, work, t: torch.Tensor):
        """``work(t)``, on the encode stream if there is one."""
        return work(t) if self.encode_stream is None else self.encode_stream.run(work, t)

    def _settle_mask(self, t: Optional[torch.Tensor], codec: Optional[ActivationCodec]) -> Optional[torch.Tensor]:
        """Resolve the pending ReLU mask at the next save through a codec (or the end of forward):
        if that save encodes the ReLU's output itself through the activation codec, return the
        mask's bits for that encode to fill (one read of the output for both); else pack them now.
        The output cannot change in between: autograd refuses in-place changes to a tensor it saved."""
        pending, self._pending_mask = self._pending_mask, None
        if pending is None:
            return None
        out, version, mask = pending
        if t is out and out._version == version and codec is self.codec:
            return mask.tensors["bits"]
        self._run(lambda x: self._relu.fill(mask, x), out)
        return None

    def _forget(self, key):
        cache = self._cache

        def drop(ref):
            entry = cache.get(key)
            if entry is not None and entry.ref is ref:
                del cache[key]
        return drop

    def _choose_codec(self, t: torch.Tensor, frame: Optional[_Frame]) -> ActivationCodec:
        if t.numel() < self.min_numel:
            return _RAW
        if frame is None:
            return self._general(t)
        kind = frame.ctx.kind
        if self.exact_masks:
            if t.dtype == torch.bool:
                return self._bool
            if kind == "relu" and t.is_floating_point():
                return self._relu
            if kind == "dropout" and t.is_floating_point():
                return self._dropout
            if kind == "maxpool":
                return self._maxpool_codec(t, frame)
            if kind == "avgpool" and t.is_floating_point() and frame.input is not None \
                    and t.shape == frame.input.shape:
                return _SHAPE_ONLY  # average pooling's backward reads only its input's shape
        if kind in ACTIVATION_KINDS and self.codec is not None and self._is_input(t, frame):
            if not self.cover_all:
                return self.codec
            module = frame.module
            if isinstance(module, nn.LayerNorm) and t is frame.input:
                return self._normalized(t, len(module.normalized_shape))
            return self._fitted(t, isinstance(module, (nn.Linear, nn.LayerNorm)))
        if self.cover_all and self.codec is not None and isinstance(frame.module, KEEPS_DERIVATIVE) \
                and t.is_floating_point():
            return self._fitted(t, False)  # its derivative (division.activations): no grad of its own
        return self._general(t, frame)

    def _general(self, t: torch.Tensor, frame: Optional[_Frame] = None) -> ActivationCodec:
        """The rule for a save no module family claims (see ``cover_all``)."""
        if (self.cover_all and t.is_floating_point() and t.requires_grad
                and not _derives_from_parameter(t)):
            if self.attention_codec is not None and (_fused_attention_output(t) or _attention_input(t, frame)):
                return self._fitted_apart(t, self.attention_codec)
            if self.probability_codec is not None and _probabilities(t):
                return self._fitted_apart(t, self.probability_codec)
            sample_shape = flattened_activation(t)
            if sample_shape is not None:  # a Linear's 3-D or 4-D input as its matmul saves it
                return self._flattened_rows(t._base, sample_shape)
            return self._fitted(t, False)
        return _RAW

    def _flattened_rows(self, activation: torch.Tensor, sample_shape: tuple[int, ...]) -> ActivationCodec:
        """Rows coded as the activation they were flattened from (``layouts.flattened_activation``)."""
        return self._layout_codec(f"flattened_rows{sample_shape}",
                                  lambda: FlattenedRowsCodec(self._fitted(activation, True), sample_shape))

    def _normalized(self, t: torch.Tensor, dims: int) -> ActivationCodec:
        """A LayerNorm input, stored normalized (``division.layouts.NormalizedCodec``)."""
        return self._layout_codec(f"normalized{dims}:{fit(t, True)}",
                                  lambda: NormalizedCodec(self._fitted(t, True), dims))

    def _fitted(self, t: torch.Tensor, feature_last: bool,
                base: Optional[ActivationCodec] = None) -> ActivationCodec:
        """The codec (or ``base``), seen through the view that fits t's layout (``division.layouts.fit``)."""
        base = self.codec if base is None else base
        layout = fit(t, feature_last)
        if layout is None:
            return base
        return self._layout_codec(layout if base is self.codec else f"{layout}:{id(base)}",
                                  lambda: LayoutCodec(base, layout))

    def _layout_codec(self, key: str, make) -> ActivationCodec:
        """The codec made by ``make()`` for ``key``, made once per compressor."""
        codec = self._layouts.get(key)
        if codec is None:
            codec = self._layouts[key] = make()
        return codec

    @staticmethod
    def _is_input(t: torch.Tensor, frame: _Frame) -> bool:
        """Is ``t`` the module's input (itself, or its autocast copy) rather than a weight copy?"""
        if not t.is_floating_point() or frame.input is None:
            return False
        if t is frame.input:
            return True
        return t.shape == frame.input.shape and t.shape not in frame.param_shapes

    def _maxpool_codec(self, t: torch.Tensor, frame: _Frame) -> ActivationCodec:
        m = frame.module
        if t.dtype == torch.int64 and t.dim() == 4 and frame.input is not None \
                and MaxPoolIndexCodec.fits(m.kernel_size):
            return MaxPoolIndexCodec(m.kernel_size, m.stride, m.padding, m.dilation, frame.input.shape[-1],
                                     kernels=self.exact_kernels)
        if t.is_floating_point() and frame.input is not None and t.shape == frame.input.shape:
            return _SHAPE_ONLY
        return _RAW

    def _record(self, t: torch.Tensor, frame: Optional[_Frame], packed: Packed, shared: bool) -> LedgerEntry:
        ref = self._plain_seen.get(id(t))
        plain_seen = ref is not None and ref() is t
        if not plain_seen:
            self._plain_seen[id(t)] = weakref.ref(t)
        codec = SHARED if shared else packed.codec.name
        if packed.codec is _RAW and not shared and t.is_floating_point() and _copies_parameter(t):
            codec = PARAMETER_COPY  # model memory, e.g. autocast's copy of a weight: raw, outside coverage
        entry = LedgerEntry(
            layer=frame.ctx.layer if frame else "",
            kind=frame.ctx.kind if frame else OTHER,
            codec=codec,
            shape=tuple(t.shape),
            dtype=str(t.dtype).replace("torch.", ""),
            plain_bytes=0 if plain_seen else t.numel() * t.element_size(),
            stored_bytes=0 if shared else packed.nbytes,
            op=frame.op if frame else OUTSIDE,
            compressed=packed.codec is not _RAW,
            rebuilt_from="" if shared else packed.meta.get("rebuilt_from", ""),
        )
        for ledger in (self.ledger, self._coverage):
            if ledger is not None:
                ledger.record(entry)
        return entry

    def _check_coverage(self) -> None:
        """Once, after the first training forward: the fraction of the bytes plain autograd would
        keep that this codec stores compressed; a warning under ``coverage_warning``."""
        seen, self._coverage = self._coverage, None
        self.coverage = seen.coverage
        # a knob that asked for rebuilds (or recomputes) none of which could be proved: say so, the
        # bytes stay stored
        for asked, codec, message in (
                (self._recompute_norms, RECOMPUTED,
                 "recompute_norm_input=true recomputed no normalization input of this model: no 1x1 or "
                 "depthwise convolution -> BatchNorm / norm module chain was found; those inputs are stored as usual"),
                (self._rebuild_inputs, REBUILT,
                 "rebuild_conv_input=true rebuilt no convolution input of this model: no BatchNorm(+ReLU) -> "
                 "convolution chain through PyTorch's native or cuDNN BatchNorm and no stored GELU, SiLU or "
                 "LayerNorm input was found (SyncBatchNorm is not rebuilt); those inputs are stored as usual")):
            if asked and not any(e.codec == codec for e in seen.entries):
                log.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=2)
        if self.coverage is None or self.coverage >= self.coverage_warning:
            return
        by_op = seen.by_op()
        raw = sorted(((row["raw_plain_bytes"] - row["parameter_copy_bytes"], op) for op, row in by_op.items()
                      if row["raw_plain_bytes"] > row["parameter_copy_bytes"]), reverse=True)
        name = getattr(self.codec, "name", type(self.codec).__name__)
        message = (f"{name} compresses {self.coverage:.1%} of the activation bytes this model saves "
                   f"(under {self.coverage_warning:.0%}); kept raw: "
                   + ", ".join(f"{op} {b / 2**20:.1f} MiB" for b, op in raw[:6])
                   + ("" if self.cover_all else "; cover_all=true compresses every saved activation"))
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def _copies_parameter(t: torch.Tensor) -> bool:
    """Is ``t`` one parameter's values (a cast, a transpose, a copy: as many elements), and so model
    memory that coverage leaves out? A lookup that parameters alone feed but that grows with the
    batch or the sequence (an embedding's output, a gathered position bias) is not: it stays in
    coverage, whose warning then names it (unless it happens to hold exactly as many elements)."""
    source = _source_parameter(t)
    return source is not None and t.numel() == source.numel()


def _fused_attention_output(t: torch.Tensor) -> bool:
    """Is ``t`` a fused attention kernel's output?"""
    return type(t.grad_fn).__name__.startswith(_FUSED_ATTENTION)


def _probabilities(t: torch.Tensor) -> bool:
    """Is ``t`` attention probabilities: a softmax output, or a view of one (the math fallback's
    batched matmul reads one)?"""
    base = t if t._base is None else t._base
    return type(base.grad_fn).__name__ in _SOFTMAX


def _attention_input(t: torch.Tensor, frame: Optional[_Frame]) -> bool:
    """Is ``t`` the query, key or value that ``division.attention.RecomputedAttention`` saves: the
    (N, heads, L, E) maps saved inside a ``MultiheadAttention`` (its projections' saves are 3-D)?"""
    return frame is not None and t.dim() == 4 and isinstance(frame.module, nn.MultiheadAttention)


def _is_parameter(t: torch.Tensor) -> bool:
    """Is t a parameter or a view of one? Plain tensors answer without Parameter's isinstance hook."""
    base = t._base
    if type(t) is torch.Tensor and (base is None or type(base) is torch.Tensor):
        return False
    return isinstance(t, nn.Parameter) or isinstance(base, nn.Parameter)


def compress_activations(model: nn.Module, codec: Optional[ActivationCodec], **kwargs) -> ActivationCompressor:
    """Install compressed activation storage on ``model`` (in place) and return the handle."""
    return ActivationCompressor(model, codec, **kwargs)
