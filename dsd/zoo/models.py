"""Built-in models, addressed as ``dsd:NAME`` wherever a model source is accepted.

Small networks for scikit-learn's ``load_digits`` (real 8x8 handwritten digits, shipped with
scikit-learn, upsampled to 32x32), trained here in a minute or two on a CPU:

- ``dsd:digits_cnn``: a plain 3x3 CNN, the offline teacher of ``dsd demo`` and the ``digits`` recipe;
- ``dsd:digits_resnet``: a small ResNet of torchvision ``BasicBlock`` layers;
- ``dsd:digits_mobilenet``: a small MobileNet-like net built with timm's EfficientNet builder: inverted
  residuals with depthwise 5x5 convs, plus dense 3x3/5x5 convs (fused-MBConv expansions, a conv block).

Trained weights live in the local cache (``$DSD_CACHE`` or ``~/.cache/dsd``), written by ``dsd demo``
or the first fine-tune that needs them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, TypeVar

import torch.nn as nn
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet
from torchvision.models.resnet import BasicBlock

from ..errors import DsdError
from ..fileio import dsd_cache_dir
from .digits import DIGITS_IMAGE_SIZE, DIGITS_MEAN, DIGITS_STD

__all__ = ["DigitsCNN", "DigitsResNet", "digits_cnn", "digits_resnet", "digits_mobilenet", "MODELS", "cache_dir",
           "cached_weights", "build"]


def cache_dir() -> Path:
    return dsd_cache_dir()


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


class DigitsResNet(nn.Module):
    """A 3x3 stem, then three stages of one ``BasicBlock`` each (strides 1, 2, 2), global pooling, linear."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.stem = _block(in_chans, width)
        stages, cin = [], width
        for cout, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            downsample = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            stages.append(BasicBlock(cin, cout, stride, downsample))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


# timm EfficientNet block strings: er = fused MBConv (dense kxk expansion), ir = inverted residual
# (depthwise kxk), cn = conv-bn-act; r repeats, k kernel, s stride, e expansion, c channels.
DIGITS_MOBILENET_ARCH = [["er_r1_k3_s1_e4_c24"], ["er_r1_k5_s2_e4_c32"], ["ir_r2_k5_s2_e6_c48"], ["cn_r1_k5_s1_c64"]]


ModelT = TypeVar("ModelT", bound=nn.Module)


def _with_cfg(model: ModelT, in_chans: int, num_classes: int) -> ModelT:
    """The data the model takes, as timm's models carry it (``pretrained_cfg``): ``dsd-convert dsd:NAME``, ``dsd
    report`` and timm's ``resolve_data_config`` read the input size and normalisation from it."""
    model.pretrained_cfg = {"input_size": (in_chans, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), "num_classes": num_classes,
                            "mean": (DIGITS_MEAN,) * in_chans, "std": (DIGITS_STD,) * in_chans}
    return model


def digits_cnn(in_chans: int = 1, num_classes: int = 10, width: int = 32) -> DigitsCNN:
    return _with_cfg(DigitsCNN(in_chans, num_classes, width), in_chans, num_classes)


def digits_resnet(in_chans: int = 1, num_classes: int = 10, width: int = 32) -> DigitsResNet:
    return _with_cfg(DigitsResNet(in_chans, num_classes, width), in_chans, num_classes)


def digits_mobilenet(in_chans: int = 1, num_classes: int = 10) -> EfficientNet:
    model = EfficientNet(decode_arch_def(DIGITS_MOBILENET_ARCH), in_chans=in_chans, num_classes=num_classes,
                         stem_size=16, num_features=256)
    return _with_cfg(model, in_chans, num_classes)


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": digits_cnn, "digits_resnet": digits_resnet, "digits_mobilenet": digits_mobilenet}


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
