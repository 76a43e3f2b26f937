"""Fold inference BatchNorm into the conv before it: ``fold_batchnorm(model)``.

Matching and rewriting are kept apart, as in torch.ao's FX passes: :func:`find_foldable` traces the model
with the pass's tracer and finds every eval-mode BatchNorm whose only input is a conv whose only user it
is; :func:`apply_folding` rewrites those pairs (into the pointwise conv of a separable layer). Parts that
do not trace are searched child by child; what still does not trace is left as it is and listed.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
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
    """Every (conv, BatchNorm) pair where the norm's only input is the conv and the conv's only user the norm."""
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
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = model.get_submodule(node.target)
        source = node.args[0] if node.args else None
        if _foldable_norm(module) and calls[node.target] == 1 \
                and getattr(source, "op", None) == "call_module" and calls[source.target] == 1 \
                and len(source.users) == 1 and _foldable_conv(model.get_submodule(source.target)):
            plan.pairs.append((prefix + source.target, prefix + node.target))
        elif next(module.children(), None) is not None and not _foldable_conv(module):
            plan.add(find_foldable(module, f"{prefix}{node.target}."))  # a leaf module of the tracer
    return plan


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
