"""``LayerSpec``: one dense conv's geometry and the separable layer that replaces it (a plan's row)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Optional, Tuple

import torch.nn as nn

from .cost import dense_macs_per_pixel, dense_params, separable_macs_per_pixel, separable_params
from .padding import TF_SAME, PaddingSpec
from .separable import DepthwiseSeparableConv2d

__all__ = ["LayerSpec"]

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

    def dense_macs_per_pixel(self) -> int:
        return dense_macs_per_pixel(self.in_channels, self.out_channels, self.kernel_size, self.groups)

    def macs_per_pixel(self, rank: Optional[int] = None) -> int:
        """Multiply-adds per output pixel of the separable layer (at ``rank``, default the spec's own)."""
        return separable_macs_per_pixel(self.in_channels, self.out_channels, self.new_kernel_size,
                                        rank or self.rank, self.groups)

    def dense_params(self) -> int:
        return dense_params(self.in_channels, self.out_channels, self.kernel_size, self.groups, self.bias)

    def params(self, rank: Optional[int] = None) -> int:
        return separable_params(self.in_channels, self.out_channels, self.new_kernel_size, rank or self.rank,
                                self.groups, self.bias)

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
