"""AC-GC-like storage: per-layer bit widths derived from measured gradient statistics (method ``acgc``).

Storage. Each conv / linear input is kept at one bit width per layer, each norm-layer input at one
bit width per channel (dim 1). Codes are symmetric round-to-nearest with a per-channel absmax scale:
with b bits and L = 2^(b-1) - 1 levels on each side of 0, step = scale / L,
code = clamp(round(x / step), -L, L), so |x_hat - x| <= step / 2 and 0 stays 0. Widths live in
containers of 2, 4, 8 or 16 bits: 2/4/8-bit codes are offset by L and bit-packed, 16-bit codes are
stored as int16 (an integer grid, so the step-size guarantee holds at 16 bits too; fp16 would give
a relative, not an absolute, error). The scale is kept per channel in bf16, rounded up so nothing
clips. Bytes: the codes (ceil(n * b / 8) per container, 2 n for int16) plus 2 per channel.

Schedule. Before the first refresh every layer uses 8 bits. Steps are counted from 1; on every
``refresh_every``-th step (T, 2T, ...) the saved activations are kept exact and module hooks record,
per layer: the input's absmax (per channel for norms, with the per-channel std), the norm of the
output gradient (per channel for norms) and the norm of the weight gradient. ``after_step`` of that
step averages the last ``history`` refreshes and sets the new widths, which hold until the next
refresh. ``bits_by_layer()`` gives the widths stored; ``describe()["bits"]`` their average weighted
by each layer's input size.

Derivation of the widths from ``error_bound`` (eps). A conv or linear layer's weight gradient is
bilinear in its output gradient g and its input x: G_W = sum over positions of g (x) x. Rounding x to
a grid of step dx adds an error e, |e| <= dx / 2; modelled as independent zero-mean noise of variance
dx^2 / 12, it changes the weight gradient by dG with E||dG||^2 <= F ||g||^2 dx^2 / 12, where F is the
number of input elements each output element is multiplied with per weight slice (the fan-in:
in_channels / groups times the kernel area; in_features for a Linear layer). Its input gradient,
W^T g, does not read x at all. Asking E||dG||^2 <= eps^2 ||G_W||^2 gives the largest allowed step
    dx = eps * ||G_W|| * sqrt(12 / F) / ||g||.
A norm layer's weight gradient is, per channel c, sum g_c * (x_c - mu_c) / sigma_c, so a step dx_c
in x_c is a step dx_c / sigma_c in the normalised input; splitting the layer's budget
eps^2 ||G_gamma||^2 equally over its C channels gives
    dx_c = eps * ||G_gamma|| * sigma_c * sqrt(12 / C) / ||g_c||.
Then bits = clip(ceil(log2(absmax / dx + 1)) + 1, 2, 16), rounded up to a container. (The "+1" in
the log makes the L = 2^(b-1) - 1 levels per side really reach a step <= dx; AC-GC's
ceil(log2(absmax / dx)) + 1 can fall short by one level.) Default eps = 0.1: the quantization noise
in each weight gradient stays around a tenth of the gradient's own norm, well below the noise of a
mini-batch gradient; a tighter eps gives more bits.

How this departs from AC-GC (Evans & Aamodt, NeurIPS 2021). The original derives a bound for each
layer type from its own error analysis, including the effect on the gradient passed down through
norm layers, and uses the resulting bit width as is; this version bounds only the weight-gradient
error under a uniform-noise model (for norm layers the gamma gradient, not the gradient sent to the
layer below), rounds widths up to 2/4/8/16-bit containers, measures the statistics on a refresh step
whose activations are kept exact (one uncompressed step in every T), uses the input's own per-channel
std for every norm type (exact for BatchNorm, an approximation for GroupNorm / LayerNorm), and stores
a tensor read by two layers (a block input feeding conv1 and the downsample conv) once, at the width
of the first layer that saves it.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..codec import ActivationCodec, Packed, SaveContext
from ..compressor import ACTIVATION_KINDS, module_kind
from ..exact import _is_channels_last, _restore_format
from ..ledger import ByteLedger
from ..methods import CodecMethod, TrainingMethod
from ..packing import pack_bits, packed_nbytes, unpack_bits
from ._numerics import TINY, as_channels, bf16_up, channel_count, channel_layout

log = logging.getLogger(__name__)

CONTAINERS = (2, 4, 8, 16)
INITIAL_BITS = 8
MIN_BITS, MAX_BITS = 2, 16


def container_bits(bits: int) -> int:
    """The smallest storage container (2, 4, 8 or 16 bits) that holds ``bits``-bit codes."""
    for size in CONTAINERS:
        if bits <= size:
            return size
    raise ValueError(f"no container holds {bits} bits")


def required_bits(ratio: torch.Tensor) -> torch.Tensor:
    """Bits for codes reaching absmax / dx = ``ratio``: clip(ceil(log2(ratio + 1)) + 1, 2, 16)."""
    bits = torch.ceil(torch.log2(ratio + 1.0)) + 1.0
    return bits.clamp(MIN_BITS, MAX_BITS)


@dataclass
class LayerPlan:
    """How one layer's input is stored: one container width, or one per channel.

    ``groups`` lists (container bits, channel indices) for per-channel plans; ``None`` means all
    channels use ``bits``.
    """

    bits: int
    groups: Optional[list[tuple[int, torch.Tensor]]] = None
    channels: int = 0
    _on_device: dict = field(default_factory=dict, repr=False)

    @classmethod
    def per_channel(cls, channel_bits: Sequence[int]) -> "LayerPlan":
        widths = [container_bits(int(b)) for b in channel_bits]
        if len(set(widths)) == 1:
            return cls(widths[0], None, len(widths))
        groups = []
        for width in sorted(set(widths)):
            idx = torch.tensor([c for c, w in enumerate(widths) if w == width], dtype=torch.long)
            groups.append((width, idx))
        return cls(max(widths), groups, len(widths))

    def groups_on(self, device: torch.device) -> list[tuple[int, torch.Tensor]]:
        if device not in self._on_device:
            self._on_device[device] = [(b, idx.to(device)) for b, idx in self.groups]
        return self._on_device[device]

    def mean_bits(self) -> float:
        if self.groups is None:
            return float(self.bits)
        return sum(b * idx.numel() for b, idx in self.groups) / self.channels


def _quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric codes of ``x`` (channels on dim 1) with per-channel ``scale``, stored form."""
    levels = 2 ** (bits - 1) - 1
    _, _, bshape = channel_layout(x)
    codes = torch.round(x * (levels / scale).view(bshape)).clamp_(-levels, levels)
    if bits == 16:
        return codes.to(torch.int16)
    return pack_bits(codes + levels, bits)


def _dequantize(stored: torch.Tensor, scale: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    levels = 2 ** (bits - 1) - 1
    if bits == 16:
        codes = stored.float().view(shape)
    else:
        codes = unpack_bits(stored, bits, math.prod(shape)).view(shape).float() - levels
    bshape = [1, shape[1]] + [1] * (len(shape) - 2)
    return codes * (scale / levels).view(bshape)


def _code_nbytes(numel: int, bits: int) -> int:
    return 2 * numel if bits == 16 else packed_nbytes(numel, bits)


class ACGCCodec(ActivationCodec):
    """Per-layer (per-channel for norms) symmetric codes whose widths the ``ACGCMethod`` sets.

    State is keyed by ``SaveContext.layer``; unknown layers use ``initial_bits``. With ``exact``
    set (the method's measurement step) inputs are kept as they are.
    """

    name = "acgc"

    def __init__(self, initial_bits: int = INITIAL_BITS):
        self.initial_bits = container_bits(initial_bits)
        self.exact = False
        self.plans: dict[str, LayerPlan] = {}

    def describe(self) -> dict[str, Any]:
        return {"codec": self.name, "bits": None, "block_size": None}

    def plan_for(self, layer: Optional[str], channels: int) -> LayerPlan:
        plan = self.plans.get(layer or "")
        if plan is None:
            return LayerPlan(self.initial_bits)
        if plan.groups is not None and plan.channels != channels:
            return LayerPlan(plan.bits)  # a different shape than measured: widest width for all
        return plan

    def encode(self, x: torch.Tensor, ctx: Optional[SaveContext] = None) -> Packed:
        if self.exact or x.numel() == 0:
            return Packed(self, {"raw": x.detach()})  # detach: see RawCodec.encode
        xc = as_channels(x).float()
        channels, reduce_dims, _ = channel_layout(xc)
        plan = self.plan_for(ctx.layer if ctx else None, channels)
        scale = bf16_up(xc.abs().amax(dim=reduce_dims).clamp(min=TINY))
        tensors = {"scale": scale}
        scale_f = scale.float()
        if plan.groups is None:
            tensors["codes"] = _quantize(xc, scale_f, plan.bits)
            groups = None
        else:
            groups = plan.groups_on(x.device)
            for bits, idx in groups:
                tensors[f"codes{bits}"] = _quantize(xc.index_select(1, idx), scale_f[idx], bits)
        meta = {"shape": x.shape, "view_shape": tuple(xc.shape), "dtype": x.dtype,
                "channels_last": _is_channels_last(x), "bits": plan.bits, "groups": groups}
        return Packed(self, tensors, meta)

    def decode(self, packed: Packed) -> torch.Tensor:
        t, meta = packed.tensors, packed.meta
        if "raw" in t:
            return t["raw"]
        view_shape = meta["view_shape"]
        scale = t["scale"].float()
        if meta["groups"] is None:
            x = _dequantize(t["codes"], scale, meta["bits"], view_shape)
        else:
            x = torch.empty(view_shape, dtype=torch.float32, device=scale.device)
            for bits, idx in meta["groups"]:
                part_shape = (view_shape[0], idx.numel()) + tuple(view_shape[2:])
                x.index_copy_(1, idx, _dequantize(t[f"codes{bits}"], scale[idx], bits, part_shape))
        return _restore_format(x.reshape(meta["shape"]).to(meta["dtype"]), meta["channels_last"])

    def closed_form_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype,
                           ctx: Optional[SaveContext] = None) -> int:
        """Bytes ``encode`` keeps for this shape; the width depends on the layer (``ctx.layer``)."""
        numel = math.prod(shape)
        if numel == 0:
            return 0
        if self.exact:
            return numel * dtype.itemsize
        channels = channel_count(tuple(shape))
        plan = self.plan_for(ctx.layer if ctx else None, channels)
        if plan.groups is None:
            return _code_nbytes(numel, plan.bits) + 2 * channels
        per_channel = numel // channels
        return sum(_code_nbytes(per_channel * idx.numel(), bits) for bits, idx in plan.groups) + 2 * channels


def fan_in(module: nn.Module) -> int:
    """Input elements each output element meets per weight slice (see the module docstring)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        # Also right for transposed convs: each output element there meets at most
        # in_channels / groups * kernel-area input elements through one output channel's weights.
        return module.in_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return module.in_features
    raise TypeError(f"no fan-in for {type(module).__name__}")


class _LayerProbe:
    """The exact gradient statistics of one layer during a measurement step (device tensors)."""

    def __init__(self, module: nn.Module, kind: str):
        self.module = module
        self.kind = kind
        self.input_absmax: Optional[torch.Tensor] = None
        self.input_var: Optional[torch.Tensor] = None
        self.input_numel = 0
        self.out_grad_sq: Optional[torch.Tensor] = None
        self.weight_grad_sq: Optional[torch.Tensor] = None

    @staticmethod
    def _add(total: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
        return value if total is None else total + value

    def on_forward(self, module, args, output) -> None:
        if not (module.training and torch.is_grad_enabled()) or not args \
                or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        x = as_channels(args[0].detach()).float()
        _, reduce_dims, _ = channel_layout(x)
        self.input_numel = x.numel()
        if self.kind == "norm":
            absmax = x.abs().amax(dim=reduce_dims)
            self.input_var = x.var(dim=reduce_dims, unbiased=False)
        else:
            absmax = x.abs().amax()
        self.input_absmax = absmax if self.input_absmax is None else torch.maximum(self.input_absmax, absmax)
        if output.requires_grad:
            output.register_hook(self.on_output_grad)

    def on_output_grad(self, grad: torch.Tensor) -> None:
        g = as_channels(grad.detach()).float()
        if self.kind == "norm":
            _, reduce_dims, _ = channel_layout(g)
            self.out_grad_sq = self._add(self.out_grad_sq, g.square().sum(dim=reduce_dims))
        else:
            self.out_grad_sq = self._add(self.out_grad_sq, g.square().sum())

    def on_weight_grad(self, grad: torch.Tensor) -> None:
        self.weight_grad_sq = self._add(self.weight_grad_sq, grad.detach().float().square().sum())

    def complete(self) -> bool:
        return None not in (self.input_absmax, self.out_grad_sq, self.weight_grad_sq) \
            and (self.kind != "norm" or self.input_var is not None)

    def record(self) -> dict[str, torch.Tensor]:
        """The measurement as CPU tensors, as kept in the refresh history."""
        out = {"absmax": self.input_absmax.cpu(), "out_grad": self.out_grad_sq.sqrt().cpu(),
               "weight_grad": self.weight_grad_sq.sqrt().cpu()}
        if self.kind == "norm":
            eps = float(getattr(self.module, "eps", 1e-5))
            out["std"] = (self.input_var + eps).sqrt().cpu()
        return out


class ACGCMethod(CodecMethod):
    """AC-GC-like adaptive widths; see the module docstring for the schedule and the derivation."""
    cuda_graph_safe = False  # widths change between steps; a graph would keep the captured ones

    def __init__(self, refresh_every: int = 100, error_bound: float = 0.1, history: int = 10,
                 initial_bits: int = INITIAL_BITS, min_numel: int = 1024):
        if not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"method.refresh_every={refresh_every!r} is not allowed: use an integer >= 1")
        if not (isinstance(error_bound, (int, float)) and error_bound > 0):
            raise ValueError(f"method.error_bound={error_bound!r} is not allowed: use a number > 0")
        if not isinstance(history, int) or history < 1:
            raise ValueError(f"method.history={history!r} is not allowed: use an integer >= 1")
        super().__init__("acgc", ACGCCodec(initial_bits), min_numel=min_numel)
        self.refresh_every = refresh_every
        self.error_bound = float(error_bound)
        self.history = history
        self.refresh_steps: list[int] = []       # step counts (from 1) after which widths were set
        self._layers: dict[str, tuple[nn.Module, str]] = {}
        self._records: dict[str, deque] = {}
        self._required: dict[str, torch.Tensor] = {}
        self._input_numel: dict[str, int] = {}
        self._probes: dict[str, _LayerProbe] = {}
        self._handles: list = []
        self._next_step = 0                       # 0-based index of the step about to run

    # ------------------------------------------------------------------------------ lifecycle
    def attach(self, model: nn.Module, ledger: Optional[ByteLedger] = None) -> nn.Module:
        super().attach(model, ledger)
        self._layers = {name: (m, module_kind(m)) for name, m in model.named_modules()
                        if module_kind(m) in ACTIVATION_KINDS}
        self._next_step = 0
        if self._is_measurement_step(self._next_step):
            self._arm()
        return model

    def detach(self) -> None:
        self._disarm()
        super().detach()

    def after_step(self, model: nn.Module, step: int) -> None:
        """``step``: 0-based index of the step just taken (the runner's global step)."""
        if self._probes:
            probes = self._probes
            self._disarm()
            self._refresh(probes, step + 1)
        self._next_step = step + 1
        if self._is_measurement_step(self._next_step):
            self._arm()

    def _is_measurement_step(self, index: int) -> bool:
        return (index + 1) % self.refresh_every == 0

    # ----------------------------------------------------------------------------- measuring
    def _arm(self) -> None:
        """Keep the next step's activations exact and hook every layer to record its gradients."""
        self._disarm()
        self.codec.exact = True
        for name, (module, kind) in self._layers.items():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or not weight.requires_grad:
                continue  # no weight gradient to bound (e.g. a norm without affine parameters)
            probe = _LayerProbe(module, kind)
            self._probes[name] = probe
            self._handles.append(module.register_forward_hook(probe.on_forward))
            self._handles.append(weight.register_hook(probe.on_weight_grad))

    def _disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._probes = {}
        self.codec.exact = False

    # ------------------------------------------------------------------------------ refreshing
    def _refresh(self, probes: dict[str, _LayerProbe], completed_steps: int) -> None:
        for name, probe in probes.items():
            if not probe.complete():
                continue  # the layer did not run in that step
            record = probe.record()
            if not all(torch.isfinite(v).all() for v in record.values()):
                continue  # an overflowed (e.g. fp16-scaled) step says nothing about the bound
            self._records.setdefault(name, deque(maxlen=self.history)).append(record)
            self._input_numel[name] = probe.input_numel
            bits = self._required_bits(name, probe.module, probe.kind)
            self._required[name] = bits
            self.codec.plans[name] = LayerPlan.per_channel(bits.tolist()) if probe.kind == "norm" \
                else LayerPlan(container_bits(int(bits)))
        self.refresh_steps.append(completed_steps)
        log.info("acgc: widths refreshed after step %d: %.2f bits on average (eps=%g)",
                 completed_steps, self.average_bits(), self.error_bound)
        log.debug("acgc bits by layer: %s", self.bits_by_layer())

    def _required_bits(self, name: str, module: nn.Module, kind: str) -> torch.Tensor:
        """Bits from the averaged history of ``name`` (see the module docstring)."""
        records = self._records[name]
        mean = {key: torch.stack([r[key] for r in records]).mean(dim=0) for key in records[-1]}
        eps = self.error_bound
        if kind == "norm":
            channels = mean["absmax"].numel()
            numerator = mean["absmax"] * mean["out_grad"] * math.sqrt(channels / 12.0)
            denominator = eps * mean["weight_grad"] * mean["std"]
        else:
            numerator = mean["absmax"] * mean["out_grad"] * math.sqrt(fan_in(module) / 12.0)
            denominator = eps * mean["weight_grad"]
        ratio = numerator / denominator  # absmax / dx; a zero weight gradient asks for all the bits
        ratio = torch.where(numerator == 0, torch.zeros_like(ratio), ratio)  # nothing to resolve
        return required_bits(ratio)

    # --------------------------------------------------------------------------------- reading
    def bits_by_layer(self) -> dict[str, float]:
        """Stored width per layer (the channel mean for per-channel norm layers); 8 before any refresh."""
        return {name: (self.codec.plans[name].mean_bits() if name in self.codec.plans
                       else float(self.codec.initial_bits)) for name in self._layers}

    def required_bits_by_layer(self) -> dict[str, float]:
        """The bound's widths before rounding up to a container (channel mean for norm layers)."""
        return {name: float(bits.float().mean()) for name, bits in self._required.items()}

    def average_bits(self) -> float:
        """Stored bits per element over the compressed layers, weighted by each layer's input size."""
        weights = {name: n for name, n in self._input_numel.items() if n >= self.min_numel}
        if not weights:
            return float(self.codec.initial_bits)
        bits = self.bits_by_layer()
        return sum(bits[name] * n for name, n in weights.items()) / sum(weights.values())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "block_size": None, "bits": self.average_bits()}


def build_acgc(refresh_every: int = 100, error_bound: float = 0.1, history: int = 10, **_) -> TrainingMethod:
    return ACGCMethod(refresh_every=refresh_every, error_bound=error_bound, history=history)
