"""Accuracy on the user's own data: top-1/top-5 of the original and the converted model side by side, and how
often they agree, on an ImageFolder (timm's data config, as timm's ``validate.py``) or the built-in digits."""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .errors import DsdError
from .images import image_folder, image_transform
from .modes import check_class_scores, check_runs, eval_mode

__all__ = ["Accuracy", "ValidationResult", "validation_loader", "validate"]

DIGITS = "digits"


@dataclass
class Accuracy:
    model: str
    top1: float  # percent
    top5: Optional[float]  # percent; None with fewer than five classes


@dataclass
class ValidationResult:
    data: str
    samples: int
    classes: int
    accuracies: List[Accuracy]
    agreement: Optional[float]  # percent of samples where the two models' top-1 classes are the same

    def summary(self) -> str:
        lines = [f"{self.samples} images, {self.classes} classes from {self.data}"]
        for a in self.accuracies:
            lines.append(f"{a.model:>10}: top-1 {a.top1:.2f}%" + (f", top-5 {a.top5:.2f}%" if a.top5 is not None else ""))
        if self.agreement is not None:
            lines.append(f" agreement: {self.agreement:.2f}% of images get the same top-1 class from both models")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {"schema": "dsd.validation", "version": 1, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def validation_loader(data_dir: str, input_size: Sequence[int], batch_size: int = 64, workers: int = 0,
                      model: Optional[nn.Module] = None) -> DataLoader:
    """``digits`` (the built-in validation split) or an ImageFolder (``DIR/val`` when it exists, else ``DIR``),
    transformed with timm's eval transform for the model's data config at ``input_size``."""
    if data_dir == DIGITS:
        from .zoo.digits import digits_splits
        channels, height, width = input_size
        if height != width:
            raise DsdError(f"--data-dir digits makes square images; --input-size is {height}x{width}")
        dataset = digits_splits(height, channels)[1]
        dataset.classes = list(range(10))
    else:
        dataset = _image_folder(Path(data_dir), input_size, model)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)


def _image_folder(root: Path, input_size: Sequence[int], model: Optional[nn.Module]):
    if not root.is_dir():
        raise DsdError(f"--data-dir {root}: not a folder; give an ImageFolder (one sub-folder per class) or 'digits'")
    folder = root / "val" if (root / "val").is_dir() else root
    try:
        dataset = image_folder(folder, image_transform(input_size, model), input_size[0])
    except (FileNotFoundError, RuntimeError) as error:
        raise DsdError(f"--data-dir {folder}: not an ImageFolder ({error}); put each class's images in a "
                       "sub-folder named after the class") from None
    return dataset


def _check_head(logits: Any, classes: int, name: str) -> None:
    check_class_scores(logits, f"the {name} model", "dsd validate evaluates classifiers")
    if logits.shape[1] != classes:
        raise DsdError(f"the {name} model's head has {logits.shape[1]} outputs but the data has {classes} classes; "
                       f"use a model trained for these classes (e.g. --arch-kwarg num_classes={classes} with its weights)")


@torch.no_grad()
def validate(models: Dict[str, nn.Module], loader: DataLoader, data: str = "", progress: bool = False
             ) -> ValidationResult:
    """Top-1/top-5 (percent) of each model on ``loader``, and with two models their top-1 agreement."""
    classes = len(loader.dataset.classes)
    correct = {name: torch.zeros(2, dtype=torch.long) for name in models}  # top-1, top-5
    same, seen = 0, 0
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(eval_mode(model))
        for images, labels in tqdm(loader, desc="validating", unit="batch", disable=not progress):
            predictions = []
            for name, model in models.items():
                if not seen:  # the data's image size against the model's: one line, not an internal error
                    check_runs(model, images[:1], f"model {name!r}")
                logits = model(images)
                _check_head(logits, classes, name)
                top = logits.topk(min(5, classes), dim=1).indices
                correct[name][0] += (top[:, 0] == labels).sum()
                correct[name][1] += (top == labels[:, None]).any(dim=1).sum()
                predictions.append(top[:, 0])
            if len(predictions) == 2:
                same += int((predictions[0] == predictions[1]).sum())
            seen += labels.numel()
    if not seen:
        raise DsdError(f"--data-dir {data}: no images to validate on")
    accuracies = [Accuracy(name, 100.0 * int(c[0]) / seen, 100.0 * int(c[1]) / seen if classes >= 5 else None)
                  for name, c in correct.items()]
    return ValidationResult(data, seen, classes, accuracies, 100.0 * same / seen if len(models) == 2 else None)
