"""Calibration batches for data-aware conversion: from the user's iterable, or ``digits``, ``random`` or a
folder of images (the CLI's ``--calib``)."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..errors import DsdError
from ..images import image_transform, open_image

__all__ = ["calibration_batches", "take_batches", "calibration_and_held_out", "model_inputs", "is_batch", "samples_in", "to_device",
           "CALIBRATION_SOURCES", "Batch"]

CALIBRATION_SOURCES = "digits, random, or a folder of images (class sub-folders allowed)"

Batch = Union[torch.Tensor, List[torch.Tensor]]  # a batch tensor, or a detector's list of images


def model_inputs(item: Any) -> Any:
    """What the model is called on for one item of calibration data: the inputs of an ``(inputs, labels)`` pair
    (a list, as a DataLoader collates it, or a tuple), the item itself otherwise; a tuple of images (torchvision's
    detection loaders collate ``tuple(zip(*batch))``) as a list, the one argument a detector takes."""
    inputs = item[0] if isinstance(item, (list, tuple)) else item
    return list(inputs) if isinstance(inputs, tuple) else inputs


def is_batch(inputs: Any) -> bool:
    """A batch tensor, or a non-empty list of image tensors."""
    return isinstance(inputs, torch.Tensor) or (
        isinstance(inputs, list) and len(inputs) > 0 and all(isinstance(t, torch.Tensor) for t in inputs))


def samples_in(batch: Batch) -> int:
    return batch.shape[0] if isinstance(batch, torch.Tensor) else len(batch)


def to_device(batch: Batch, device) -> Batch:
    return batch.to(device) if isinstance(batch, torch.Tensor) else [t.to(device) for t in batch]


def _ordinary(batch: Batch) -> Batch:
    """A batch made under ``torch.inference_mode`` cloned: the sensitivity measurement differentiates through it."""
    if isinstance(batch, torch.Tensor):
        return batch.clone() if batch.is_inference() else batch
    return [t.clone() if t.is_inference() else t for t in batch]


def take_batches(data: Iterable[Any], limit: int) -> List[Batch]:
    """Up to ``limit`` input batches from an iterable of batches or (inputs, labels) pairs (a tensor is one batch);
    a batch is a tensor, or a list of image tensors for a model called on one (torchvision's detectors)."""
    data = [data] if isinstance(data, torch.Tensor) else data
    items = list(itertools.islice(iter(data), limit))
    batches = [model_inputs(item) for item in items]
    bad = next((b for b in batches if not is_batch(b)), None)
    if not batches or bad is not None:
        got = "nothing" if not items else f"a {type(bad).__name__}" + (f" of {len(bad)}" if isinstance(bad, list) else "")
        raise DsdError(f"calibration_data must yield input batches: tensors, lists of image tensors (a detector's), or "
                       f"(inputs, labels) pairs of them; it yielded {got}")
    return [_ordinary(b) for b in batches]


def calibration_and_held_out(data: Iterable[Any], limit: int) -> Tuple[List[Batch], List[Batch]]:
    """The first ``limit`` batches of ``data`` (:func:`take_batches`) for calibration, and up to ``limit`` more held
    out: the fidelity figure measured on batches the conversion was not fitted to."""
    batches = take_batches(data, 2 * limit)
    return batches[:limit], batches[limit:]


def calibration_batches(source: str, input_size: Sequence[int], batches: int, batch_size: int = 32,
                        seed: int = 0, model: Optional[nn.Module] = None) -> List[torch.Tensor]:
    """``batches`` input batches of shape ``(batch_size, *input_size)`` from ``source``; a folder's images in
    ``input_size``'s channels, normalised as ``model``'s ``pretrained_cfg`` says (else timm's defaults)."""
    channels, height, width = input_size
    generator = torch.Generator().manual_seed(seed)
    if source == "random":
        return [torch.randn(batch_size, *input_size, generator=generator) for _ in range(batches)]
    if source == "digits":
        from ..zoo.digits import digits_splits
        if height != width:
            raise DsdError(f"--calib digits makes square images; --input-size is {height}x{width}")
        images = digits_splits(height, 1 if channels == 1 else 3)[0].tensors[0]
        order = torch.randperm(len(images), generator=generator)
        return [images[order[i * batch_size:(i + 1) * batch_size]] for i in range(batches)
                if i * batch_size < len(images)]
    folder = Path(source)
    if not folder.is_dir():
        raise DsdError(f"--calib {source}: not a folder; give {CALIBRATION_SOURCES}")
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise DsdError(f"--calib {source}: no images found (looked for {', '.join(IMG_EXTENSIONS)})")
    transform = image_transform(input_size, model)
    order = torch.randperm(len(files), generator=generator).tolist()
    images = [transform(open_image(files[i], channels)) for i in order[:batches * batch_size]]
    return [torch.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
