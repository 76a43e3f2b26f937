"""Fold inference BatchNorm into the conv before it: ``fold_batchnorm(model)``.

Matching and rewriting are kept apart, as in torch.ao's FX passes: :func:`find_foldable` traces the model
with the pass's tracer and finds every eval-mode BatchNorm whose only input is a conv whose only user it
is, on every call; :func:`apply_folding` rewrites those pairs (into the pointwise conv of a separable layer).
Parts that do not trace are searched child by child; what still does not trace is left as it is and listed.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..layers.separable import DepthwiseSeparableConv2d
from ..module_tree import deepcopy_module, swap_modules
from .trace import trace_graph

__all__ = ["FoldPlan", "find_foldable", "apply_folding", "fold_batchnorm"]

Pair = Tuple[str, str]  # (conv name, norm name)


def _foldable_conv(module: nn.Module) -> bool:
    from timm.layers import Conv2dSame  # same weights and bias as nn.Conv2d, dynamic padding only
    return type(module) in (nn.Conv2d, Conv2dSame, DepthwiseSeparableConv2d)


def _foldable_norm(module: nn.Module) -> bool:
    """An inference BatchNorm: one in eval mode with running statistics, or a frozen one (timm's
    ``freeze_batch_norm_2d``, torchvision's pretrained detection backbones)."""
    from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct
    from torchvision.ops import FrozenBatchNorm2d

    if type(module) in (FrozenBatchNorm2d, FrozenBatchNormAct2d):
        return True
    return (type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm, BatchNormAct2d, SyncBatchNormAct) and not module.training
            and module.track_running_stats and module.running_mean is not None)


@dataclass
class FoldPlan:
    pairs: List[Pair] = field(default_factory=list)
    untraced: List[str] = field(default_factory=list)  # modules left as they are (name, '' for the model)

    def add(self, other: "FoldPlan") -> None:
        self.pairs += other.pairs
        self.untraced += other.untraced


def find_foldable(model: nn.Module, prefix: str = "") -> FoldPlan:
    """Every (conv, BatchNorm) pair where each call of the norm takes the output of a call of the conv, which
    nothing else uses (a block called twice folds once: its conv and norm run together on every call)."""
    plan = FoldPlan()
    try:
        graph = trace_graph(model)
    except Exception:  # data-dependent control flow: look inside each child instead
        children = list(model.named_children())
        if not children:
            plan.untraced.append(prefix.rstrip("."))
        for name, child in children:
            plan.add(find_foldable(child, f"{prefix}{name}."))
        return plan
    calls: Dict[str, List[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target].append(node)
    for target, nodes in calls.items():
        module = model.get_submodule(target)
        if _foldable_norm(module):
            conv = _only_source(nodes, calls)
            if conv is not None and _foldable_conv(model.get_submodule(conv)):
                plan.pairs.append((prefix + conv, prefix + target))
        elif next(module.children(), None) is not None and not _foldable_conv(module):
            plan.add(find_foldable(module, f"{prefix}{target}."))  # a leaf module of the tracer
    return plan


def _only_source(norm_calls: List[fx.Node], calls: Dict[str, List[fx.Node]]) -> Optional[str]:
    """The module whose calls are, one for one, the inputs of ``norm_calls`` and used by nothing else; else None."""
    sources = [node.args[0] if node.args else None for node in norm_calls]
    targets = {getattr(source, "target", None) for source in sources}
    if len(targets) != 1 or any(getattr(source, "op", None) != "call_module" for source in sources):
        return None
    target = targets.pop()
    if len(set(sources)) != len(sources) or set(calls[target]) != set(sources) \
            or any(len(source.users) != 1 for source in sources):
        return None
    return target


def _norm_replacement(norm: nn.Module) -> nn.Module:
    """What stays of a folded norm: nothing, or the dropout and activation of timm's BatchNormAct2d (and its
    frozen and synchronised kinds)."""
    kept = [getattr(norm, name) for name in ("drop", "act") if hasattr(norm, name)]
    return nn.Sequential(*kept) if kept else nn.Identity()


@torch.no_grad()
def apply_folding(model: nn.Module, pairs: Sequence[Pair], with_statistics: bool = True) -> nn.Module:
    """Fold each pair in place. ``with_statistics=False`` only reshapes the model as folding would (a bias
    where the conv had none, the norm removed), for loading weights saved after folding."""
    replacements: Dict[str, nn.Module] = {}
    for conv_name, norm_name in pairs:
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        target = conv.pointwise if isinstance(conv, DepthwiseSeparableConv2d) else conv
        if with_statistics:
            weight, bias = fuse_conv_bn_weights(target.weight, target.bias, norm.running_mean, norm.running_var,
                                                norm.eps, norm.weight, norm.bias)
            target.weight, target.bias = weight, bias
        elif target.bias is None:
            target.bias = nn.Parameter(torch.zeros(target.out_channels, dtype=target.weight.dtype,
                                                   device=target.weight.device))
        replacements[norm_name] = _norm_replacement(norm)
    return swap_modules(model, replacements)


@torch.inference_mode(False)
def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a conv (dense or separable) into that conv.

    The outputs stay those of the unfolded model in eval mode (within float rounding); the model is copied
    unless ``inplace``. ``find_foldable(model)`` tells which pairs this folds and what could not be traced.
    Under ``torch.inference_mode`` too, the weights it makes are ordinary tensors: a separable layer keeps its
    weights' layouts only where their version counters tell it when they change.
    """
    model = model if inplace else deepcopy_module(model)
    return apply_folding(model, find_foldable(model).pairs)
