"""Swap modules in a model's module tree (the conversion pass rewrites with it; sequential calibration too).

The model keeps its own class and methods (timm's ``forward_features``, ``reset_classifier``...);
only the chosen children are replaced, under every name they are registered as, so a shared module
stays shared.
"""
from __future__ import annotations

from typing import Dict

import torch.nn as nn

__all__ = ["swap_modules"]


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
