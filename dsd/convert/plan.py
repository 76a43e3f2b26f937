"""The conversion plan: a JSON record of every converted layer, enough to rebuild the architecture.

A plan plus a state dict (safetensors) restores a converted model without pickle:
``apply_plan(fresh_model, plan)`` swaps in empty separable layers, then ``load_state_dict`` fills them.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch.nn as nn

from ..errors import DsdError
from ..fileio import atomic_write_text
from .geometry import TF_SAME, PaddingSpec
from .separable import DepthwiseSeparableConv2d

__all__ = ["LayerSpec", "ConversionPlan", "PLAN_VERSION"]

PLAN_VERSION = 1
Pair = Tuple[int, int]


def _padding_from_json(value: Any) -> PaddingSpec:
    return TF_SAME if value == TF_SAME else tuple(tuple(int(p) for p in axis) for axis in value)


@dataclass(frozen=True)
class LayerSpec:
    """One dense conv and the separable layer that replaces it."""
    name: str
    conv_class: str
    in_channels: int
    out_channels: int
    kernel_size: Pair
    stride: Pair
    padding: PaddingSpec  # the original's, per side, or "tf_same"
    dilation: Pair
    groups: int
    bias: bool
    padding_mode: str
    rank: int
    new_kernel_size: Pair
    new_dilation: Pair
    new_padding: PaddingSpec
    tap_step: Pair = (1, 1)  # >1 where keep_receptive_field keeps every step-th original tap
    init: str = "svd"
    init_error: Optional[float] = None

    def build(self, device=None, dtype=None) -> DepthwiseSeparableConv2d:
        """An uninitialised separable layer with this geometry."""
        return DepthwiseSeparableConv2d(
            self.in_channels, self.out_channels, self.new_kernel_size, rank=self.rank, stride=self.stride,
            padding=self.new_padding, dilation=self.new_dilation, groups=self.groups, bias=self.bias,
            padding_mode=self.padding_mode, device=device, dtype=dtype)

    def fits(self, conv: nn.Module) -> Optional[str]:
        """Why ``conv`` is not the layer this spec was made from, or None if it is."""
        if not isinstance(conv, nn.Conv2d):
            return f"is a {type(conv).__name__}, not a Conv2d"
        want = (self.in_channels, self.out_channels, self.kernel_size, self.stride, self.groups)
        have = (conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride), conv.groups)
        if want != have:
            return f"has (in, out, kernel, stride, groups) = {have}, the plan expects {want}"
        return None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "LayerSpec":
        data = dict(data)
        for key in ("kernel_size", "stride", "dilation", "new_kernel_size", "new_dilation", "tap_step"):
            data[key] = tuple(data[key])
        data["padding"] = _padding_from_json(data["padding"])
        data["new_padding"] = _padding_from_json(data["new_padding"])
        return cls(**data)

    def with_error(self, error: Optional[float]) -> "LayerSpec":
        return replace(self, init_error=error)


@dataclass
class ConversionPlan:
    layers: List[LayerSpec]
    options: Dict[str, Any] = field(default_factory=dict)
    source: Optional[Dict[str, Any]] = None  # how to rebuild the original model (set by the CLI)
    version: int = PLAN_VERSION

    def to_dict(self) -> Dict[str, Any]:
        return {"version": self.version, "source": self.source, "options": self.options,
                "layers": [layer.to_dict() for layer in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ConversionPlan":
        version = data.get("version")
        if version != PLAN_VERSION:
            raise DsdError(f"conversion plan version {version!r} is not supported (this dsd reads {PLAN_VERSION})")
        return cls([LayerSpec.from_dict(layer) for layer in data["layers"]], data.get("options", {}),
                   data.get("source"), version)

    def save(self, path: Union[str, os.PathLike]) -> None:
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ConversionPlan":
        return cls.from_dict(json.loads(Path(path).read_text()))
