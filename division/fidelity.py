"""Gradient fidelity: how close a method's parameter gradients are to plain autograd's on one batch.

    report = gradient_fidelity(make_model, "division", images, labels, bits=2)
    report["overall_cosine"], report["layers"][0]   # {"name", "cosine", "rel_error", "numel"}

Both runs start from the same initial weights (``make_model`` is called twice under the same seed)
and see the same batch in train mode, so any difference comes from what was kept for backward.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .ledger import ByteLedger
from .methods import build_method


def parameter_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        step_context=None) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    if step_context is None:
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
    else:
        with step_context:
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare_gradients(got: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-parameter cosine similarity and relative error ||g - g*|| / ||g*||, plus the overall ones."""
    layers = []
    for name, ref in exact.items():
        g = got[name].flatten().double()
        r = ref.flatten().double()
        layers.append({"name": name, "numel": r.numel(),
                       "cosine": F.cosine_similarity(g, r, dim=0).item(),
                       "rel_error": ((g - r).norm() / r.norm().clamp_min(1e-30)).item()})
    g_all = torch.cat([got[n].flatten().double() for n in exact])
    r_all = torch.cat([exact[n].flatten().double() for n in exact])
    return {"overall_cosine": F.cosine_similarity(g_all, r_all, dim=0).item(),
            "overall_rel_error": ((g_all - r_all).norm() / r_all.norm().clamp_min(1e-30)).item(),
            "worst_cosine": min(layer["cosine"] for layer in layers),
            "layers": layers}


def gradient_fidelity(make_model: Callable[[], nn.Module], method: str, images: torch.Tensor,
                      labels: torch.Tensor, seed: int = 0, **knobs) -> dict[str, Any]:
    """Gradients of ``method`` (built with ``knobs``) against plain autograd's, same init and batch;
    ``ledger_ratio``: how many times fewer bytes than plain autograd the method kept for that step."""
    torch.manual_seed(seed)
    exact_model = make_model().to(images.device)
    torch.manual_seed(seed)
    model = make_model().to(images.device)
    model.load_state_dict(exact_model.state_dict())
    # both runs draw the same dropout / stochastic-depth masks; the codec's rounding has its own generator
    torch.manual_seed(seed + 1)
    exact = parameter_gradients(exact_model, images, labels)
    compressed = build_method(method, **knobs)
    ledger = ByteLedger()
    model = compressed.attach(model, ledger)
    torch.manual_seed(seed + 1)
    try:
        got = parameter_gradients(model, images, labels, compressed.step_context())
    finally:
        compressed.detach()
    return {"method": method, **knobs, "ledger_ratio": ledger.ratio, **compare_gradients(got, exact)}
