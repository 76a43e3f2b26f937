"""Swap modules in a model's module tree (the conversion pass rewrites with it; sequential calibration too), and
copy a model whose convs are about to be replaced without copying their weights.

The model keeps its own class and methods (timm's ``forward_features``, ``reset_classifier``...);
only the chosen children are replaced, under every name they are registered as, so a shared module
stays shared.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

__all__ = ["swap_modules", "copy_sharing_convs", "deepcopy_module", "own_parameters", "unwrap",
           "refresh_recomputed_weights"]


def unwrap(model: nn.Module) -> Tuple[nn.Module, Optional[str]]:
    """The model inside a ``torch.compile``, DDP or DataParallel wrapper (wrapped in any order), and the outermost
    wrapper's name (None for a model that is not wrapped). Known wrapper types only: a model of the user's own may
    well have a child called ``module``."""
    from torch._dynamo.eval_frame import OptimizedModule

    wrapper = None
    while True:
        if isinstance(model, OptimizedModule):
            inner = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        else:
            return model, wrapper
        wrapper = wrapper or type(model).__name__
        model = inner


def swap_modules(model: nn.Module, replacements: Dict[str, nn.Module]) -> nn.Module:
    """Replace ``model.get_submodule(name)`` by ``new`` for each item, wherever that module appears; ``new`` takes
    over the module's forward hooks and pre-hooks, as torch.ao's ``swap_module`` does (a user's feature or
    Grad-CAM hook keeps firing on the layer's output)."""
    by_id = {}
    for name, new in replacements.items():
        old = model.get_submodule(name)
        if id(old) not in by_id and old is not new:
            _carry_forward_hooks(old, new)
        by_id[id(old)] = new
    slots = [(parent, child_name, by_id[id(child)])
             for _, parent in model.named_modules(remove_duplicate=False)
             # _modules, not named_children(): that skips a second alias of one child in the same parent
             for child_name, child in parent._modules.items() if child is not None and id(child) in by_id]
    for parent, child_name, new in slots:
        setattr(parent, child_name, new)
    return model


def refresh_recomputed_weights(model: nn.Module) -> None:
    """Recompute each weight that the deprecated ``torch.nn.utils.weight_norm`` / ``spectral_norm`` keep as a plain
    attribute, as their pre-hook does before every call (without a power iteration): until a module is called
    again, that attribute is stale (the value from before a ``load_state_dict``, a ``.double()``, a meta run)."""
    with torch.no_grad():
        for module in model.modules():
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, WeightNorm):
                    setattr(module, hook.name, hook.compute_weight(module))
                elif isinstance(hook, SpectralNorm):
                    setattr(module, hook.name, hook.compute_weight(module, do_power_iteration=False))


def _carry_forward_hooks(old: nn.Module, new: nn.Module) -> None:
    for key, hook in old._forward_pre_hooks.items():
        if not isinstance(hook, (WeightNorm, SpectralNorm)):  # they recompute a weight the new module does not have
            new.register_forward_pre_hook(hook, with_kwargs=key in old._forward_pre_hooks_with_kwargs)
    for key, hook in old._forward_hooks.items():
        new.register_forward_hook(hook, with_kwargs=key in old._forward_hooks_with_kwargs,
                                  always_call=key in old._forward_hooks_always_called)


def copy_sharing_convs(model: nn.Module) -> Tuple[nn.Module, Dict[int, nn.Parameter]]:
    """``copy.deepcopy(model)``, except that every ``nn.Conv2d``'s parameters stay the original's own objects.

    Most of a CNN's weights are in convs a conversion replaces, so copying them only to drop them costs more
    than half the copy (resnet18). Returns the copy and the shared parameters (by id): nothing may write to them
    in place, and :func:`own_parameters` gives the copy its own of those it still holds.
    """
    shared = {id(p): p for module in model.modules() if isinstance(module, nn.Conv2d) for p in module.parameters()}
    return deepcopy_module(model, dict(shared)), shared


_ATOMIC = (bool, int, float, str, type(None))
_CONTAINERS = (dict, OrderedDict, set)


# ``__setstate__`` methods that only fill in attributes an old pickle lacks (a live module has them all)
_BACKFILLING_SETSTATE = (nn.Module.__setstate__, nn.modules.conv._ConvNd.__setstate__)


def _copies_as_a_plain_module(cls: type) -> bool:
    """Whether ``copy.deepcopy`` copies instances of ``cls`` as it copies any ``nn.Module``: no copy or pickle
    protocol of its own (the convs' ``__setstate__`` adds nothing to a live module's state)."""
    return (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and cls.__getstate__ is nn.Module.__getstate__
            and cls.__setstate__ in _BACKFILLING_SETSTATE)


def _in_autograd_graph(value: Any) -> bool:
    """A tensor ``copy.deepcopy`` refuses: the weight the deprecated ``torch.nn.utils.weight_norm`` recomputes
    before every call is one. A copy of its value serves as well."""
    return isinstance(value, torch.Tensor) and not value.is_leaf


def _copy_training_flags(original: nn.Module, copied: nn.Module) -> None:
    """A ``GraphModule``'s deepcopy rebuilds it through ``__init__``: the copy of an eval-mode torchvision feature
    extractor (timm's ``feature_cls="fx"`` too) came back in training mode, its BatchNorm on batch statistics."""
    copied.train(original.training)  # torchvision's DualGraphModule picks its graph here
    copies = dict(copied.named_modules())
    for name, module in original.named_modules():
        if name in copies:
            copies[name].training = module.training


def deepcopy_module(module: nn.Module, memo: Optional[Dict[int, Any]] = None) -> nn.Module:
    """``copy.deepcopy(module, memo)``, about twice as fast on a module tree.

    ``deepcopy`` reconstructs each module through its pickle protocol, a dozen empty hook dicts included
    (resnet18: 5,000 calls). For a module whose class keeps the default protocol the state is copied here
    directly: children recursively, parameters and buffers one by one, empty containers and plain values made
    or kept as they are, everything else by ``deepcopy`` with the same ``memo`` (so sharing and ties are kept).
    Any other module is left to ``deepcopy``.
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if not _copies_as_a_plain_module(cls):
        for sub in module.modules():
            for value in vars(sub).values():
                if _in_autograd_graph(value):
                    memo.setdefault(id(value), value.detach().clone())
        copied = copy.deepcopy(module, memo)
        _copy_training_flags(module, copied)
        return copied
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        kind = type(value)
        if kind in _ATOMIC or (kind is tuple and all(type(v) in _ATOMIC for v in value)):  # deepcopy keeps them
            pass
        elif key == "_modules":
            value = kind((name, child if child is None else deepcopy_module(child, memo))
                         for name, child in value.items())
        elif key in ("_parameters", "_buffers"):
            value = kind((name, copy.deepcopy(tensor, memo)) for name, tensor in value.items())
        elif kind in _CONTAINERS and not value:  # one new container per original, as deepcopy shares it
            value = memo.setdefault(id(value), kind())
        elif _in_autograd_graph(value):
            value = value.detach().clone()
        else:
            value = copy.deepcopy(value, memo)
        state[key] = value
    new.__dict__.update(state)
    return new


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
