"""What dsd needs to know about each ``nn.Conv2d`` class: its effective weight and its padding.

Lookup is by exact class, never by ``isinstance``: a subclass nobody registered may compute something
else in ``forward`` (weight standardisation, dynamic padding...), so it is skipped with a reason rather
than silently changed in function. Register your own with :func:`register_conv_adapter`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

__all__ = ["ConvAdapter", "register_conv_adapter", "get_conv_adapter"]


@dataclass(frozen=True)
class ConvAdapter:
    effective_weight: Callable[[nn.Conv2d], torch.Tensor]
    dynamic_same: Callable[[nn.Conv2d], bool] = lambda conv: False


_ADAPTERS: Dict[Type[nn.Module], ConvAdapter] = {}


def register_conv_adapter(cls: Type[nn.Module], adapter: ConvAdapter) -> None:
    _ADAPTERS[cls] = adapter


def get_conv_adapter(conv: nn.Module) -> Optional[ConvAdapter]:
    """The adapter of the conv's class; a conv with ``torch.nn.utils.parametrize`` parametrizations (weight_norm,
    spectral_norm...) is looked up by the class they were added to, and its parametrized weight is its weight."""
    cls = type(conv)
    if parametrize.is_parametrized(conv):
        cls = cls.__bases__[0]
    return _ADAPTERS.get(cls)


def _plain_weight(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight


def _standardized_weight(conv: nn.Conv2d) -> torch.Tensor:
    """timm StdConv2d: weights standardised per output channel."""
    return F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None,
                        training=True, momentum=0., eps=conv.eps).reshape_as(conv.weight)


def _scaled_standardized_weight(conv: nn.Conv2d) -> torch.Tensor:
    """timm ScaledStdConv2d: standardised, then scaled by ``gain * scale``."""
    return F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None,
                        weight=(conv.gain * conv.scale).view(-1),
                        training=True, momentum=0., eps=conv.eps).reshape_as(conv.weight)


register_conv_adapter(nn.Conv2d, ConvAdapter(_plain_weight))


def _register_timm() -> None:
    from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

    register_conv_adapter(Conv2dSame, ConvAdapter(_plain_weight, lambda conv: True))
    register_conv_adapter(StdConv2d, ConvAdapter(_standardized_weight))
    register_conv_adapter(StdConv2dSame, ConvAdapter(
        _standardized_weight, lambda conv: conv.same_pad))
    register_conv_adapter(ScaledStdConv2d, ConvAdapter(_scaled_standardized_weight))
    register_conv_adapter(ScaledStdConv2dSame, ConvAdapter(
        _scaled_standardized_weight, lambda conv: conv.same_pad))


_register_timm()
