"""Checkpoint state: everything needed to continue a run exactly where it stopped.

A checkpoint holds model, optimizer, scheduler and objective state, the epoch/step
counters, best-val bookkeeping, the per-modality head counts (AUG grows the model, so the
architecture must be rebuilt before weights load) and the RNG states.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmbalance.layout import STATE_FILE


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state.pt`` atomically (a crash mid-write never leaves a torn checkpoint)."""
    path = Path(directory) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint state")
    return torch.load(path, map_location="cpu", weights_only=False)
