"""Multiply-add counts per output pixel, the unit of the conversion's "is it cheaper" rule.

A separable layer keeps the original's output shape, so per-pixel counts compare the two layers
exactly; multiply by ``out_h * out_w`` for per-image counts (fvcore's FLOP convention).
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["dense_macs_per_pixel", "separable_macs_per_pixel"]


def dense_macs_per_pixel(in_channels: int, out_channels: int, kernel_size: Sequence[int], groups: int) -> int:
    kh, kw = kernel_size
    return (in_channels // groups) * out_channels * kh * kw


def separable_macs_per_pixel(
        in_channels: int, out_channels: int, kernel_size: Sequence[int], rank: int, groups: int) -> int:
    kh, kw = kernel_size
    mid = in_channels * rank
    return mid * kh * kw + (mid // groups) * out_channels
