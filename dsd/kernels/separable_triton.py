"""A fused depthwise + pointwise convolution in Triton: the input is read once, the depthwise result stays
on chip, the output is written once.

Layout NHWC. One program computes a block of output pixels x a block of output channels: for each block
of input channels and each of the ``R`` depthwise slices it accumulates the depthwise result in float32
registers (``KH*KW`` shifted, masked loads: the padding is the mask), then multiplies it into the output
block with ``tl.dot`` against the matching pointwise weights. On a GPU the block sizes are autotuned per
layer shape (a block of output channels as wide as the layer spares recomputing the depthwise part); Triton's
interpreter runs one configuration.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

__all__ = ["launch_separable_conv2d", "CONFIGS"]


@triton.jit
def _separable_conv2d_kernel(
        x_ptr, dw_ptr, pw_ptr, bias_ptr, out_ptr,
        N, H, W, C, HO, WO, M,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr,
        DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, R: tl.constexpr, HAS_BIAS: tl.constexpr,
        DOT_FP32: tl.constexpr, TF32: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_valid = offs_p < N * HO * WO
    m_valid = offs_m < M
    n = offs_p // (HO * WO)
    rest = offs_p % (HO * WO)
    ih0 = (rest // WO) * SH - PH
    iw0 = (rest % WO) * SW - PW
    corner = ((n * H + ih0) * W + iw0) * C  # the tap (0, 0) of each output pixel; may lie in the padding
    acc = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_valid = offs_c < C
        for j in tl.static_range(R):
            z = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            for kh in tl.static_range(KH):
                row_inside = p_valid & (ih0 + kh * DH >= 0) & (ih0 + kh * DH < H)
                for kw in tl.static_range(KW):
                    inside = row_inside & (iw0 + kw * DW >= 0) & (iw0 + kw * DW < W)
                    tap = corner + (kh * DH * W + kw * DW) * C
                    xv = tl.load(x_ptr + tap[:, None] + offs_c[None, :],
                                 mask=inside[:, None] & c_valid[None, :], other=0.0)
                    wv = tl.load(dw_ptr + (offs_c * R + j) * (KH * KW) + kh * KW + kw, mask=c_valid, other=0.0)
                    z += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
            pw = tl.load(pw_ptr + offs_m[None, :] * (C * R) + (offs_c * R + j)[:, None],
                         mask=c_valid[:, None] & m_valid[None, :], other=0.0)
            if DOT_FP32:
                if TF32:
                    acc += tl.dot(z, pw.to(tl.float32), input_precision="tf32")
                else:
                    acc += tl.dot(z, pw.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(z.to(pw.dtype), pw)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_m, mask=m_valid, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_p[:, None] * M + offs_m[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=p_valid[:, None] & m_valid[None, :])


def _config(p: int, m: int, c: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_P": p, "BLOCK_M": m, "BLOCK_C": c}, num_warps=warps, num_stages=stages)


# Pixel x output-channel x input-channel blocks: narrow and wide output blocks, for 64 to 512 channels.
CONFIGS = [
    _config(64, 64, 32, 4, 2), _config(128, 64, 32, 4, 2), _config(128, 64, 64, 8, 2), _config(64, 128, 32, 4, 2),
    _config(128, 128, 32, 8, 2), _config(64, 256, 32, 8, 2), _config(32, 256, 64, 8, 2), _config(32, 512, 32, 8, 1),
]


def _block(size: int, largest: int) -> int:
    """A power of two >= 16 (tl.dot's least) that covers ``size`` up to ``largest``."""
    return max(16, min(largest, triton.next_power_of_2(size)))


def _fitting(configs, named_args, **kwargs):
    """The configurations whose channel blocks the layer fills (no output block wider than the layer's)."""
    m, c = named_args["M"], named_args["C"]
    fitting = [cfg for cfg in configs
               if cfg.kwargs["BLOCK_M"] <= _block(m, 512) and cfg.kwargs["BLOCK_C"] <= _block(c, 64)]
    return fitting or configs[:1]


_autotuned_kernel = triton.autotune(CONFIGS, key=["N", "C", "HO", "WO", "M"],
                                    prune_configs_by={"early_config_prune": _fitting})(_separable_conv2d_kernel)


def launch_separable_conv2d(x: torch.Tensor, depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor,
                            bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                            dilation: Sequence[int], config: Optional[triton.Config] = None) -> torch.Tensor:
    """Run the kernel; returns an NCHW-shaped tensor in the channels_last memory format. A float32 product
    follows ``torch.backends.cudnn.allow_tf32``, as the convolutions it replaces do. ``config`` (one of
    :data:`CONFIGS`) runs those blocks instead of the autotuned ones (the interpreter's default: the first)."""
    n, c, h, w = x.shape
    m, kh, kw = pointwise_weight.shape[0], depthwise_weight.shape[2], depthwise_weight.shape[3]
    rank = depthwise_weight.shape[0] // c
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    dw = depthwise_weight.to(x.dtype).contiguous()
    pw = pointwise_weight.reshape(m, c * rank).to(x.dtype).contiguous()
    out = torch.empty((n, ho, wo, m), device=x.device, dtype=x.dtype)
    interpreted = bool(triton.knobs.runtime.interpret)
    # Triton's interpreter multiplies bfloat16 matrices wrongly; there the dot runs in float32.
    dot_fp32 = x.dtype == torch.float32 or (interpreted and x.dtype == torch.bfloat16)
    tf32 = x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreted
    args = (x_nhwc, dw, pw, bias if bias is not None else pw, out, n, h, w, c, ho, wo, m,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], kh, kw, rank, bias is not None,
            dot_fp32, tf32)

    def grid(meta):
        return triton.cdiv(n * ho * wo, meta["BLOCK_P"]), triton.cdiv(m, meta["BLOCK_M"])
    if config is None and interpreted:
        config = CONFIGS[0]
    if config is None:
        _autotuned_kernel[grid](*args)
    else:
        _separable_conv2d_kernel[grid](*args, **config.kwargs, num_warps=config.num_warps,
                                       num_stages=config.num_stages)
    return out.permute(0, 3, 1, 2)
