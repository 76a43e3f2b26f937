"""Built-in models, addressed as ``dsd:NAME`` wherever a model source is accepted.

``dsd:digits_cnn`` is a small CNN for scikit-learn's ``load_digits`` (real 8x8 handwritten digits,
shipped with scikit-learn): the offline teacher of ``dsd demo`` and the ``digits`` recipe. Its trained
weights live in the local cache (``$DSD_CACHE`` or ``~/.cache/dsd``), written by ``dsd demo`` or the
first fine-tune that needs them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict

import torch.nn as nn

from .errors import DsdError

__all__ = ["DigitsCNN", "digits_cnn", "MODELS", "cache_dir", "cached_weights", "build"]


def cache_dir() -> Path:
    return Path(os.environ.get("DSD_CACHE", Path.home() / ".cache" / "dsd"))


def cached_weights(name: str) -> Path:
    return cache_dir() / f"{name}.safetensors"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """Four 3x3 conv blocks, two poolings, global pooling, a linear classifier (about 0.2M parameters)."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            _block(in_chans, width), _block(width, 2 * width), nn.MaxPool2d(2),
            _block(2 * width, 4 * width), nn.MaxPool2d(2), _block(4 * width, 4 * width))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def digits_cnn(**kwargs) -> DigitsCNN:
    return DigitsCNN(**kwargs)


MODELS: Dict[str, Callable[..., nn.Module]] = {"digits_cnn": digits_cnn}


def build(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise DsdError(f"dsd has no built-in model {name!r} (built-in: {', '.join(sorted(MODELS))})")
    model = MODELS[name](**kwargs)
    if pretrained:
        from safetensors.torch import load_model
        path = cached_weights(name)
        if not path.is_file():
            raise DsdError(f"no trained weights for dsd:{name} in {path.parent}; run `dsd demo` (or a fine-tune "
                           f"with the digits recipe) once to train and cache them")
        load_model(model, str(path))
    return model
