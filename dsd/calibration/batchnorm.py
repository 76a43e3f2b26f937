"""BatchNorm re-estimation: fresh running statistics from real batches, nothing else touched."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from ..layers.forms import static_forms
from .batches import model_inputs, to_device

__all__ = ["recalibrate_batchnorm"]


@torch.no_grad()
@static_forms()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, num_batches: int, device=None) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as a cumulative average over
    ``num_batches`` batches in train mode; weights, biases and other modules' modes are unchanged.
    Returns the number of batches used."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or num_batches <= 0:
        return 0
    saved = {m: (m.momentum, m.training) for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    used = 0
    try:
        for batch in batches:
            if used >= num_batches:
                break
            inputs = model_inputs(batch)
            model(to_device(inputs, device) if device is not None else inputs)
            used += 1
    finally:
        for m, (momentum, training) in saved.items():
            m.momentum, m.training = momentum, training
    return used
