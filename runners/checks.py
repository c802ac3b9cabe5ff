"""Validation of the composed config before any work starts: one clear message per bad value.

One schema (``RULES``) types every key a job reads: a value of the wrong type (``seed=abc``,
``seed=1.5``, ``method.bits=2.0``, ``channels_last=maybe``) or out of range (``train.lr=-0.1``,
``dataset.image_size=0``) is refused, never coerced. Keys that no config file defines
(``+method.bit=4``) are refused too, naming the nearest real key. Every message has the shape
``KEY=VALUE is not allowed: WHAT IS``; main.py prints it as ``configuration error: ...`` and exits 2.

Output locations are checked here as well (``check_outputs``): the run directory and the results
store must be writable before training starts, and a fresh run never writes into a directory that
holds another run's results.
"""
from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf

from division.methods import valid_attention_bits, valid_prefetch_ahead, valid_side_stream
from division.packing import SUPPORTED_BITS

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SEED_MAX = 2**32 - 1  # numpy's seed range
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and what is allowed."""


class OutputError(ConfigError):
    """An output location (run directory, results store) that cannot be written or is taken."""


def show(value) -> str:
    """A value as it is typed on the command line: true / false / null, strings quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else repr(value)


def _fail(key: str, value, allowed: str) -> None:
    raise ConfigError(f"{key}={show(value)} is not allowed: {allowed}")


# ------------------------------------------------------------------------------------ value types
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


Rule = tuple[Callable[[Any], bool], str]


def integer(low: Optional[int] = None, high: Optional[int] = None, null: bool = False) -> Rule:
    if low is not None and high is not None:
        text = f"an integer from {low} to {high}"
    else:
        text = "an integer" + (f" >= {low}" if low is not None else "")
    return (lambda v: (null and v is None) or (_is_int(v) and (low is None or v >= low)
                                               and (high is None or v <= high)),
            "use " + ("null or " if null else "") + text)


def number(low: float, strict: bool) -> Rule:
    op = ">" if strict else ">="
    return (lambda v: _is_number(v) and (v > low if strict else v >= low), f"use a number {op} {low:g}")


def boolean() -> Rule:
    return (lambda v: isinstance(v, bool), "use true or false")


def choice(*options, null: bool = False) -> Rule:
    listed = ", ".join(map(str, options[:-1])) + f" or {options[-1]}" if len(options) > 1 else str(options[0])
    return (lambda v: (null and v is None) or (isinstance(v, str) and v in options),
            "use " + ("null, " if null else "") + listed)


def text(null: bool = False) -> Rule:
    return (lambda v: (null and v is None) or (isinstance(v, (str, int)) and not isinstance(v, bool) and str(v) != ""),
            "use " + ("null or " if null else "") + "a non-empty name")


def bits_rule() -> Rule:
    return (lambda v: v is None or (_is_int(v) and v in SUPPORTED_BITS),
            f"use one of {', '.join(map(str, SUPPORTED_BITS))}")


def string_list(options: Optional[tuple[str, ...]] = None) -> Rule:
    def ok(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v) and \
            (options is None or all(x in options for x in v))
    return ok, "use a list of " + (f"names from {', '.join(options)}" if options else "names")


RULES: dict[str, Rule] = {
    "batch_size": integer(1),
    "device": choice("auto", "cpu", "cuda"),
    "precision": choice("fp32", "bf16", "fp16"),
    "channels_last": boolean(),
    "cuda_graph": boolean(),
    "seed": integer(0, SEED_MAX),
    "resume": boolean(),
    "results_dir": text(),
    "group": text(null=True),
    "train.epochs": integer(1),
    "train.optimizer": choice("sgd", "adamw"),
    "train.lr": number(0, strict=True),
    "train.momentum": number(0, strict=False),
    "train.weight_decay": number(0, strict=False),
    "train.nesterov": boolean(),
    "train.warmup_epochs": integer(0),
    "train.max_steps_per_epoch": integer(1, null=True),
    "train.eval_every": integer(1),
    "train.log_every": integer(0),
    "train.progress": boolean(),
    "train.sync_bn": boolean(),
    "memory.steps": integer(1),
    "memory.find_max_batch": boolean(),
    "memory.max_batch_limit": integer(1),
    "speed.warmup": integer(0),
    "speed.steps": integer(1),
    "speed.queue": text(null=True),
    "speed.queue_size": integer(1),
    "speed.queue_timeout": integer(1),
    "report.group": text(null=True),
    "report.where": (lambda v: v is None or isinstance(v, str), "use null or a filter expression"),
    "report.formats": string_list(("md", "csv", "png", "html")),
    "model.name": text(),
    "dataset.name": text(),
    "dataset.root": text(null=True),
    "dataset.num_classes": integer(1, null=True),
    "dataset.image_size": integer(1, null=True),
    "dataset.train_size": integer(1),
    "dataset.val_size": integer(1),
    "dataset.num_workers": (lambda v: v == "auto" or (_is_int(v) and v >= 0),
                            "use auto (one per core, at most 8) or an integer >= 0"),
    "dataset.on_device": (lambda v: isinstance(v, bool) or v == "auto", "use auto, true or false"),
    "dataset.download": boolean(),
    "dataset.transforms": choice("cifar", "imagenet", null=True),
    "dataset.format": choice("imagefolder", "folder", "lmdb"),
    "method.name": text(),
    "method.bits": bits_rule(),
    "method.block_size": integer(1, null=True),
    "method.rounding": choice("stochastic", "nearest"),
    "method.keep_lfc": boolean(),
    "method.keep_hfc": boolean(),
    "method.simulate": boolean(),
    "method.relu_zeros": boolean(),
    "method.norm_from_codes": boolean(),
    "method.rebuild_conv_input": boolean(),
    "method.recompute_norm_input": boolean(),
    "method.fused_norm": boolean(),
    "method.side_stream": (valid_side_stream, "use auto, true or false"),
    "method.prefetch_decode": (valid_side_stream, "use auto, true or false"),
    "method.prefetch_ahead": (valid_prefetch_ahead, "use an integer >= 1"),
    "method.attention_bits": (valid_attention_bits, "use 0 (exact) or one of "
                              + ", ".join(map(str, SUPPORTED_BITS))),
    "method.probability_bits": (valid_attention_bits, "use 0 (exact) or one of "
                                + ", ".join(map(str, SUPPORTED_BITS))),
    "method.backend": choice("auto", "torch", "triton"),
    "method.group_size": integer(1),
    "method.refresh_every": integer(1),
    "method.error_bound": number(0, strict=True),
    "method.history": integer(1),
    "method.segments": integer(1),
    "logger.name": text(),
    "logger.mode": choice("offline", "online", "disabled"),
    "logger.project": text(),
    "logger.entity": text(null=True),
    "logger.tags": (lambda v: isinstance(v, list), "use a list of tags, e.g. [a,b]"),
    "logger.init_timeout": number(0, strict=True),
    "compile": (lambda v: isinstance(v, bool) or v in COMPILE_MODES,
                "use true, false or a torch.compile mode: " + ", ".join(COMPILE_MODES)),
    "report.include_errors": boolean(),
    "mode.run_name": text(),
    "model._target_": text(),  # any builder taking num_classes, by import path (+model._target_=...)
}


# ------------------------------------------------------------------------------------ known keys
def _yaml_keys(path: Path) -> set[str]:
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - a file Hydra could not compose never reaches a job
        return set()
    return {k for k in data if k != "defaults"} if isinstance(data, dict) else set()


def known_keys(conf_dir: Path = CONF_DIR) -> dict[str, Optional[set[str]]]:
    """Top-level key -> its known sub-keys (None for a plain value).

    A config group's keys are the union over its options (``method.segments`` is a key, whichever
    method is chosen, since an experiment preset may set keys for an option the user then swaps);
    the other sections come from config.yaml; the schema adds keys the files leave out.
    """
    base = OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml"), resolve=False)
    keys: dict[str, Optional[set[str]]] = {}
    for key, value in base.items():
        if key in ("defaults", "hydra"):
            continue
        keys[key] = set(value) if isinstance(value, dict) else None
    for group in sorted(p for p in conf_dir.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment")):
        sub = keys.setdefault(group.name, set()) or set()
        for option in group.glob("*.yaml"):
            sub |= _yaml_keys(option)
        keys[group.name] = sub
    for dotted in RULES:
        top, _, rest = dotted.partition(".")
        if rest:
            sub = keys.get(top) or set()
            sub.add(rest)
            keys[top] = sub
        else:
            keys.setdefault(top, None)
    return keys


def _check_known(values: dict, keys: dict[str, Optional[set[str]]]) -> None:
    every = [k for k, sub in keys.items() if sub is None] + \
        [f"{k}.{s}" for k, sub in keys.items() if sub for s in sub]
    for key, value in values.items():
        if key not in keys:
            _unknown(key, value, every, list(keys))
        sub = keys[key]
        if sub is not None and isinstance(value, dict):
            for inner, inner_value in value.items():
                if inner not in sub:
                    _unknown(f"{key}.{inner}", inner_value, every, sorted(f"{key}.{s}" for s in sub))


def _unknown(key: str, value, every: list[str], siblings: list[str]) -> None:
    while isinstance(value, dict) and len(value) == 1:  # +trian.lr=1 arrives as trian: {lr: 1}
        inner, value = next(iter(value.items()))
        key = f"{key}.{inner}"
    near = difflib.get_close_matches(key, every, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]}?" if near else f"known keys here: {', '.join(sorted(siblings))}"
    raise ConfigError(f"{key}={show(value)} is not allowed: {key} is not a configuration key; {hint}")


def _flat(values: dict, prefix: str = ""):
    for key, value in values.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and full.count(".") == 0:
            yield from _flat(value, full + ".")
        else:
            yield full, value


# ------------------------------------------------------------------------------------ validate
def validate(cfg) -> None:
    """Raise ``ConfigError`` for the first bad key or value of ``cfg`` (a composed job config)."""
    values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    values.pop("hydra", None)
    _check_known(values, known_keys())
    for key, value in _flat(values):
        if value == "???":  # no default (dataset=lmdb's root): the data set names it when it is read
            continue
        rule = RULES.get(key)
        if rule is not None and not rule[0](value):
            _fail(key, value, rule[1])
    _check_combinations(cfg, values)


def _check_combinations(cfg, values: dict) -> None:
    """Values fine on their own that cannot go together, or cannot run on this machine."""
    device = values.get("device")
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        _fail("device", device, "CUDA is not available on this machine; use device=cpu or device=auto")
    train = values.get("train") or {}
    if train.get("nesterov") and train.get("momentum", 0) <= 0:
        _fail("train.nesterov", True, "Nesterov momentum needs train.momentum > 0")
    method = values.get("method") or {}
    if method.get("backend") == "triton" and not on_cuda:
        _fail("method.backend", "triton", "the fused kernels need CUDA; use auto or torch on this machine")
    mode = (values.get("mode") or {}).get("name")
    if values.get("cuda_graph") and mode in ("train", "speed"):
        if not on_cuda:
            _fail("cuda_graph", True, "a CUDA graph needs a CUDA device (this run is on the CPU); "
                                      "drop cuda_graph=true or run with device=cuda")
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            _fail("cuda_graph", True, "single-process only (DDP's all-reduce is not captured)")
        if mode == "train" and not _method_graph_safe(cfg):  # speed times such methods eagerly
            _fail("cuda_graph", True, f"method={method.get('name')} cannot be captured in a CUDA graph; "
                                      "use none, division, blpa or actnn, or drop cuda_graph=true")
    if mode == "report":
        return
    try:  # the method's own checks (and any knob combination it refuses)
        _build_method(cfg)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"method={method.get('name')} with {_knobs_text(method)} is not allowed: {exc}") from None


def _build_method(cfg):
    from .build import build_method
    return build_method(cfg)


def _method_graph_safe(cfg) -> bool:
    try:
        return bool(_build_method(cfg).cuda_graph_safe)
    except Exception:  # noqa: BLE001 - the method's own check reports what is wrong with it
        return True


def _knobs_text(method: dict) -> str:
    return " ".join(f"method.{k}={v}" for k, v in method.items() if k != "name")


# ------------------------------------------------------------------------------------ outputs
def check_writable(path: Path, key: str) -> None:
    """Create ``path`` (a folder) if needed and prove it writable with a probe file."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe.{os.getpid()}"
        with open(probe, "wb") as handle:
            handle.write(b"ok")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"{key}={show(str(path))} is not allowed: {path.resolve()} is not writable ({reason}); "
                          f"make it writable (chmod u+w) or set {key}= to a folder you can write") from None


def check_outputs(run_dir: Path, results_dir: Path, resume: bool) -> None:
    """Before any work: every output location is writable, and a new run takes no other run's folder."""
    run_dir = Path(run_dir)
    check_writable(run_dir, "hydra.run.dir")
    check_writable(results_dir, "results_dir")
    if not resume:
        taken = [name for name in ("results.json", "checkpoint.pt") if (run_dir / name).exists()]
        if taken:
            raise OutputError(
                f"hydra.run.dir={show(str(run_dir))} is not allowed: it already holds another run "
                f"({', '.join(taken)}), which a new run would overwrite; leave hydra.run.dir to its "
                f"default (a new folder per run), choose a new one, or add resume=true to continue that run")
