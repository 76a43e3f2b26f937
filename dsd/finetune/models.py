"""Teacher and student for a recipe: the original model, and its converted copy (or a saved plan)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Optional, Tuple

import torch
import torch.nn as nn

from .. import zoo
from ..convert import ConversionPlan, apply_plan, convert_model
from ..fileio import atomic_path
from ..io import load_converted, load_model, parse_source
from ..layers.create import DATA_INIT
from ..module_tree import deepcopy_module
from .data import build_loaders
from .distributed import DistEnv, broadcast_module, from_main_rank
from .recipe import Recipe, TeacherConfig

__all__ = ["load_teacher", "build_student", "train_builtin"]


def train_builtin(name: str, env: DistEnv, progress: bool = True) -> Path:
    """Train a built-in ``dsd:NAME`` model from scratch on the digits data and cache its weights."""
    from safetensors.torch import save_model
    from .engine import train

    if name not in zoo.MODELS:
        raise ValueError(f"no training recipe for built-in model {name!r}")
    recipe = Recipe()
    recipe.optim.lr, recipe.schedule.epochs, recipe.tensorboard = 3e-3, 12, False
    torch.manual_seed(recipe.seed)
    model = zoo.build(name)
    single = DistEnv(device=env.device)  # one process trains it, the others wait and load it
    with tempfile.TemporaryDirectory() as run_dir:
        train(model, build_loaders(recipe.data, recipe.seed), recipe, single, Path(run_dir), progress=progress)
    path = zoo.cached_weights(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_model(model.cpu(), str(tmp))
    return path


def load_teacher(cfg: TeacherConfig, env: DistEnv, progress: bool = True, trust_code: bool = False) -> nn.Module:
    ref = parse_source(cfg.source)
    if ref.kind == "dsd" and cfg.pretrained:
        name = ref.name
        if not zoo.cached_weights(name).is_file():
            def train_once() -> None:  # the other ranks wait for it, and fail with it
                if progress:
                    print(f"training the built-in teacher dsd:{name} once (cached in {zoo.cache_dir()})")
                train_builtin(name, env, progress)
            from_main_rank(train_once, env)
    model, _ = load_model(cfg.source, cfg.arch, cfg.arch_kwargs, cfg.pretrained, trust_code=trust_code)
    return model.eval()


def build_student(teacher: nn.Module, recipe: Recipe, example: torch.Tensor, plan: Optional[ConversionPlan] = None,
                  calibration: Optional[Iterable] = None, env: Optional[DistEnv] = None
                  ) -> Tuple[nn.Module, ConversionPlan]:
    """The converted student: from a resumed checkpoint's plan, the recipe's plan file, or converted now
    (``calibration``: batches for ``init: data`` and ``recalibrate_bn``).

    Converted now under torchrun (``env``), rank 0 converts and every rank gets its plan and weights: the ranks a
    budget picks depend on each rank's calibration shard and, with ``target_latency`` or ``only_if_faster``, on
    its timings, and DDP needs one architecture on every rank."""
    if plan is not None:
        return apply_plan(deepcopy_module(teacher), plan), plan
    if recipe.student.plan:
        return load_converted(recipe.student.plan, deepcopy_module(teacher)), ConversionPlan.load(recipe.student.plan)
    options = recipe.student.convert
    needs_data = options.init == DATA_INIT or options.recalibrate_bn
    converted = {}

    def convert() -> dict:
        converted["student"], report = convert_model(teacher, example, options,
                                                     calibration_data=calibration if needs_data else None)
        return report.plan.to_dict()
    env = env or DistEnv()
    plan = ConversionPlan.from_dict(from_main_rank(convert, env))
    student = converted["student"] if "student" in converted else apply_plan(deepcopy_module(teacher), plan)
    return (broadcast_module(student, env) if env.distributed else student), plan
