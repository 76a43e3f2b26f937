"""Swap modules in a model's module tree (the conversion pass rewrites with it; sequential calibration too), and
copy a model whose convs are about to be replaced without copying their weights.

The model keeps its own class and methods (timm's ``forward_features``, ``reset_classifier``...);
only the chosen children are replaced, under every name they are registered as, so a shared module
stays shared.
"""
from __future__ import annotations

import copy
from typing import Dict, Tuple

import torch.nn as nn

__all__ = ["swap_modules", "copy_sharing_convs", "own_parameters"]


def swap_modules(model: nn.Module, replacements: Dict[str, nn.Module]) -> nn.Module:
    """Replace ``model.get_submodule(name)`` by ``new`` for each item, wherever that module appears."""
    by_id = {id(model.get_submodule(name)): new for name, new in replacements.items()}
    slots = [(parent, child_name, by_id[id(child)])
             for _, parent in model.named_modules(remove_duplicate=False)
             # _modules, not named_children(): that skips a second alias of one child in the same parent
             for child_name, child in parent._modules.items() if child is not None and id(child) in by_id]
    for parent, child_name, new in slots:
        setattr(parent, child_name, new)
    return model


def copy_sharing_convs(model: nn.Module) -> Tuple[nn.Module, Dict[int, nn.Parameter]]:
    """``copy.deepcopy(model)``, except that every ``nn.Conv2d``'s parameters stay the original's own objects.

    Most of a CNN's weights are in convs a conversion replaces, so copying them only to drop them costs more
    than half the copy (resnet18). Returns the copy and the shared parameters (by id): nothing may write to them
    in place, and :func:`own_parameters` gives the copy its own of those it still holds.
    """
    shared = {id(p): p for module in model.modules() if isinstance(module, nn.Conv2d) for p in module.parameters()}
    return copy.deepcopy(model, dict(shared)), shared


def own_parameters(model: nn.Module, shared: Dict[int, nn.Parameter]) -> None:
    """Replace each parameter of ``model`` that is in ``shared`` by a copy (one per shared parameter: ties stay
    tied), as ``copy.deepcopy`` would have made it."""
    copies: Dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and id(param) in shared:
                if id(param) not in copies:
                    copies[id(param)] = copy.deepcopy(param)
                module._parameters[name] = copies[id(param)]
