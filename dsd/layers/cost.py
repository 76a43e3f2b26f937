"""Multiply-adds and parameters of a dense conv and of its separable replacement.

A separable layer keeps the original's output shape, so per-pixel counts compare the two layers
exactly; :func:`output_pixels` turns them into per-image counts (fvcore's FLOP convention: one
multiply-add is one FLOP).
"""
from __future__ import annotations

from typing import Iterable, Sequence, Tuple

__all__ = ["dense_macs_per_pixel", "separable_macs_per_pixel", "dense_params", "separable_params", "dense_conv_macs",
           "output_pixels"]

Shape = Tuple[int, ...]


def dense_macs_per_pixel(in_channels: int, out_channels: int, kernel_size: Sequence[int], groups: int) -> int:
    kh, kw = kernel_size
    return (in_channels // groups) * out_channels * kh * kw


def separable_macs_per_pixel(
        in_channels: int, out_channels: int, kernel_size: Sequence[int], rank: int, groups: int) -> int:
    kh, kw = kernel_size
    mid = in_channels * rank
    return mid * kh * kw + (mid // groups) * out_channels


def dense_params(in_channels: int, out_channels: int, kernel_size: Sequence[int], groups: int, bias: bool) -> int:
    return dense_macs_per_pixel(in_channels, out_channels, kernel_size, groups) + (out_channels if bias else 0)


def separable_params(in_channels: int, out_channels: int, kernel_size: Sequence[int], rank: int, groups: int,
                     bias: bool) -> int:
    return separable_macs_per_pixel(in_channels, out_channels, kernel_size, rank, groups) + (out_channels if bias else 0)


def dense_conv_macs(conv, call_shapes: Iterable[Tuple[Shape, Shape]]) -> int:
    """Per-image multiply-adds of a dense conv over its recorded calls."""
    return output_pixels(call_shapes) * dense_macs_per_pixel(conv.in_channels, conv.out_channels, conv.kernel_size,
                                                             conv.groups)


def output_pixels(call_shapes: Iterable[Tuple[Shape, Shape]]) -> int:
    """Output pixels per image over every call, from recorded (input shape, output shape) pairs."""
    return sum(out[-1] * out[-2] for _, out in call_shapes)
