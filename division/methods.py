"""Training methods: how a model keeps its activations for backward.

A method is applied to a model in place (``attach``) and, for the step, may wrap forward+backward in a
context (``step_context``: swap uses one). Every method can feed a ``ByteLedger`` so that memory is
reported the same way for all of them. ``build_method(name, **knobs)`` is the one entry point the
runners use; ``register_method`` adds new ones (the baselines register themselves).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from .codec import ActivationCodec, RawCodec
from .compiled import (CompiledLayers, Coverage, SavedTensorCounter, plain_save_coverage, self_check,
                       tensor_codec_for)
from .compressor import ActivationCompressor, compress_activations
from .decode_prefetch import DecodePrefetcher
from .encode_stream import SideStreamEncoder
from .ledger import ByteLedger
from .packing import SUPPORTED_BITS
from .recompile_limit import refuse_recompile_limit

log = logging.getLogger(__name__)


class TrainingMethod:
    """Plain autograd (``method=none``); the base class of every other method."""

    name = "none"
    # Can a training step be captured in a CUDA graph and replayed (``cuda_graph=true``)? Not when
    # the step syncs with the host, moves data off the device, or the method changes what it does
    # between steps (a captured graph keeps doing what it did at capture).
    cuda_graph_safe = True
    # Does the method keep its storage inside a ``torch.compile``d model? Methods that work only
    # through saved-tensor hooks do not: a compiled graph bypasses them (``compile`` refuses).
    compile_safe = True

    def __init__(self) -> None:
        self.compressor: Optional[ActivationCompressor] = None
        self.ledger: Optional[ByteLedger] = None
        self.counter: Optional[SavedTensorCounter] = None  # the ledger of a compiled model

    def attach(self, model: nn.Module, ledger: Optional[ByteLedger] = None) -> nn.Module:
        """Apply the method to ``model`` in place and return the module to train.

        Plain autograd installs nothing, unless a ledger is asked for: then its saves are recorded
        (kept raw, counted once per tensor) until ``stop_ledger``.
        """
        self.ledger = ledger
        if ledger is not None:
            self.compressor = compress_activations(model, None, exact_masks=False, ledger=ledger)
        return model

    def compile(self, model: nn.Module, **compile_kwargs) -> nn.Module:
        """``torch.compile(model, **compile_kwargs)`` for a model this method is attached to.

        The compiled model keeps what the method stores (``division.compiled``); with a ledger, the
        ledger counts what the compiled graph saves at each forward. A method that cannot work inside
        a compiled graph raises ``CompileUnsupported`` instead of training uncompressed.
        """
        if not self.compile_safe:
            raise CompileUnsupported(
                f"method {self.name!r} keeps its activations through saved-tensor hooks, which a "
                "torch.compile'd model bypasses (it would train uncompressed); train it without "
                "compile, or use method 'division' or 'none'")
        self._check_compiled(model, compile_kwargs)
        compiled = refuse_recompile_limit(torch.compile(model, **compile_kwargs), self.name)
        if self.ledger is not None:
            self.counter = SavedTensorCounter(model, self.ledger, self._compiled_chain())
            self.counter.install(compiled)
        return compiled

    def _check_compiled(self, model: nn.Module, compile_kwargs: dict) -> None:
        """Raise ``CompileUnsupported`` if this method's compiled form cannot be trusted here."""

    def _compiled_chain(self):
        """The compiled layers' ``ConvInputChain`` (``rebuild_conv_input``), None without one."""
        return None

    def stop_ledger(self) -> None:
        """Stop recording into the ledger (a training run counts its first step only; the ledger
        keeps that step's entries). Plain autograd then removes its hooks altogether: the rest of
        the run costs what unhooked training costs."""
        self.detach()
        self._stop_counter()

    def _stop_counter(self) -> None:
        if self.counter is not None:
            self.counter.enabled = False

    def detach(self) -> None:
        if self.compressor is not None:
            self.compressor.remove()
            self.compressor = None

    def step_context(self):
        """Context around one training step's forward and backward."""
        return contextlib.nullcontext()

    def use_cuda_graph(self) -> None:
        """Called once when the training step is going to be captured in a CUDA graph."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step (adaptive methods refresh their state here)."""

    def at_step(self, step: int) -> None:
        """The next training step is number ``step`` (0 = the first): a resumed run says where it
        resumes, so stochastic rounding draws what the uninterrupted run drew."""

    def describe(self) -> dict[str, Any]:
        """The record fields of this method: ``method``, ``block_size``, ``bits`` (null where none) and
        ``kernels``: how its codec runs, "triton" (fused kernels) or "pytorch" (PyTorch ops), null
        without a codec."""
        return {"method": self.name, "block_size": None, "bits": None, "kernels": None}


def codec_kernels(codec: Optional[ActivationCodec]) -> Optional[str]:
    """"triton" for the fused-kernel codecs, "pytorch" for codecs written in PyTorch ops, None without one."""
    if codec is None:
        return None
    return "triton" if type(codec).__name__.startswith("Triton") else "pytorch"


class CodecGenerator:
    """Gives a codec's stochastic rounding its own ``torch.Generator``, seeded from ``seed``, on the device
    of the model's input, so that rounding never draws from torch's global generator: attaching a
    method leaves dropout masks, stochastic depth and every other global draw as plain training has them.

    The generator is re-seeded at every training step from (``seed``, step): a run resumed at step k
    draws what the uninterrupted run drew, without keeping generator state in the checkpoint. The
    generator is made on the device of the model's parameters at attach, and once more on the device of
    the first forward pass's input if that differs (a model attached before it was moved); a one-shot
    forward pre-hook checks it and removes itself, so later steps (and torch.compile) see no hook. In
    steps captured in a CUDA graph the codec draws from the default CUDA generator again (``release``):
    a graph replays only the generators it registers.
    """

    def __init__(self, codec: ActivationCodec, seed: Optional[int]):
        self.codec = codec
        self.seed = int(torch.initial_seed() if seed is None else seed)
        self.step = 0
        self.enabled = True
        self._handle = None

    @staticmethod
    def wants(codec: Optional[ActivationCodec]) -> bool:
        return codec is not None and getattr(codec, "generator", False) is None

    def install(self, model: nn.Module) -> None:
        first = next(model.parameters(), None)
        if first is not None:
            self._use(first.device)
        self._handle = model.register_forward_pre_hook(self._check)

    # Run as Python under a user's own torch.compile(model): traced, its self-removal (a handle made
    # outside the graph) broke the first step's graph twice; skipped, it breaks it once.
    @torch.compiler.disable
    def _check(self, module, args) -> None:
        if not (args and isinstance(args[0], torch.Tensor)):
            return
        if self.enabled:
            gen = self.codec.generator
            device = args[0].device
            if gen is None or gen.device.type != device.type or (
                    device.type == "cuda" and gen.device.index != (device.index if device.index is not None
                                                                   else torch.cuda.current_device())):
                self._use(device)
        self.remove()  # the device is settled: no hook on later steps

    def _step_seed(self) -> int:
        return (self.seed * 0x9E3779B97F4A7C15 + self.step) % (2 ** 63)  # distinct streams per (seed, step)

    def _use(self, device: torch.device) -> None:
        if device.type == "meta":
            return
        self.codec.generator = torch.Generator(device=device).manual_seed(self._step_seed())

    def at_step(self, step: int) -> None:
        """Draw the rounding noise of training step ``step`` (0 = the first) from here on."""
        self.step = int(step)
        if self.enabled and self.codec.generator is not None:
            self.codec.generator.manual_seed(self._step_seed())

    def release(self) -> None:
        """Back to torch's default generator (CUDA-graph capture), and stop following the input."""
        self.enabled = False
        self.codec.generator = None

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


SIDE_STREAM_CHOICES = ("auto", True, False)


def valid_side_stream(value) -> bool:
    """One of SIDE_STREAM_CHOICES (the bools themselves: 1 and "true" are not)."""
    return value == "auto" or isinstance(value, bool)


def valid_prefetch_ahead(value) -> bool:
    """An integer >= 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# DIVISION's bits for attention's tensors and for softmax outputs (division.compressor); the
# report names a run's values only where they differ from these
DEFAULT_ATTENTION_BITS = 8
DEFAULT_PROBABILITY_BITS = 4


def valid_attention_bits(value) -> bool:
    """0 (exact) or one of the codec's bit widths (an integer, not a bool): ``attention_bits``,
    ``probability_bits``."""
    return isinstance(value, int) and not isinstance(value, bool) and (value == 0 or value in SUPPORTED_BITS)


class CompileUnsupported(RuntimeError):
    """``TrainingMethod.compile`` on a method whose storage a compiled graph would bypass."""


class CodecMethod(TrainingMethod):
    """Conv / norm / linear inputs through ``codec``; exact masks for ReLU, dropout and max-pooling.

    side_stream: run the encodes on a side CUDA stream (``division.encode_stream``), where they
    overlap the forward pass's convolutions. "auto": only in steps captured in a CUDA graph; in
    eager steps the stream bookkeeping adds host time to a step that is already host-bound.
    prefetch_decode: in backward, decode the next activation on a side CUDA stream while this
    layer's backward runs (``division.decode_prefetch``). Same choices as side_stream.
    prefetch_ahead: how many activations ahead those decodes start (an integer >= 1); each one
    more decoded activation alive at a time.
    norm_from_codes: BatchNorm layers compute their backward from their input's codes where the
    codec's fused kernels stored them (``division.norm_from_codes``), instead of decoding it.
    rebuild_conv_input: a convolution's input that is ReLU(BN(x)) or BN(x) is not stored but rebuilt
    in backward from the BatchNorm's stored input (``division.rebuild``; compiled:
    ``division.compiled_rebuild``); also a GELU's, SiLU's or LayerNorm's output, from the
    activation's or LayerNorm's own stored input (the inputs of a transformer's or ConvNeXt's
    attention projection and MLP Linears): eagerly whoever saves it, compiled a Linear, a
    self-attention or a convolution reading it directly.
    recompute_norm_input: a BatchNorm's input that is a 1x1 or depthwise convolution's output is not
    stored but recomputed in backward from that convolution's stored input (``division.rebuild``;
    compiled: ``division.compiled_rebuild``).
    fused_norm: compiled steps run a training BatchNorm on a channels_last map inside its input's
    encode, with a ReLU that alone reads its output folded in, and its backward from the codes
    (``division.compiled``'s ``_FusedBatchNorm``; the eager path's fused kernels). Fused codec only.
    """

    def __init__(self, name: str, codec: ActivationCodec, *, exact_masks: bool = True,
                 min_numel: int = 1024, exact_kernels: bool = True, side_stream="auto",
                 prefetch_decode="auto", prefetch_ahead: int = 1, norm_from_codes: bool = False,
                 seed: Optional[int] = None, cover_all: bool = False,
                 attention_codec: Optional[ActivationCodec] = None,
                 probability_codec: Optional[ActivationCodec] = None, rebuild_conv_input: bool = False,
                 recompute_norm_input: bool = False, fused_norm: bool = False) -> None:
        super().__init__()
        for knob, value in (("rebuild_conv_input", rebuild_conv_input),
                            ("recompute_norm_input", recompute_norm_input), ("fused_norm", fused_norm)):
            if not isinstance(value, bool):
                raise ValueError(f"{knob} must be true or false, got {value!r}")
        for knob, value in (("side_stream", side_stream), ("prefetch_decode", prefetch_decode)):
            if not valid_side_stream(value):
                raise ValueError(f"{knob} must be one of {SIDE_STREAM_CHOICES}, got {value!r}")
        if not valid_prefetch_ahead(prefetch_ahead):
            raise ValueError(f"prefetch_ahead must be an integer >= 1, got {prefetch_ahead!r}")
        self.name = name
        self.codec = codec
        self.exact_masks = exact_masks
        self.min_numel = min_numel
        self.exact_kernels = exact_kernels  # False: the masks' PyTorch path too (backend=torch)
        self.side_stream = side_stream
        self.prefetch_decode = prefetch_decode
        self.prefetch_ahead = prefetch_ahead
        self.norm_from_codes = bool(norm_from_codes)
        self.cover_all = bool(cover_all)
        self.attention_codec = attention_codec
        self.probability_codec = probability_codec
        self.rebuild_conv_input = rebuild_conv_input
        self.recompute_norm_input = recompute_norm_input
        self.tensor_codec = tensor_codec_for(codec, fused_norm)  # None: the codec has no compiled form
        if fused_norm and not (self.tensor_codec is not None and self.tensor_codec.fused):
            raise ValueError("fused_norm=true runs the fused GPU kernels' BatchNorm: it needs method.backend=triton "
                             "(or auto on a CUDA machine); set method.fused_norm=false here")
        self.compile_safe = self.tensor_codec is not None
        self.compiled_layers: Optional[CompiledLayers] = None
        # compiled: the share of plain autograd's saved bytes inside layers that compress compiled
        self.compiled_coverage: Optional[Coverage] = None
        self.seed = seed  # stochastic rounding's own generator; None: torch.initial_seed() at attach
        self._generator: Optional[CodecGenerator] = None

    def attach(self, model: nn.Module, ledger: Optional[ByteLedger] = None) -> nn.Module:
        self.ledger = ledger
        if self.tensor_codec is not None:
            # self-attention's query, key and value at attention_bits (exact, 0: left to the compiler)
            attention = self.tensor_codec if self.attention_codec is None \
                else tensor_codec_for(self.attention_codec)
            self.compiled_layers = CompiledLayers(model, self.tensor_codec, attention=attention,
                                                  rebuild_conv_input=self.rebuild_conv_input,
                                                  recompute_norm_input=self.recompute_norm_input)
        if CodecGenerator.wants(self.codec):
            self._generator = CodecGenerator(self.codec, self.seed)
            self._generator.install(model)
        stream = SideStreamEncoder() if self.side_stream is True else None
        prefetcher = DecodePrefetcher(self.prefetch_ahead) if self.prefetch_decode is True else None
        self.compressor = compress_activations(model, self.codec, exact_masks=self.exact_masks,
                                               min_numel=self.min_numel, ledger=ledger,
                                               exact_kernels=self.exact_kernels, encode_stream=stream,
                                               prefetcher=prefetcher, norm_from_codes=self.norm_from_codes,
                                               cover_all=self.cover_all,
                                               attention_codec=self.attention_codec,
                                               probability_codec=self.probability_codec,
                                               rebuild_conv_input=self.rebuild_conv_input,
                                               recompute_norm_input=self.recompute_norm_input)
        if self.compiled_layers is not None:
            self.compressor.compiled_uncovered = self.compiled_layers.uncovered
            self.compiled_layers.eager_compressing = self.compressor.compressing
        return model

    def compile(self, model: nn.Module, **compile_kwargs) -> nn.Module:
        """``TrainingMethod.compile``; the first training call of the compiled model also measures
        the compiled coverage (``compiled_coverage``) on two of its samples, and warns under the
        compressor's threshold (90%) naming what stays uncompressed; with ``rebuild_conv_input`` it
        proves there which convolution inputs the traced forward may rebuild
        (``ConvInputChain.prove``), and after it warns if none was."""
        if self.compiled_layers is not None:
            # Static shapes unless asked otherwise: the fused kernels' plans are per shape. Left to
            # torch.compile, the first new batch size (an epoch's last, short batch) re-traces the
            # graph with symbolic shapes, which the fused kernels' plan lookup cannot take (tracing
            # failed there on a GPU). Each batch size gets its own graph instead.
            if compile_kwargs.get("dynamic") is None:  # None is torch.compile's own choice: the same
                compile_kwargs["dynamic"] = False
        compiled = super().compile(model, **compile_kwargs)
        if self.compiled_layers is not None and self.compressor is not None:
            handle = None

            def measure(_module, args):
                if not (model.training and torch.is_grad_enabled()) or not args \
                        or not isinstance(args[0], torch.Tensor) or args[0].dim() == 0:
                    return
                handle.remove()
                with self.compressor.paused():
                    self.compiled_coverage = plain_save_coverage(
                        model, self.compiled_layers, (args[0][:2], *args[1:]))
                    if self.compiled_layers.chain is not None:  # before the first trace
                        self.compiled_layers.chain.prove(model, self.compiled_layers.modules,
                                                         (args[0][:2], *args[1:]))
                self._warn_compiled_coverage()
            handle = compiled.register_forward_pre_hook(measure)
        chain = self._compiled_chain()
        if chain is not None:
            after_first = None

            def check_rebuilt(_module, _args, _output):
                if not (model.training and torch.is_grad_enabled()):
                    return
                after_first.remove()
                # a knob that asked for rebuilds (recomputes) where the traced forward made none
                for asked, made, message in (
                        (chain.rebuild, chain.rebuilt,
                         "rebuild_conv_input=true rebuilt no layer input of this compiled model: no "
                         "BatchNorm (+ ReLU module), GELU, SiLU or LayerNorm module output is read directly by a "
                         "convolution, Linear or self-attention; those inputs are stored as usual"),
                        (chain.recompute, chain.recomputed,
                         "recompute_norm_input=true recomputed no BatchNorm input of this compiled model: no "
                         "1x1 or depthwise convolution's output is read by a BatchNorm directly; those inputs are stored "
                         "as usual")):
                    if asked and not made:
                        log.warning(message)
                        warnings.warn(message, RuntimeWarning, stacklevel=2)
            after_first = compiled.register_forward_hook(check_rebuilt)
        return compiled

    def _compiled_chain(self):
        return None if self.compiled_layers is None else self.compiled_layers.chain

    def _warn_compiled_coverage(self) -> None:
        cov = self.compiled_coverage
        threshold = self.compressor.coverage_warning
        if cov.fraction is None or cov.fraction >= threshold:
            return
        message = (f"compiled, {self.name} compresses {cov.fraction:.1%} of the activation bytes this "
                   f"model saves (under {threshold:.0%}); kept as the compiler chooses: "
                   + ", ".join(f"{owner} {b / 2**20:.1f} MiB" for owner, b in list(cov.raw_bytes.items())[:6])
                   + "; train it eagerly to compress every saved activation (cover_all)")
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _check_compiled(self, model: nn.Module, compile_kwargs: dict) -> None:
        if self.compiled_layers is None:
            return
        if compile_kwargs.get("dynamic") and self.tensor_codec.fused:
            raise CompileUnsupported(
                "torch.compile(dynamic=True) is not available with DIVISION's fused GPU kernels, whose "
                "launch plans are per shape: compile with dynamic=False (the default here), which "
                "compiles one graph per batch size")
        problem = self_check(next(model.parameters()).device, self.tensor_codec.fused, **compile_kwargs)
        if problem is not None:
            raise CompileUnsupported(f"{problem}; DIVISION cannot train compiled here: use it "
                                     "without torch.compile (its eager and CUDA-graph paths)")

    def stop_ledger(self) -> None:
        if self.compressor is not None:
            self.compressor.ledger = None
        self._stop_counter()

    def detach(self) -> None:
        super().detach()
        if self.compiled_layers is not None:
            self.compiled_layers.remove()
            self.compiled_layers = None
        if self._generator is not None:
            self._generator.remove()
            self._generator = None

    def at_step(self, step: int) -> None:
        if self._generator is not None:
            self._generator.at_step(step)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.at_step(step + 1)

    def use_cuda_graph(self) -> None:
        if self._generator is not None:
            self._generator.release()
        if self.compressor is None:
            return
        if self.side_stream == "auto" and self.compressor.encode_stream is None:
            self.compressor.encode_stream = SideStreamEncoder()
        if self.prefetch_decode == "auto" and self.compressor.prefetcher is None:
            self.compressor.prefetcher = DecodePrefetcher(self.prefetch_ahead)

    def describe(self) -> dict[str, Any]:
        knobs = self.codec.describe()
        fields = {"method": self.name, "block_size": knobs.get("block_size"), "bits": knobs.get("bits"),
                  "kernels": codec_kernels(self.codec)}
        if self.name == "division":
            fields.update(rebuild_conv_input=self.rebuild_conv_input, recompute_norm_input=self.recompute_norm_input,
                          fused_norm=self.tensor_codec is not None and self.tensor_codec.fused_norm)
            if self.cover_all:  # else attention and probabilities are stored like every other save
                fields.update(attention_bits=_stored_bits(self.attention_codec, knobs.get("bits")),
                              probability_bits=_stored_bits(self.probability_codec, knobs.get("bits")))
        return fields


def _stored_bits(codec: Optional[ActivationCodec], bits) -> Optional[int]:
    """The bits a codec stored apart keeps: 0 for exact, ``bits`` when there is none (as the rest)."""
    if codec is None:
        return bits
    return 0 if isinstance(codec, RawCodec) else codec.describe().get("bits")


def _division(block_size: int = 8, bits: int = 2, rounding: str = "stochastic", keep_lfc: bool = True,
              keep_hfc: bool = True, simulate: bool = False, backend: str = "auto", relu_zeros: bool = True,
              side_stream="auto", prefetch_decode="auto", prefetch_ahead: int = 1, norm_from_codes: bool = True,
              seed: Optional[int] = None, cover_all: bool = True, attention_bits: int = DEFAULT_ATTENTION_BITS,
              probability_bits: int = DEFAULT_PROBABILITY_BITS, rebuild_conv_input: bool = False,
              recompute_norm_input: bool = False, fused_norm: bool = False, **_) -> TrainingMethod:
    from .backends import division_codec
    for knob, value, what in (("attention_bits", attention_bits, "attention"),
                              ("probability_bits", probability_bits, "probabilities")):
        if not valid_attention_bits(value):
            raise ValueError(f"method.{knob}={value!r} is not allowed: "
                             f"use 0 ({what} kept exact) or one of {', '.join(map(str, SUPPORTED_BITS))}")
    knobs = dict(backend=backend, block_size=block_size, rounding=rounding, keep_lfc=keep_lfc,
                 keep_hfc=keep_hfc, simulate=simulate, relu_zeros=relu_zeros)
    codec = division_codec(bits=bits, **knobs)

    def apart(stored_bits: int) -> Optional[ActivationCodec]:
        """Attention's tensors or softmax outputs (see division.compressor): exact (0), stored apart
        at other bits, or (None) as the rest."""
        return RawCodec() if stored_bits == 0 else \
            None if stored_bits == bits else division_codec(bits=stored_bits, **knobs)

    return CodecMethod("division", codec, exact_kernels=backend != "torch", side_stream=side_stream,
                       prefetch_decode=prefetch_decode, prefetch_ahead=prefetch_ahead,
                       norm_from_codes=norm_from_codes, seed=seed, cover_all=cover_all,
                       attention_codec=apart(attention_bits), probability_codec=apart(probability_bits),
                       rebuild_conv_input=rebuild_conv_input,
                       recompute_norm_input=recompute_norm_input, fused_norm=fused_norm)


_REGISTRY: dict[str, Callable[..., TrainingMethod]] = {
    "none": lambda **_: TrainingMethod(),
    "division": _division,
}


def register_method(name: str, factory: Callable[..., TrainingMethod]) -> None:
    _REGISTRY[name] = factory


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def knobs_from_text(items: list[str]) -> dict:
    """``build_method`` keywords from KEY=VALUE strings (a script's command line): true / false as
    booleans, integers as ints, anything else as text."""
    knobs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"a knob is KEY=VALUE, not {item!r}")
        knobs[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return knobs


def build_method(name: str, **knobs) -> TrainingMethod:
    """Build a method by name; unknown knobs for that method are ignored (configs carry extras)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    return _REGISTRY[name](**knobs)


from . import baselines  # noqa: E402,F401  registers blpa, acgc, actnn, checkpoint, swap
