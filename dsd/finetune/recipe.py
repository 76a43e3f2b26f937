"""Fine-tune recipes: one YAML file says everything about a run; ``--set a.b=c`` overrides any key.

Validation is by the dataclasses below: an unknown key or a value of the wrong type is a one-line
error naming the key (``optim.lr: expected a number, got 'fast'``).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from ..convert.options import ConvertOptions
from ..errors import DsdError

__all__ = ["Recipe", "load_recipe", "recipe_from_dict", "apply_overrides", "builtin_recipes", "resolve_recipe_path"]


@dataclass
class DataConfig:
    name: str = "digits"  # digits | mnist | cifar10 | imagefolder
    root: Optional[str] = None  # dataset folder (mnist, cifar10, imagefolder)
    image_size: int = 32
    channels: int = 1  # 1 or 3 (gray images repeated to 3 channels for ImageNet-style models)
    batch_size: int = 64  # per process
    workers: int = 0
    download: bool = False  # torchvision datasets only; off by default (offline machines)


@dataclass
class TeacherConfig:
    source: str = "dsd:digits_cnn"  # anything dsd-convert accepts
    arch: Optional[str] = None
    arch_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained: bool = True


@dataclass
class StudentConfig:
    plan: Optional[str] = None  # a .plan.json from dsd-convert; otherwise convert the teacher with `convert`
    convert: ConvertOptions = field(default_factory=ConvertOptions)  # calibration batches: the training data


@dataclass
class LossConfig:
    alpha: float = 0.7  # weight of the KL distillation term; 1 - alpha weighs cross-entropy on labels
    temperature: float = 4.0
    feature_weight: float = 0.0  # MSE between each converted layer's output and the original layer's


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd (timm.optim.create_optimizer_v2)
    lr: float = 1e-3
    weight_decay: float = 0.05  # not applied to norms and biases
    momentum: float = 0.9
    clip_grad: Optional[float] = None


@dataclass
class ScheduleConfig:
    epochs: int = 10
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5


@dataclass
class PrecisionConfig:
    amp: str = "none"  # none | float16 | bfloat16 (autocast; float16 with a grad scaler)
    channels_last: bool = False


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.998


@dataclass
class Recipe:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    bn_recalibration_batches: int = 0  # re-estimate BatchNorm statistics before training
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    output_dir: str = "runs/dsd"  # checkpoints, metrics.jsonl, the fine-tuned student
    tensorboard: bool = True  # when the tensorboard package is installed

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["student"]["convert"] = self.student.convert.to_dict()
        return data


_RANGES = {  # key: (allowed, what the error says is allowed)
    "data.image_size": (lambda v: v >= 1, ">= 1"), "data.batch_size": (lambda v: v >= 1, ">= 1"),
    "data.workers": (lambda v: v >= 0, ">= 0"), "data.channels": (lambda v: v in (1, 3), "1 or 3"),
    "loss.alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"), "loss.temperature": (lambda v: v > 0, "> 0"),
    "loss.feature_weight": (lambda v: v >= 0, ">= 0"), "optim.lr": (lambda v: v > 0, "> 0"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"), "optim.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.clip_grad": (lambda v: v is None or v > 0, "> 0"), "schedule.epochs": (lambda v: v >= 1, ">= 1"),
    "schedule.warmup_epochs": (lambda v: v >= 0, ">= 0"), "schedule.min_lr": (lambda v: v >= 0, ">= 0"),
    "ema.decay": (lambda v: 0 <= v < 1, "in [0, 1)"), "bn_recalibration_batches": (lambda v: v >= 0, ">= 0"),
}
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_CHOICES = {"data.name": ("digits", "mnist", "cifar10", "imagefolder"), "optim.name": ("adamw", "sgd"),
            "precision.amp": ("none", "float16", "bfloat16"), "device": ("auto", "cpu", "cuda")}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except DsdError as error:
                errors.append(error)
        raise DsdError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if hasattr(tp, "from_dict"):  # a dsd options object validates itself
        try:
            return tp.from_dict(value)
        except DsdError as error:
            raise DsdError(f"{key}: {error}") from None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (list, List):
        if not isinstance(value, list):
            raise DsdError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise DsdError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise DsdError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DsdError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DsdError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise DsdError(f"{key}: expected a string, got {value!r}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise DsdError(f"{key}: expected one of {', '.join(_CHOICES[key])}, got {value!r}")
        return value
    if tp is typing.Any:
        return value
    raise TypeError(f"recipe field {key} has an unsupported type {tp}")


def _build(cls, data: Any, prefix: str = ""):
    if not isinstance(data, dict):
        raise DsdError(f"{prefix or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise DsdError(f"unknown recipe key {where}{unknown[0]}; valid keys here: {', '.join(sorted(names))}")
    values = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        values[k] = _coerce(v, hints[k], key)
        if key in _RANGES and values[k] is not None and not _RANGES[key][0](values[k]):
            raise DsdError(f"{key}: expected a value {_RANGES[key][1]}, got {values[k]!r}")
    return cls(**values)


def recipe_from_dict(data: Dict[str, Any]) -> Recipe:
    return _build(Recipe, data or {})


def apply_overrides(data: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """``a.b=c`` sets ``data['a']['b']``; the value is read as YAML (``1e-3``, ``true``, ``[1, 2]``)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise DsdError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.01")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DsdError(f"--set {item!r}: {part} is not a section")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise DsdError(f"--set {item!r}: the value is not valid YAML ({str(error).splitlines()[0]})") from None
        # YAML 1.1 reads 1e-3 (no dot) as a string; a number is meant
        node[parts[-1]] = float(value) if isinstance(value, str) and _NUMBER.match(value) else value
    return data


def builtin_recipes() -> List[str]:
    return sorted(p.name[:-5] for p in resources.files("dsd").joinpath("recipes").iterdir() if p.name.endswith(".yaml"))


def resolve_recipe_path(name_or_path: str) -> Path:
    """A recipe file, or the name of a built-in one (``digits``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = resources.files("dsd").joinpath("recipes", f"{name_or_path}.yaml")
    if builtin.is_file():
        return Path(str(builtin))
    raise DsdError(f"{name_or_path}: no such recipe file, and no built-in recipe of that name "
                   f"(built-in: {', '.join(builtin_recipes())})")


def load_recipe(name_or_path: str, overrides: Optional[List[str]] = None) -> Recipe:
    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise DsdError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from error
    return recipe_from_dict(apply_overrides(data, overrides or []))
