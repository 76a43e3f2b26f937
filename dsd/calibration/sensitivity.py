"""How far a change of each layer's output moves the model's outputs, measured on calibration data.

First order, a change ``d`` of layer l's output moves the model's outputs by ``J_l d``. With random
output probes ``v ~ N(0, I)``, ``g = J_l' v`` has ``E ||g||^2 = ||J_l||_F^2`` (Hutchinson's estimator, the
trace that HAWQ-v2 allocates quantisation bits by): one backward pass per probe gives every layer's
``||J_l||_F^2`` at once. Taking ``J_l' J_l`` as isotropic, ``E ||J_l d||^2 ~= mean(g^2) ||d||^2``: a layer's
squared output error, weighted by its sensitivity, predicts its share of the model's squared output error.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from ..layers.forms import static_forms
from ..modes import eval_mode, floating_outputs
from .batches import Batch, samples_in, to_device

__all__ = ["output_sensitivity"]


@static_forms()
def output_sensitivity(model: nn.Module, names: Iterable[str], batches: Sequence[Batch],
                       probes: int = 1, seed: int = 0) -> Optional[Dict[str, float]]:
    """``name -> mean squared output gradient per element of the layer's output``, relative to the model's
    mean squared output per sample: multiplied by a change's squared norm per sample, the predicted relative
    squared change of the model's outputs. ``None`` where the model's outputs do not depend differentiably
    on the layers (integer or detached outputs)."""
    names = list(names)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    captured: Dict[str, list] = {name: [] for name in names}
    zero = torch.zeros((), device=device, requires_grad=True)  # makes every layer output a graph node

    def hook(name):
        def capture(module, args, output):
            output = output + zero.to(output.dtype)
            captured[name].append(output)
            return output
        return capture

    gradient = {name: 0.0 for name in names}
    elements = {name: 0 for name in names}
    output_energy, samples = 0.0, 0
    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        with torch.enable_grad(), eval_mode(model):
            for batch in batches:
                batch = to_device(batch, device)
                for values in captured.values():
                    values.clear()
                outputs = [t for t in floating_outputs(model(batch)) if t.requires_grad]
                layers = [(name, y) for name, ys in captured.items() for y in ys]
                if not outputs or not layers:
                    return None
                output_energy += sum(float(o.detach().double().square().sum()) for o in outputs)
                samples += samples_in(batch)
                for name, y in layers:
                    elements[name] += y.numel()
                for probe in range(probes):
                    directions = [torch.randn(o.shape, generator=generator).to(o) for o in outputs]
                    grads = torch.autograd.grad(sum((o * v).sum() for o, v in zip(outputs, directions)),
                                                [y for _, y in layers], retain_graph=probe < probes - 1,
                                                allow_unused=True)
                    for (name, _), g in zip(layers, grads):
                        if g is not None:
                            gradient[name] += float(g.double().square().sum()) / probes
    finally:
        for handle in handles:
            handle.remove()
        for values in captured.values():
            values.clear()
    if not output_energy:
        return None
    per_sample = output_energy / samples
    return {name: gradient[name] / max(elements[name], 1) / per_sample for name in names}
