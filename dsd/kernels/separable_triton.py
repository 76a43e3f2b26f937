"""A fused depthwise + pointwise convolution in Triton: the input is read once, the depthwise result stays
on chip, the output is written once.

Layout NHWC; weights as :func:`dsd.kernels.separable_op.arrange_weights` lays them out (channels innermost, so
that each load is contiguous). One program computes a block of output pixels (a run of them, or a 2-D tile
``TILE_W`` wide whose taps overlap in the L1 cache) x a block of output channels: for each block of input
channels and each of the ``R`` depthwise slices it accumulates the depthwise result in float32 registers
(``KH*KW`` shifted, masked loads: the padding is the mask), then multiplies it into the output block with
``tl.dot`` against the matching pointwise weights. On a GPU the block sizes are autotuned per layer shape among
those the GPU's shared memory holds; Triton's interpreter runs one configuration.
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
        DOT_FP32: tl.constexpr, TF32: tl.constexpr, EVEN_C: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, TILE_W: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    if TILE_W > 0:  # a TILE_H x TILE_W tile of one image's output pixels: its taps overlap in the L1 cache
        TILE_H: tl.constexpr = BLOCK_P // TILE_W
        tiles_w = tl.cdiv(WO, TILE_W)
        tiles = tl.cdiv(HO, TILE_H) * tiles_w
        n = pid_p // tiles
        oh = (pid_p % tiles) // tiles_w * TILE_H + tl.arange(0, BLOCK_P) // TILE_W
        ow = (pid_p % tiles) % tiles_w * TILE_W + tl.arange(0, BLOCK_P) % TILE_W
        p_valid = (oh < HO) & (ow < WO)
        offs_p = (n * HO + oh) * WO + ow
    else:  # a run of BLOCK_P consecutive output pixels
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        p_valid = offs_p < N * HO * WO
        n = offs_p // (HO * WO)
        oh = offs_p % (HO * WO) // WO
        ow = offs_p % WO
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
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
                    taps = x_ptr + (corner + (kh * DH * W + kw * DW) * C)[:, None] + offs_c[None, :]
                    weights = dw_ptr + ((kh * KW + kw) * R + j) * C + offs_c
                    if EVEN_C:
                        xv = tl.load(taps, mask=inside[:, None], other=0.0)
                        wv = tl.load(weights)
                    else:
                        xv = tl.load(taps, mask=inside[:, None] & c_valid[None, :], other=0.0)
                        wv = tl.load(weights, mask=c_valid, other=0.0)
                    z += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
            rows = pw_ptr + (j * C + offs_c)[:, None] * M + offs_m[None, :]
            if EVEN_C:
                pw = tl.load(rows, mask=m_valid[None, :], other=0.0)
            else:
                pw = tl.load(rows, mask=c_valid[:, None] & m_valid[None, :], other=0.0)
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


def _config(p: int, m: int, c: int, warps: int, stages: int, tile_w: int = 0) -> triton.Config:
    return triton.Config({"BLOCK_P": p, "BLOCK_M": m, "BLOCK_C": c, "TILE_W": tile_w}, num_warps=warps,
                         num_stages=stages)


# Pixel x output-channel x input-channel blocks (pixels as a run, or as tiles TILE_W wide), chosen by a sweep on
# an H100 (bf16, batch 64, 64-512 channels): narrow output blocks for few channels, 2-D tiles for small images.
CONFIGS = [
    _config(64, 64, 32, 4, 2), _config(128, 64, 32, 8, 2), _config(64, 128, 32, 4, 2), _config(128, 128, 32, 8, 2),
    _config(128, 128, 32, 8, 3), _config(128, 256, 32, 8, 3, 8), _config(128, 256, 32, 8, 2, 16),
    _config(64, 256, 32, 4, 2, 8), _config(64, 256, 32, 8, 2), _config(64, 512, 32, 8, 2, 8),
]
# Unpipelined, so nothing is staged in shared memory ahead of use: offered at every shape, so that one block always
# fits (float32 at rank 3 with a 5x5 kernel outgrew an H200's shared memory in every pipelined block: Triton stages
# the depthwise taps' loads: 247,168 bytes in the smallest, 16,384 in this one, compiled for sm_90 by Triton 3.6).
SINGLE_STAGE = _config(64, 64, 32, 4, 1)
CONFIGS.append(SINGLE_STAGE)


def _block(size: int, largest: int) -> int:
    """A power of two >= 16 (tl.dot's least) that covers ``size`` up to ``largest``."""
    return max(16, min(largest, triton.next_power_of_2(size)))


_SHARED_MEMORY_HEADROOM = 4096  # Triton asked for 2,304 bytes more than this bound in the one case measured


def _shared_memory(config: triton.Config, dot_bytes: int, rank: int) -> int:
    """A rough bound of the shared memory ``config`` takes, to skip compiling blocks that cannot fit: the dot's
    operand blocks per pipeline stage and depthwise slice, and the float32 output block's change of layout (280,832
    bytes asked in float32 at rank 1 with the largest blocks on an H100: this plus 2,304). Not exact (Triton also
    stages some depthwise taps' loads in float32, more with a larger kernel), so :data:`SINGLE_STAGE` is always
    offered too, and the autotuner times a block that does not fit as infinitely slow."""
    p, m, c = config.kwargs["BLOCK_P"], config.kwargs["BLOCK_M"], config.kwargs["BLOCK_C"]
    return config.num_stages * rank * (p * c + c * m) * dot_bytes + p * m * 4


def _fitting(configs, named_args, **kwargs):
    """The configurations whose channel blocks the layer fills (no output block wider than the layer's) and that
    this GPU's shared memory may hold by :func:`_shared_memory`, and :data:`SINGLE_STAGE` always."""
    m, c, x = named_args["M"], named_args["C"], named_args["x_ptr"]
    # the opt-in limit Triton checks against (232,448 bytes on an H100); not exposed on every build (ROCm)
    limit = getattr(torch.cuda.get_device_properties(x.device), "shared_memory_per_block_optin", None) \
        if x.is_cuda else None
    dot_bytes = 4 if named_args["DOT_FP32"] else 2
    fitting = [cfg for cfg in configs
               if cfg.kwargs["BLOCK_M"] <= _block(m, 512) and cfg.kwargs["BLOCK_C"] <= _block(c, 64)
               and (limit is None or _shared_memory(cfg, dot_bytes, named_args["R"]) + _SHARED_MEMORY_HEADROOM
                    <= limit)]
    return fitting if SINGLE_STAGE in fitting else fitting + [SINGLE_STAGE]


# Tuned per layer geometry, not only per shape: the block tuned for a rank-1 layer was reused for a rank-2 layer of
# the same shape and ran out of shared memory there (an H200, bfloat16, 256 channels at 14x14, benchmarks/kernels.py).
_TUNING_KEY = ["N", "C", "HO", "WO", "M", "R", "KH", "KW", "SH", "SW", "DH", "DW", "TF32"]
_autotuned_kernel = triton.autotune(CONFIGS, key=_TUNING_KEY,
                                    prune_configs_by={"early_config_prune": _fitting})(
    triton.heuristics({"EVEN_C": lambda args: args["C"] % args["BLOCK_C"] == 0})(_separable_conv2d_kernel))


def launch_separable_conv2d(x: torch.Tensor, depthwise_taps: torch.Tensor, pointwise_rows: torch.Tensor,
                            bias: Optional[torch.Tensor], kernel_size: Sequence[int], stride: Sequence[int],
                            padding: Sequence[int], dilation: Sequence[int],
                            config: Optional[triton.Config] = None) -> torch.Tensor:
    """Run the kernel on weights laid out by :func:`dsd.kernels.separable_op.arrange_weights` (in ``x``'s dtype);
    returns an NCHW-shaped tensor in the channels_last memory format. A float32 product follows
    ``torch.backends.cudnn.allow_tf32``, as the convolutions it replaces do. ``config`` (one of :data:`CONFIGS`)
    runs those blocks instead of the autotuned ones (the interpreter's default: the first)."""
    n, c, h, w = x.shape
    (kh, kw), (rank, _, m) = kernel_size, pointwise_rows.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    out = torch.empty((n, ho, wo, m), device=x.device, dtype=x.dtype)
    if not out.numel():  # an empty batch (a detector's mask head on no boxes): no grid to launch
        return out.permute(0, 3, 1, 2)
    interpreted = bool(triton.knobs.runtime.interpret)
    # Triton's interpreter multiplies bfloat16 matrices wrongly; there the dot runs in float32.
    dot_fp32 = x.dtype == torch.float32 or (interpreted and x.dtype == torch.bfloat16)
    tf32 = x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreted
    args = (x_nhwc, depthwise_taps, pointwise_rows, bias if bias is not None else pointwise_rows, out,
            n, h, w, c, ho, wo, m, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], kh, kw,
            rank, bias is not None, dot_fp32, tf32)

    def grid(meta):
        if meta["TILE_W"]:
            tiles = triton.cdiv(ho, meta["BLOCK_P"] // meta["TILE_W"]) * triton.cdiv(wo, meta["TILE_W"])
            return n * tiles, triton.cdiv(m, meta["BLOCK_M"])
        return triton.cdiv(n * ho * wo, meta["BLOCK_P"]), triton.cdiv(m, meta["BLOCK_M"])
    if config is None and interpreted:
        config = CONFIGS[0]
    if config is None:
        _autotuned_kernel[grid](*args)
    else:
        _separable_conv2d_kernel[grid](*args, **config.kwargs, EVEN_C=c % config.kwargs["BLOCK_C"] == 0,
                                       num_warps=config.num_warps, num_stages=config.num_stages)
    return out.permute(0, 3, 1, 2)
