"""A fused depthwise + pointwise convolution in Triton: the input is read once, the depthwise result stays
on chip, the output is written once.

Layout NHWC. One program computes a block of output pixels x a block of output channels: for each block
of input channels and each of the ``R`` depthwise slices it accumulates the depthwise result in float32
registers (``KH*KW`` shifted, masked loads: the padding is the mask), then multiplies it into the output
block with ``tl.dot`` against the matching pointwise weights.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

__all__ = ["launch_separable_conv2d"]


@triton.jit
def _separable_conv2d_kernel(
        x_ptr, dw_ptr, pw_ptr, bias_ptr, out_ptr,
        N, H, W, C, HO, WO, M,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr,
        DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, R: tl.constexpr, HAS_BIAS: tl.constexpr,
        DOT_FP32: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_valid = offs_p < N * HO * WO
    m_valid = offs_m < M
    n = offs_p // (HO * WO)
    rest = offs_p % (HO * WO)
    oh = rest // WO
    ow = rest % WO
    acc = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_valid = offs_c < C
        for j in tl.static_range(R):
            z = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            for kh in tl.static_range(KH):
                ih = oh * SH - PH + kh * DH
                for kw in tl.static_range(KW):
                    iw = ow * SW - PW + kw * DW
                    inside = p_valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    pixel = ((n * H + ih) * W + iw) * C
                    xv = tl.load(x_ptr + pixel[:, None] + offs_c[None, :],
                                 mask=inside[:, None] & c_valid[None, :], other=0.0)
                    wv = tl.load(dw_ptr + (offs_c * R + j) * (KH * KW) + kh * KW + kw, mask=c_valid, other=0.0)
                    z += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
            pw = tl.load(pw_ptr + offs_m[None, :] * (C * R) + (offs_c * R + j)[:, None],
                         mask=c_valid[:, None] & m_valid[None, :], other=0.0)
            if DOT_FP32:
                acc += tl.dot(z, pw.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(z.to(pw.dtype), pw, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_m, mask=m_valid, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_p[:, None] * M + offs_m[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=p_valid[:, None] & m_valid[None, :])


def _block(size: int, largest: int) -> int:
    """A power of two >= 16 (tl.dot's least) that covers ``size`` up to ``largest``."""
    return max(16, min(largest, triton.next_power_of_2(size)))


def launch_separable_conv2d(x: torch.Tensor, depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor,
                            bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                            dilation: Sequence[int]) -> torch.Tensor:
    """Run the kernel; returns an NCHW-shaped tensor in the channels_last memory format."""
    n, c, h, w = x.shape
    m, kh, kw = pointwise_weight.shape[0], depthwise_weight.shape[2], depthwise_weight.shape[3]
    rank = depthwise_weight.shape[0] // c
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    dw = depthwise_weight.to(x.dtype).contiguous()
    pw = pointwise_weight.reshape(m, c * rank).to(x.dtype).contiguous()
    out = torch.empty((n, ho, wo, m), device=x.device, dtype=x.dtype)
    block_p, block_m, block_c = 64, _block(m, 64), _block(c, 32)
    # Triton's interpreter multiplies bfloat16 matrices wrongly; there the dot runs in float32.
    dot_fp32 = bool(triton.knobs.runtime.interpret) and x.dtype == torch.bfloat16
    grid = (triton.cdiv(n * ho * wo, block_p), triton.cdiv(m, block_m))
    _separable_conv2d_kernel[grid](
        x_nhwc, dw, pw, bias if bias is not None else pw, out, n, h, w, c, ho, wo, m,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], kh, kw, rank, bias is not None,
        dot_fp32, block_p, block_m, block_c)
    return out.permute(0, 3, 1, 2)
