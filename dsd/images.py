"""Image files as a model takes them: timm's transforms for its data config, in its number of channels (one:
grayscale, three: RGB), so a one-channel model reads a folder of images as an RGB model does."""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch.nn as nn

from .errors import DsdError, short_error

__all__ = ["data_config", "image_transform", "open_image", "image_folder"]

PathLike = Union[str, os.PathLike]


def data_config(input_size: Sequence[int], model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """timm's data config at ``input_size`` (``model``'s ``pretrained_cfg`` gives its normalisation and crop), with
    one mean and std per input channel: timm's defaults are per RGB channel, so a grayscale model gets their
    averages."""
    from timm.data import resolve_data_config

    config = resolve_data_config({"input_size": tuple(input_size)}, model=model)
    channels = input_size[0]
    for key in ("mean", "std"):
        values = tuple(config[key])
        if len(values) != channels:
            config[key] = (sum(values) / len(values),) * channels
    return config


def image_transform(input_size: Sequence[int], model: Optional[nn.Module] = None, training: bool = False
                    ) -> Callable:
    """timm's eval (or training) transform for :func:`data_config`."""
    from timm.data import create_transform

    return create_transform(**data_config(input_size, model), is_training=training)


def open_image(path: PathLike, channels: int = 3):
    """An image file as a PIL image with ``channels`` channels (1: grayscale, else RGB); a file PIL cannot read is
    a one-line :class:`DsdError` naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DsdError(f"{path}: not a readable image ({short_error(error)}); remove or replace it") from error


def image_folder(root: PathLike, transform: Callable, channels: int = 3):
    """torchvision's ``ImageFolder`` (one sub-folder per class) whose images have ``channels`` channels."""
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(root), transform, loader=functools.partial(open_image, channels=channels))
