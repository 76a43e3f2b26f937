"""Calibration batches for data-aware conversion: from the user's iterable, or ``digits``, ``random`` or a
folder of images (the CLI's ``--calib``)."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import DsdError
from ..images import image_transform, open_image

__all__ = ["calibration_batches", "take_batches", "calibration_and_held_out", "CALIBRATION_SOURCES"]

CALIBRATION_SOURCES = "digits, random, or a folder of images (class sub-folders allowed)"


def take_batches(data: Iterable[Any], limit: int) -> List[torch.Tensor]:
    """Up to ``limit`` input batches from an iterable of tensors or (inputs, labels) pairs (a tensor is one batch);
    a batch made under ``torch.inference_mode`` is cloned, since the sensitivity measurement differentiates
    through it."""
    data = [data] if isinstance(data, torch.Tensor) else data
    batches = [b[0] if isinstance(b, (list, tuple)) else b for b in itertools.islice(iter(data), limit)]
    if not batches or not all(isinstance(b, torch.Tensor) for b in batches):
        raise DsdError("calibration_data must yield input tensors (or (inputs, labels) pairs); it yielded none")
    return [b.clone() if b.is_inference() else b for b in batches]


def calibration_and_held_out(data: Iterable[Any], limit: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
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
