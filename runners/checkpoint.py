"""Atomic checkpoints and RNG state capture, so that a resumed run replays exactly."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from .record import atomic_write


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically: a run killed while saving keeps its previous checkpoint whole."""
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load on the CPU (RNG states must stay CPU tensors); load_state_dict moves weights to the model.

    weights_only=False: the file holds RNG states (numpy arrays, tuples) written by this project.
    """
    return torch.load(path, map_location="cpu", weights_only=False)
