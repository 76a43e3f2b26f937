"""The training loop: distillation from a frozen teacher into the converted student.

``train`` is the generic loop (no teacher = plain supervised training); ``finetune`` builds teacher,
student and data from a recipe, runs ``train`` and saves the fine-tuned student as plan + safetensors.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..convert import ConversionPlan
from ..errors import DsdError
from ..fileio import atomic_write_text
from ..layers.forms import static_forms
from .checkpoint import CHECKPOINT_NAME, capture_rng, first_non_finite, restore_rng, save_checkpoint
from .data import Loaders
from .distributed import DistEnv, all_equal, all_reduce_sum
from .losses import FeatureTaps, distillation_loss
from .recipe import Recipe

__all__ = ["train", "evaluate", "TrainingDiverged", "TrainState", "TrainResult", "METRICS_NAME"]

METRICS_NAME = "metrics.jsonl"  # one JSON record per epoch

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class TrainingDiverged(DsdError):
    pass


@dataclass
class TrainState:
    """What a checkpoint restores."""
    epoch: int = 0  # epochs completed
    history: List[Dict[str, Any]] = field(default_factory=list)
    student_acc_before: Optional[float] = None


@dataclass
class TrainResult:
    accuracy: float
    ema_accuracy: Optional[float]
    history: List[Dict[str, Any]]
    ranks_agree: bool
    checkpoint: Path


@torch.no_grad()
@static_forms()
def evaluate(model: nn.Module, loader, env: DistEnv, recipe: Recipe) -> float:
    """Top-1 accuracy on the loader, summed over every rank."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=env.device)
    with _autocast(recipe, env):
        for images, labels in loader:
            images, labels = _to_device(images, env, recipe), labels.to(env.device)
            counts[0] += (model(images).argmax(-1) == labels).sum()
            counts[1] += labels.numel()
    all_reduce_sum(counts, env)
    model.train(was_training)
    return (counts[0] / counts[1]).item()


def _autocast(recipe: Recipe, env: DistEnv):
    if recipe.precision.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=AMP_DTYPES[recipe.precision.amp])


def _to_device(images: torch.Tensor, env: DistEnv, recipe: Recipe) -> torch.Tensor:
    images = images.to(env.device, non_blocking=True)
    if recipe.precision.channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def _optimizer_and_scheduler(model: nn.Module, recipe: Recipe, steps_per_epoch: int):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    o, s = recipe.optim, recipe.schedule
    kwargs = {"momentum": o.momentum} if o.name == "sgd" else {}
    optimizer = create_optimizer_v2(model, opt=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                    filter_bias_and_bn=True, **kwargs)  # no weight decay on norms and biases
    total = max(1, s.epochs * steps_per_epoch)
    scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=s.min_lr,
                                  warmup_t=int(s.warmup_epochs * steps_per_epoch), warmup_lr_init=o.lr * 0.01,
                                  warmup_prefix=True, t_in_epochs=False)
    return optimizer, scheduler


def _checksum(model: nn.Module) -> torch.Tensor:
    return torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).cpu()


@dataclass
class _Parts:
    """What one training run carries from step to step."""
    model: nn.Module  # the student, or its DDP wrapper
    optimizer: Any
    scheduler: Any
    scaler: Any
    ema: Any
    student_taps: Optional[FeatureTaps]
    teacher_taps: Optional[FeatureTaps]


def _setup(student: nn.Module, teacher: Optional[nn.Module], loaders: Loaders, recipe: Recipe, env: DistEnv,
           feature_layers: Optional[List[str]], resume: Optional[Dict[str, Any]],
           student_acc_before: Optional[float]) -> Tuple[_Parts, TrainState]:
    """Devices, optimiser, schedule, scaler, EMA and feature taps; restored from ``resume`` when given."""
    from timm.utils import ModelEmaV3

    student.to(env.device)
    if recipe.precision.channels_last:
        student.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(env.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    optimizer, scheduler = _optimizer_and_scheduler(student, recipe, len(loaders.train))
    scaler = torch.amp.GradScaler(env.device.type, enabled=recipe.precision.amp == "float16"
                                  and env.device.type == "cuda")
    ema = ModelEmaV3(student, decay=recipe.ema.decay) if recipe.ema.enabled else None
    state = TrainState(student_acc_before=student_acc_before)
    if resume is not None:
        student.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        if ema is not None and resume.get("ema") is not None:
            ema.load_state_dict(resume["ema"])
        state = TrainState(resume["epoch"], resume["history"], resume.get("student_acc_before"))
        restore_rng(resume["rng"])
    model = DistributedDataParallel(student, device_ids=[env.device] if env.device.type == "cuda" else None) \
        if env.distributed else student
    student_taps = FeatureTaps(student, feature_layers or []) if recipe.loss.feature_weight > 0 else None
    teacher_taps = FeatureTaps(teacher, feature_layers or []) if student_taps and teacher is not None else None
    return _Parts(model, optimizer, scheduler, scaler, ema, student_taps, teacher_taps), state


def _teacher_outputs(teacher: nn.Module, images: torch.Tensor, parts: _Parts, recipe: Recipe, env: DistEnv):
    with torch.inference_mode(), _autocast(recipe, env):
        with (parts.teacher_taps.capture() if parts.teacher_taps else contextlib.nullcontext([])) as features:
            logits = teacher(images)
    # inference tensors cannot be saved for backward: plain copies for the loss
    return logits.clone(), [f.clone() for f in features]


def _train_epoch(epoch: int, student: nn.Module, teacher: Optional[nn.Module], loaders: Loaders, recipe: Recipe,
                 env: DistEnv, parts: _Parts, loss_fn: Callable, checkpoint_path: Path, progress: bool) -> torch.Tensor:
    """One pass over the training data; returns (loss sum, images), summed over every rank."""
    loaders.train_sampler.set_epoch(epoch)
    parts.model.train()
    steps = len(loaders.train)
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)  # loss sum, images
    start = time.perf_counter()
    bar = tqdm(loaders.train, desc=f"epoch {epoch + 1}/{recipe.schedule.epochs}", unit="batch",
               disable=not (progress and env.is_main), leave=False)
    for step, (images, labels) in enumerate(bar):
        images, labels = _to_device(images, env, recipe), labels.to(env.device)
        teacher_logits, teacher_features = (_teacher_outputs(teacher, images, parts, recipe, env)
                                            if teacher is not None else (None, []))
        with _autocast(recipe, env):
            with (parts.student_taps.capture() if parts.student_taps else contextlib.nullcontext([])) as s_feats:
                logits = parts.model(images)
        terms = loss_fn(logits.float(), labels, recipe.loss, None if teacher_logits is None else
                        teacher_logits.float(), [f.float() for f in s_feats], [f.float() for f in teacher_features])
        _stop_if_diverged(terms.total, epoch, step, checkpoint_path, env)
        _optimizer_step(terms.total, student, recipe, parts, epoch * steps + step + 1)
        totals += torch.tensor([terms.total.item() * labels.numel(), labels.numel()], dtype=torch.float64,
                               device=env.device)
        if env.is_main and progress:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{terms.total.item():.4f}", lr=f"{parts.optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{totals[1].item() * env.world_size / max(elapsed, 1e-9):.0f}")
    return all_reduce_sum(totals, env)


def _diverged(what: str, checkpoint_path: Path) -> TrainingDiverged:
    where = (f"the last good checkpoint is {checkpoint_path}" if checkpoint_path.exists()
             else "no checkpoint was written yet")
    return TrainingDiverged(f"{what}; {where}. Lower optim.lr or set optim.clip_grad")


def _stop_if_diverged(loss: torch.Tensor, epoch: int, step: int, checkpoint_path: Path, env: DistEnv) -> None:
    finite = torch.isfinite(loss.detach()).to(torch.float64).reshape(1)
    if all_reduce_sum(finite, env).item() < env.world_size:
        raise _diverged(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; training stopped",
                        checkpoint_path)


def _optimizer_step(loss: torch.Tensor, student: nn.Module, recipe: Recipe, parts: _Parts, global_step: int) -> None:
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    if recipe.optim.clip_grad:
        parts.scaler.unscale_(parts.optimizer)
        nn.utils.clip_grad_norm_(student.parameters(), recipe.optim.clip_grad)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.scheduler.step_update(global_step)
    if parts.ema is not None:
        parts.ema.update(student, step=global_step)


def _end_epoch(epoch: int, seconds: float, totals: torch.Tensor, student: nn.Module, loaders: Loaders,
               recipe: Recipe, env: DistEnv, parts: _Parts, state: TrainState, plan: Optional[ConversionPlan],
               run_dir: Path, writer, progress: bool) -> None:
    """Validate, record the epoch, write the checkpoint and the metrics (on the main process).

    Parameters and buffers are checked first: a non-finite tensor is never saved."""
    bad = first_non_finite(student.state_dict()) or (
        first_non_finite(parts.ema.state_dict()) if parts.ema is not None else None)
    if bad:
        raise _diverged(f"training diverged in epoch {epoch + 1}: {bad} became NaN or inf; nothing of this epoch "
                        "was saved", run_dir / CHECKPOINT_NAME)
    record = {"epoch": epoch + 1, "train_loss": (totals[0] / totals[1]).item(),
              "val_acc": evaluate(student, loaders.val, env, recipe),
              "lr": parts.optimizer.param_groups[0]["lr"], "seconds": seconds,
              "images_per_s": totals[1].item() / seconds}
    if parts.ema is not None:
        record["val_acc_ema"] = evaluate(parts.ema.module, loaders.val, env, recipe)
    state.history.append(record)
    state.epoch = epoch + 1
    if not env.is_main:
        return
    save_checkpoint(run_dir / CHECKPOINT_NAME, {
        "epoch": state.epoch, "history": state.history, "student_acc_before": state.student_acc_before,
        "model": student.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
        "ema": parts.ema.state_dict() if parts.ema is not None else None, "rng": capture_rng(),
        "recipe": recipe.to_dict(), "plan": plan.to_dict() if plan is not None else None})
    # the whole history, replaced atomically: always the checkpoint's epochs, and a run started over with --force
    # replaces the earlier run's metrics only once it has an epoch of its own
    atomic_write_text(run_dir / METRICS_NAME, "".join(json.dumps(r) + "\n" for r in state.history))
    if writer is not None:
        for key, value in record.items():
            if key != "epoch":
                writer.add_scalar(key, value, record["epoch"])
    if progress:
        tqdm.write(f"epoch {record['epoch']}: loss {record['train_loss']:.4f}, val acc {record['val_acc']:.4f}"
                   + (f" (ema {record['val_acc_ema']:.4f})" if parts.ema is not None else ""))


@static_forms()
def train(
        student: nn.Module,
        loaders: Loaders,
        recipe: Recipe,
        env: DistEnv,
        run_dir: Path,
        teacher: Optional[nn.Module] = None,
        feature_layers: Optional[List[str]] = None,
        plan: Optional[ConversionPlan] = None,
        resume: Optional[Dict[str, Any]] = None,
        stop_after_epoch: Optional[int] = None,
        progress: bool = True,
        loss_fn: Callable = distillation_loss,
        student_acc_before: Optional[float] = None,
) -> TrainResult:
    """Train ``student`` (distilling from ``teacher`` when given) as the recipe says; checkpoint every epoch."""
    parts, state = _setup(student, teacher, loaders, recipe, env, feature_layers, resume, student_acc_before)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    writer = _tensorboard(run_dir, recipe, env)
    last_epoch = min(recipe.schedule.epochs, stop_after_epoch or recipe.schedule.epochs)
    for epoch in range(state.epoch, last_epoch):
        start = time.perf_counter()
        totals = _train_epoch(epoch, student, teacher, loaders, recipe, env, parts, loss_fn, checkpoint_path, progress)
        _end_epoch(epoch, time.perf_counter() - start, totals, student, loaders, recipe, env, parts, state, plan,
                   run_dir, writer, progress)
    if writer is not None:
        writer.close()
    ranks_agree = all_equal(_checksum(student), env)
    final = state.history[-1] if state.history else {}
    return TrainResult(final.get("val_acc", evaluate(student, loaders.val, env, recipe)),
                       final.get("val_acc_ema"), state.history, ranks_agree, checkpoint_path)


def _tensorboard(run_dir: Path, recipe: Recipe, env: DistEnv):
    if not (recipe.tensorboard and env.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
