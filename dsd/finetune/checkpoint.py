"""Training checkpoints: everything needed to resume exactly, written atomically, loaded without pickle."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..errors import DsdError
from ..fileio import atomic_path

__all__ = ["capture_rng", "restore_rng", "save_checkpoint", "load_checkpoint", "first_non_finite", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"


def capture_rng() -> Dict[str, Any]:
    """RNG states as tensors and plain values, so the checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def first_non_finite(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    return next((name for name, value in state_dict.items()
                 if value.is_floating_point() and not torch.isfinite(value).all()), None)


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise DsdError(f"--resume {path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DsdError(f"{path} is not a readable dsd training checkpoint: {type(error).__name__}") from error
