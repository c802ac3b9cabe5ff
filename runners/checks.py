"""Validation of the composed config before any work starts: one clear message per bad value."""
from __future__ import annotations

import torch

from division.methods import valid_prefetch_ahead, valid_side_stream
from division.packing import SUPPORTED_BITS


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and what is allowed."""


def _fail(key: str, value, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def validate(cfg) -> None:
    method = cfg.method
    if method.get("bits") is not None and method.bits not in SUPPORTED_BITS:
        _fail("method.bits", method.bits, f"use one of {', '.join(map(str, SUPPORTED_BITS))}")
    block = method.get("block_size")
    if block is not None and (not isinstance(block, int) or block < 1):
        _fail("method.block_size", block, "use an integer >= 1")
    for knob in ("side_stream", "prefetch_decode"):
        if knob in method and not valid_side_stream(method[knob]):
            _fail(f"method.{knob}", method[knob], "use auto, true or false")
    if "prefetch_ahead" in method and not valid_prefetch_ahead(method.prefetch_ahead):
        _fail("method.prefetch_ahead", method.prefetch_ahead, "use an integer >= 1")
    for knob in ("relu_zeros", "norm_from_codes"):
        if knob in method and not isinstance(method[knob], bool):
            _fail(f"method.{knob}", method[knob], "use true or false")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        _fail("batch_size", cfg.batch_size, "use an integer >= 1")
    if cfg.device not in ("auto", "cpu", "cuda"):
        _fail("device", cfg.device, "use auto, cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        _fail("device", cfg.device, "CUDA is not available on this machine; use device=cpu or device=auto")
    if not isinstance(cfg.get("cuda_graph", False), bool):
        _fail("cuda_graph", cfg.cuda_graph, "use true or false")
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        _fail("precision", cfg.precision, "use fp32, bf16 or fp16")
    if cfg.logger.get("mode") not in ("offline", "online", "disabled"):
        _fail("logger.mode", cfg.logger.get("mode"), "use offline, online or disabled")
    train = cfg.train
    if train.epochs < 1:
        _fail("train.epochs", train.epochs, "use an integer >= 1")
    if train.eval_every < 1:  # the epoch loop takes it modulo
        _fail("train.eval_every", train.eval_every, "use an integer >= 1 (evaluate every N epochs)")
    if train.max_steps_per_epoch is not None and train.max_steps_per_epoch < 1:
        _fail("train.max_steps_per_epoch", train.max_steps_per_epoch, "use null (full epochs) or an integer >= 1")
    for key in ("warmup", "steps"):
        if cfg.speed[key] < (0 if key == "warmup" else 1):
            _fail(f"speed.{key}", cfg.speed[key], "use a non-negative integer (steps: >= 1)")
    if cfg.memory.steps < 1:
        _fail("memory.steps", cfg.memory.steps, "use an integer >= 1")
