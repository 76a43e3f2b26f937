"""A converted model on disk: ``<stem>.safetensors`` (weights) + ``<stem>.plan.json`` (plan and source).

Reloading needs no pickle: the plan says how to build the original architecture and which layers to
swap; safetensors fills the weights.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch.nn as nn

from ..convert.pipeline import apply_plan
from ..convert.plan import ConversionPlan
from ..errors import DsdError
from ..fileio import atomic_path
from .sources import PLAN_SUFFIX, ModelSource, build_arch

__all__ = ["save_converted", "load_converted", "plan_path_for"]

PathLike = Union[str, os.PathLike]


def plan_path_for(weights_path: PathLike) -> Path:
    weights_path = Path(weights_path)
    return weights_path.with_name(weights_path.name[:-len(weights_path.suffix)] + PLAN_SUFFIX)


def save_converted(model: nn.Module, plan: ConversionPlan, weights_path: PathLike,
                   source: Optional[ModelSource] = None) -> Tuple[Path, Path]:
    """Write the weights (safetensors) then the plan, each atomically; return both paths."""
    from safetensors.torch import save_model
    weights_path = Path(weights_path)
    if weights_path.suffix != ".safetensors":
        raise DsdError(f"{weights_path}: the converted weights are written as .safetensors; name the output *.safetensors")
    plan_path = plan_path_for(weights_path)
    plan.source = {**(source.to_dict() if source else {}), "converted_weights": weights_path.name}
    with atomic_path(weights_path) as tmp:
        save_model(model, str(tmp))
    plan.save(plan_path)
    return weights_path, plan_path


def load_converted(plan_path: PathLike, model: Optional[nn.Module] = None, trust_code: bool = False) -> nn.Module:
    """Rebuild a converted model from its plan (or its ``.safetensors`` weights, the plan beside them).

    ``model``: a fresh original, where the plan cannot build one (the original came from a pickled module).
    A plan whose architecture is ``package.module:factory`` imports and runs that code: only with
    ``trust_code=True``; ``timm:``, ``torchvision:`` and ``dsd:`` architectures are always safe to load."""
    from safetensors.torch import load_model
    plan_path = Path(plan_path)
    if plan_path.suffix == ".safetensors":
        plan_path = plan_path_for(plan_path)
    if not plan_path.is_file():
        raise DsdError(f"{plan_path}: no such plan file")
    plan = ConversionPlan.load(plan_path)
    source = plan.source if isinstance(plan.source, dict) else {}
    if model is None:
        if not source.get("arch"):
            raise DsdError(f"{plan_path} does not say how to build the original model (it came from a pickled "
                           "module or an in-memory model); pass a fresh instance (model=...) or convert with --arch")
        kwargs = source.get("arch_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise DsdError(f"{plan_path}: source.arch_kwargs must be a mapping, got {kwargs!r}")
        model = build_arch(source["arch"], False, trust_code, where=f"the plan {plan_path}", **kwargs)
    weights = plan_path.parent / source.get("converted_weights", plan_path.name[:-len(PLAN_SUFFIX)] + ".safetensors")
    if not weights.is_file():
        raise DsdError(f"{weights}: the converted weights named by {plan_path} are missing")
    apply_plan(model, plan)
    try:
        load_model(model, str(weights), strict=True)
    except RuntimeError as error:
        raise DsdError(f"{weights} does not fit the model rebuilt from {plan_path}: {str(error).splitlines()[0]}") from error
    return model.eval()
