"""Padding arithmetic that keeps a convolution's output shape when its kernel or dilation changes.

Along one axis a convolution maps an input of size ``i`` to
``floor((i + before + after - dilation * (kernel - 1) - 1) / stride) + 1``. Two convolutions with the
same stride therefore agree on the output size for *every* input size exactly when
``before + after - dilation * (kernel - 1)`` agrees (the issue's ``2*pad - dilation*(k-1)`` rule).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch.nn as nn

AxisPad = Tuple[int, int]  # (before, after) along one spatial axis
Padding2d = Tuple[AxisPad, AxisPad]  # ((top, bottom), (left, right))
TF_SAME = "tf_same"  # input-size dependent 'SAME' padding, as timm's Conv2dSame and TensorFlow do
PaddingSpec = Union[Padding2d, str]

__all__ = [
    "AxisPad", "Padding2d", "PaddingSpec", "TF_SAME", "conv_padding", "matched_padding",
    "output_size", "tf_same_pad", "extent", "is_symmetric",
]


def extent(kernel: int, dilation: int) -> int:
    """Number of input pixels one output pixel sees along an axis."""
    return dilation * (kernel - 1) + 1


def conv_padding(conv: nn.Conv2d, dynamic_same: bool = False) -> PaddingSpec:
    """The explicit per-side padding that ``conv`` applies, or ``TF_SAME`` if it depends on the input."""
    if dynamic_same:
        return TF_SAME
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return ((0, 0), (0, 0))
        # PyTorch's 'same' (stride 1 only) puts the odd pixel of padding after the input.
        axes = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            axes.append((total // 2, total - total // 2))
        return (axes[0], axes[1])
    ph, pw = conv.padding
    return ((ph, ph), (pw, pw))


def matched_padding(
        padding: PaddingSpec,
        kernel_size: Sequence[int],
        dilation: Sequence[int],
        new_kernel_size: Sequence[int],
        new_dilation: Sequence[int],
) -> PaddingSpec:
    """Padding for a new kernel/dilation that keeps every output shape, centred like the original.

    The total padding changes by the change in kernel extent; it is split so that the new window's
    centre sits where the old one's did (the odd pixel, if any, goes after the input).
    """
    if padding == TF_SAME:
        return TF_SAME  # TF 'SAME' output size is ceil(i / stride) whatever the kernel
    axes = []
    for (before, after), k, d, nk, nd in zip(padding, kernel_size, dilation, new_kernel_size, new_dilation):
        grow = extent(nk, nd) - extent(k, d)
        new_before = before + math.floor(grow / 2)
        axes.append((new_before, before + after + grow - new_before))
    return (axes[0], axes[1])


def is_symmetric(padding: PaddingSpec) -> bool:
    return padding != TF_SAME and all(b == a and b >= 0 for b, a in padding)


def output_size(size: int, kernel: int, stride: int, before: int, after: int, dilation: int) -> int:
    return (size + before + after - extent(kernel, dilation)) // stride + 1


def tf_same_pad(size: int, kernel: int, stride: int, dilation: int) -> AxisPad:
    """TensorFlow 'SAME' padding along one axis (same formula as ``timm.layers.padding``)."""
    total = max((math.ceil(size / stride) - 1) * stride + extent(kernel, dilation) - size, 0)
    return total // 2, total - total // 2
