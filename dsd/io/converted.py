"""A converted model on disk: ``<stem>.safetensors`` (weights) + ``<stem>.plan.json`` (plan and source).

Reloading needs no pickle: the plan says how to build the original architecture and which layers to
swap; safetensors fills the weights.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..convert.pipeline import apply_plan
from ..convert.plan import ConversionPlan
from ..errors import DsdError
from ..fileio import OutputSet
from .sources import PLAN_SUFFIX, ModelSource, build_arch, load_into, parse_source, read_safetensors

__all__ = ["save_converted", "write_converted", "load_converted", "plan_path_for"]

PathLike = Union[str, os.PathLike]


def plan_path_for(weights_path: PathLike) -> Path:
    weights_path = Path(weights_path)
    return weights_path.with_name(weights_path.name[:-len(weights_path.suffix)] + PLAN_SUFFIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_converted(model: nn.Module, plan: ConversionPlan, outputs: OutputSet, weights_path: Path,
                    source: Optional[ModelSource] = None) -> None:
    """Stage the weights and the plan (which names the weights and their SHA-256) in ``outputs``."""
    from safetensors.torch import save_model
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DsdError(f"the converted model's {name} holds NaN or inf values; nothing was written")
    weights_file = outputs.path(weights_path)
    save_model(model, str(weights_file))
    plan.source = {**(source.to_dict() if source else {}), "converted_weights": weights_path.name,
                   "weights_sha256": _sha256(weights_file)}
    outputs.path(plan_path_for(weights_path)).write_text(plan.to_json() + "\n")


def save_converted(model: nn.Module, plan: ConversionPlan, weights_path: PathLike,
                   source: Optional[ModelSource] = None, *, arch: Optional[str] = None,
                   arch_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[Path, Path]:
    """Write the weights (safetensors) and the plan together: the plan, which names the weights' SHA-256,
    is moved into place last, so a reader never takes weights for a plan they do not belong to.

    ``arch`` (``timm:NAME``, ...) and ``arch_kwargs`` record how to build the original, so that
    :func:`load_converted` needs nothing else; without them it needs ``model=``."""
    if arch is not None:
        parse_source(arch)  # refuse a malformed name now, not when loading
        source = ModelSource(arch, dict(arch_kwargs or {}))
    weights_path = Path(weights_path)
    if weights_path.suffix != ".safetensors":
        raise DsdError(f"{weights_path}: the converted weights are written as .safetensors; name the output *.safetensors")
    plan_path = plan_path_for(weights_path)
    with OutputSet([weights_path, plan_path], force=True) as outputs:
        write_converted(model, plan, outputs, weights_path, source)
        outputs.commit()
    return weights_path, plan_path


def load_converted(plan_path: PathLike, model: Optional[nn.Module] = None, trust_code: bool = False) -> nn.Module:
    """Rebuild a converted model from its plan (or its ``.safetensors`` weights, the plan beside them).

    ``model``: a fresh original, where the plan cannot build one (the original came from a pickled module).
    A plan whose architecture is ``package.module:factory`` imports and runs that code: only with
    ``trust_code=True``; ``timm:``, ``torchvision:`` and ``dsd:`` architectures are always safe to load."""
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
    name = source.get("converted_weights", plan_path.name[:-len(PLAN_SUFFIX)] + ".safetensors")
    if not isinstance(name, str) or Path(name).name != name:
        raise DsdError(f"{plan_path}: source.converted_weights must be a file name beside the plan, got {name!r}")
    weights = plan_path.parent / name
    if not weights.is_file():
        raise DsdError(f"{weights}: the converted weights named by {plan_path} are missing")
    if source.get("weights_sha256") and _sha256(weights) != source["weights_sha256"]:
        raise DsdError(f"{weights} is not the weights file {plan_path} was written with (its SHA-256 differs: "
                       "an interrupted or concurrent run?); convert again")
    apply_plan(model, plan)
    load_into(model, read_safetensors(weights), weights, f"the model rebuilt from {plan_path}")
    return model.eval()
