"""Building the run's parts from the composed config: device, model, data, method, autocast."""
from __future__ import annotations

import contextlib
import os
import random
from typing import Optional

import torch
from omegaconf import OmegaConf

import division
from data import build_datasets, build_loaders
from models import MODEL_INFO, MODEL_NAMES, build_model as _build_model

from . import distributed
from .checks import ConfigError
from .compiling import compile_mode

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(cfg) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """A script's command line split at ``--``: its own arguments, then main.py's overrides."""
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device (stochastic rounding has its own generator)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def method_knobs(cfg) -> dict:
    knobs = OmegaConf.to_container(cfg.method, resolve=True)
    knobs.pop("name")
    return knobs


def build_method(cfg) -> division.TrainingMethod:
    """The configured method; its stochastic rounding draws from a generator of its own, seeded with
    ``seed`` (+ rank under torchrun), never from torch's global one."""
    return division.build_method(cfg.method.name, **{"seed": int(cfg.seed) + distributed.rank(), **method_knobs(cfg)})


def method_record_fields(method: division.TrainingMethod) -> dict:
    """B and Q as the method ended the run (adaptive methods such as ACGC choose bits as they go)."""
    described = method.describe()
    fields = {"block_size": described["block_size"], "bits": described["bits"]}
    compiled = getattr(method, "compiled_coverage", None)
    if compiled is not None and compiled.fraction is not None:
        # compiled: the share of plain autograd's saved bytes inside layers that compress compiled
        fields["ledger_coverage"] = compiled.fraction
    return fields


def dataset_kwargs(cfg) -> dict:
    kwargs = OmegaConf.to_container(cfg.dataset, resolve=True)
    kwargs.pop("name")
    for key in kwargs:  # "???" (no default, e.g. dataset=lmdb's root): None, which the data sets name as unset
        if OmegaConf.is_missing(cfg.dataset, key):
            kwargs[key] = None
    kwargs.setdefault("seed", int(cfg.seed))
    if kwargs.get("num_workers") == "auto":
        kwargs["num_workers"] = auto_workers()
    return kwargs


AUTO_WORKERS_MAX = 8


def auto_workers() -> int:
    """``dataset.num_workers=auto``: one DataLoader worker per core this process may use, at most
    AUTO_WORKERS_MAX (more rarely helps decoding, and PyTorch warns when workers outnumber cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return min(cores, AUTO_WORKERS_MAX)


def build_data(cfg, device: torch.device):
    """(train_loader, val_loader, info) for the configured dataset; this rank's shard under DDP."""
    kwargs = dataset_kwargs(cfg)
    train_ds, val_ds, info = build_datasets(cfg.dataset.name, **kwargs)
    train_loader, val_loader = build_loaders(
        train_ds, val_ds, batch_size=int(cfg.batch_size), num_workers=int(kwargs.get("num_workers", 0)),
        device=device, on_device=kwargs.get("on_device", "auto"), seed=int(cfg.seed),
        channels_last=bool(cfg.channels_last), rank=distributed.rank(), world_size=distributed.world_size())
    return train_loader, val_loader, info


def torchvision_models() -> list[str]:
    """The classification models torchvision builds by name (detection, segmentation, video excluded)."""
    import torchvision
    return torchvision.models.list_models(module=torchvision.models)


def check_model(cfg) -> None:
    """ConfigError, naming the key and the fix, unless ``model.name`` names a model this run can build."""
    name = cfg.model.name
    if cfg.model.get("_target_"):
        return  # a class or function given by its import path: instantiate says what is wrong with it
    if cfg.model.get("source") == "torchvision":
        known = torchvision_models()
        if name not in known:
            raise ConfigError(f"model.name={name!r} is not a torchvision classification model: use one of "
                              f"{', '.join(known)}")
    elif name not in MODEL_INFO:
        raise ConfigError(f"model.name={name!r} is not allowed: use one of {', '.join(MODEL_NAMES)} (model=NAME), "
                          f"or any torchvision classification model with model=torchvision model.name={name}")


def build_model(cfg, num_classes: int, device: torch.device, image_size: Optional[int] = None) -> torch.nn.Module:
    """The configured model for ``image_size`` inputs (default: ``dataset.image_size``, else the model's
    own). A model whose input size is fixed when it is built (a Vision Transformer's position embedding)
    is built for that size where its builder takes one (torchvision's ``vit_*``), and refused with a
    ``ConfigError`` where it cannot take it."""
    check_model(cfg)
    size = input_size(cfg, image_size)
    if cfg.model.get("_target_"):  # model.name=... +model._target_=torchvision.models.mobilenet_v3_small
        from hydra.utils import instantiate
        knobs = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                 if k not in ("name", "source", "image_size")}
        model = instantiate(knobs, num_classes=num_classes).to(device)
    elif cfg.model.get("source") == "torchvision":
        import torchvision
        model = torchvision.models.get_model(cfg.model.name, weights=None, num_classes=num_classes,
                                             **torchvision_size_kwargs(cfg.model.name, size)).to(device)
    else:
        model = _build_model(cfg.model.name, num_classes=num_classes).to(device)
    check_input_size(model, cfg.model.name, size)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def input_size(cfg, image_size: Optional[int] = None) -> int:
    """The side of the images the model will be fed: ``image_size``, else ``dataset.image_size``, else
    the size the model was designed for."""
    if image_size is not None:
        return int(image_size)
    configured = cfg.dataset.get("image_size")
    return int(configured) if configured is not None else model_image_size(cfg)


def torchvision_size_kwargs(name: str, image_size: int) -> dict:
    """Builder arguments that fix a torchvision model's input size: ``vit_*`` (``vit_b_16``: 16x16
    patches) builds its position embedding for ``image_size``, which must be a multiple of the patch."""
    if not name.startswith("vit_"):
        return {}
    tail = name.rsplit("_", 1)[1]
    patch = int(tail) if tail.isdigit() else 1
    if image_size % patch:
        raise ConfigError(f"dataset.image_size={image_size} is not allowed: model {name} cuts images into "
                          f"{patch}x{patch} patches; use a multiple of {patch} (224 as designed)")
    return {"image_size": image_size}


def check_input_size(model: torch.nn.Module, name: str, image_size: int) -> None:
    """ConfigError when ``model`` was built for one input size (a Vision Transformer) other than ``image_size``."""
    from torchvision.models import VisionTransformer
    if isinstance(model, VisionTransformer) and model.image_size != image_size:
        raise ConfigError(f"dataset.image_size={image_size} is not allowed: model {name} takes "
                          f"{model.image_size}x{model.image_size} images only (its position embedding is "
                          f"built for that size); use dataset.image_size={model.image_size}")


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The ``train.optimizer`` with the ``train.*`` settings: mode=train trains with it, memory and speed
    measure it. ``sgd``: SGD (``train.momentum``, ``train.nesterov``), every parameter decayed.
    ``adamw``: AdamW (betas 0.9 / 0.999); as usual for transformers, ``train.weight_decay`` applies to
    the weight matrices and kernels only, not to biases and norm scales (1-D parameters)."""
    train = cfg.train
    if train.get("optimizer", "sgd") == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": train.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr, betas=(0.9, 0.999))
    return torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                           weight_decay=train.weight_decay, nesterov=train.nesterov)


def build_scaler(cfg, device: torch.device) -> torch.amp.GradScaler:
    """fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not (then it is a no-op)."""
    return torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")


def model_image_size(cfg) -> int:
    """The input size the model was designed for."""
    check_model(cfg)
    if cfg.model.get("source") == "torchvision" or cfg.model.get("_target_"):
        return int(cfg.model.get("image_size", 224))
    return MODEL_INFO[cfg.model.name]["image_size"]


def forward_loss(model, images: torch.Tensor, target: torch.Tensor, cfg, device: torch.device,
                 cache_enabled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss) of one training forward pass: the model under ``autocast``, cross-entropy in
    fp32. Every training step (mode=train, memory, speed, CUDA-graph capture) computes it here."""
    if compile_mode(cfg) == "reduce-overhead" and device.type == "cuda":
        # a new training iteration for torch.compile's CUDA graphs: the last step's outputs may be
        # overwritten (the step's own logits are read before the next call)
        torch.compiler.cudagraph_mark_step_begin()
    with autocast(cfg, device, cache_enabled=cache_enabled):
        logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
    return logits, loss


def autocast(cfg, device: torch.device, cache_enabled: bool = True):
    """Autocast for bf16/fp16 (the same for every method in a comparison); nothing for fp32.

    ``cache_enabled=False`` for steps captured in a CUDA graph: the cache would hand the graph
    weight copies made outside it.
    """
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[cfg.precision],
                          cache_enabled=cache_enabled)
