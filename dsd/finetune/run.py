"""``finetune(recipe)``: teacher, student and data from a recipe; distil; save the student; summarise."""
from __future__ import annotations

import json
import sys
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..convert import ConversionPlan
from ..errors import DsdError
from ..fileio import atomic_write_text, make_dirs, remove_empty_dirs
from ..calibration import recalibrate_batchnorm
from ..io import ModelSource, parse_source, plan_path_for, save_converted
from ..io.sources import check_trusted
from ..modes import check_class_scores, check_runs, eval_mode
from ..savings import compare
from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .data import build_loaders, check_data
from .distributed import init_distributed
from .engine import METRICS_NAME, evaluate, train
from .models import build_student, load_teacher
from .recipe import Recipe

__all__ = ["finetune", "FinetuneResult"]

STUDENT_NAME, SUMMARY_NAME = "student_dsd.safetensors", "summary.json"
OUTPUT_NAMES = (CHECKPOINT_NAME, METRICS_NAME, STUDENT_NAME, plan_path_for(STUDENT_NAME).name,
                SUMMARY_NAME)  # every file a run writes (TensorBoard's folder aside)


@dataclass
class FinetuneResult:
    teacher_acc: float
    student_acc_before: float
    student_acc_after: float
    student_acc_ema: Optional[float]
    teacher_params: int
    student_params: int
    teacher_flops: int
    student_flops: int
    converted_layers: int
    epochs: int
    ranks_agree: bool
    world_size: int
    history: List[Dict[str, Any]]
    run_dir: str

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def recipe_changes(saved: Dict[str, Any], current: Dict[str, Any], prefix: str = "") -> List[str]:
    """``key: old -> new`` for every recipe value that differs (nested sections by dotted keys)."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += recipe_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changes


def _resume_checkpoint(resume: str, recipe: Recipe, allow_recipe_change: bool) -> Dict[str, Any]:
    checkpoint = load_checkpoint(Path(resume))
    changes = recipe_changes(checkpoint.get("recipe") or {}, recipe.to_dict())
    if changes and not allow_recipe_change:
        raise DsdError(f"--resume {resume}: the recipe differs from the one the run started with ({'; '.join(changes)}); "
                       "resume with the same recipe, or pass --allow-recipe-change to continue with the new values")
    return checkpoint


def schedule_warnings(recipe: Recipe, checkpoint: Optional[Dict[str, Any]] = None) -> List[str]:
    """What the schedule will do that a user does not expect: all epochs in warm-up, or nothing left to train."""
    said = []
    s = recipe.schedule
    if s.warmup_epochs >= s.epochs:
        said.append(f"schedule.warmup_epochs={s.warmup_epochs:g} >= schedule.epochs={s.epochs}: the whole run is "
                    "learning-rate warm-up and never trains at optim.lr; set schedule.warmup_epochs below the epochs")
    if checkpoint is not None and checkpoint["epoch"] >= s.epochs:
        said.append(f"the resumed run already finished its {checkpoint['epoch']} epochs: nothing is left to train "
                    "(the outputs are written again from its last state); raise schedule.epochs with "
                    "--allow-recipe-change to train on")
    return said


def student_warnings(plan: ConversionPlan) -> List[str]:
    """What the student's plan does that fine-tuning does not undo."""
    if not plan.folded_batchnorm:
        return []
    return [f"student.plan folded {len(plan.folded_batchnorm)} BatchNorm layers into their convs (dsd-convert "
            "--fold-bn, an inference form): the student trains without them; to fine-tune, convert without --fold-bn "
            "and fold the fine-tuned model (dsd.fold_batchnorm)"]


def _check_teacher(teacher: torch.nn.Module, example: torch.Tensor) -> None:
    """The teacher runs on the data and gives class scores (distillation and accuracy need logits), or one line."""
    check_runs(teacher, example, "the teacher", "the data's images")
    with torch.no_grad(), eval_mode(teacher):
        check_class_scores(teacher(example), "the teacher", "dsd finetune distils classifiers")


def _refuse_taken_outputs(run_dir: Path) -> None:
    """A fresh run writes only into an output_dir where none of its files' names is taken (else: ``force``)."""
    if (run_dir / CHECKPOINT_NAME).exists():
        raise DsdError(f"output_dir {run_dir} already holds a run; pass --resume {run_dir} to continue it, "
                       "--force to start over, or --set output_dir=... for a new one")
    taken = [name for name in OUTPUT_NAMES if (run_dir / name).exists()]
    if taken:
        raise DsdError(f"output_dir {run_dir} already holds {', '.join(taken)}, which a run would overwrite; pass "
                       "--force to overwrite them, or --set output_dir=... for a new one")


def finetune(recipe: Recipe, resume: Optional[str] = None, stop_after_epoch: Optional[int] = None,
             progress: bool = True, force: bool = False, trust_code: bool = False, allow_recipe_change: bool = False,
             **train_kwargs) -> FinetuneResult:
    """Run a recipe on this process (or, under torchrun, on every rank). Writes into ``recipe.output_dir``:
    ``checkpoint.pt`` every epoch, ``metrics.jsonl``, ``student_dsd.safetensors`` + ``.plan.json``,
    ``summary.json``. A fresh run refuses an output_dir that holds a run, unless ``force``; ``resume``
    refuses a recipe that differs from the run's, unless ``allow_recipe_change``. A teacher source of the
    form ``package.module:factory`` runs your code: only with ``trust_code``."""
    for text, where in ((recipe.teacher.source, "teacher.source"), (recipe.teacher.arch, "teacher.arch")):
        if text:
            check_trusted(text, trust_code, f"the recipe's {where}")
    check_data(recipe.data)
    env = init_distributed(recipe.device)
    created: List[Path] = []  # the output folder and those above it that this run made
    try:
        checkpoint = _resume_checkpoint(resume, recipe, allow_recipe_change) if resume else None
        if env.is_main:
            for warning in schedule_warnings(recipe, checkpoint):
                print(f"dsd finetune: warning: {warning}", file=sys.stderr)
        _seed_everything(recipe.seed + env.rank)
        run_dir = Path(recipe.output_dir)
        if checkpoint is None and not force:
            _refuse_taken_outputs(run_dir)
        if env.is_main:
            try:
                created = make_dirs(run_dir)
            except OSError as error:
                raise DsdError(f"output_dir: cannot create {run_dir}: {error.strerror}") from error
        teacher = load_teacher(recipe.teacher, env, progress and env.is_main, trust_code)
        loaders = build_loaders(recipe.data, recipe.seed, env.world_size, env.rank, env.device.type == "cuda",
                                model=teacher)
        example = next(iter(loaders.val))[0][:1]
        _check_teacher(teacher, example)
        plan = ConversionPlan.from_dict(checkpoint["plan"]) if checkpoint and checkpoint.get("plan") else None
        student, plan = build_student(teacher, recipe, example, plan, calibration=loaders.train, env=env)
        if env.is_main and checkpoint is None:
            for warning in student_warnings(plan):
                print(f"dsd finetune: warning: {warning}", file=sys.stderr)
        teacher.to(env.device)
        teacher_acc = evaluate(teacher, loaders.val, env, recipe)
        if checkpoint is None:
            student.to(env.device)
            before = evaluate(student, loaders.val, env, recipe)
            recalibrate_batchnorm(student, (b for b, _ in loaders.train), recipe.bn_recalibration_batches, env.device)
        else:
            before = checkpoint.get("student_acc_before")
        result = train(student, loaders, recipe, env, run_dir, teacher=teacher,
                       feature_layers=[layer.name for layer in plan.layers], plan=plan, resume=checkpoint,
                       stop_after_epoch=stop_after_epoch, progress=progress, student_acc_before=before, **train_kwargs)
        student.cpu().eval()
        teacher.cpu()
        savings = compare(teacher, student, list(example.shape[1:]), latency=False)
        summary = FinetuneResult(
            teacher_acc, before, result.accuracy, result.ema_accuracy, savings.total.params_before,
            savings.total.params_after, savings.total.flops_before, savings.total.flops_after, len(plan.layers),
            len(result.history), result.ranks_agree, env.world_size, result.history, str(run_dir))
        if env.is_main:
            source = ModelSource(recipe.teacher.source, recipe.teacher.arch_kwargs)
            if parse_source(recipe.teacher.source).kind in ("file", "plan"):
                source = ModelSource(recipe.teacher.arch, recipe.teacher.arch_kwargs, recipe.teacher.source)
            save_converted(student, plan, run_dir / STUDENT_NAME, source)
            atomic_write_text(run_dir / SUMMARY_NAME, json.dumps(summary.to_dict(), indent=2) + "\n")
        return summary
    except BaseException:
        remove_empty_dirs(created)  # a run that wrote nothing leaves no folder behind
        raise
    finally:
        env.close()
