"""The fused kernel's block configurations on a GPU, per layer, against cuDNN (needs CUDA).

    python benchmarks/fused_configs.py

For each layer (3x3, rank 1, bf16, channels_last, batch 64; 64 channels at 56x56, 128 at 28, 256 at 14, 512 at
7) it times, as CUDA-graph replays (``triton.testing.do_bench_cudagraph``, median, microseconds): cuDNN's dense
conv, its pointwise conv alone (the fused kernel's bound), its depthwise and pointwise convs as two kernels; the
fused kernel autotuned on weights already in its layout (as a separable layer keeps them), the same through
``dsd.kernels.separable_conv2d`` (which lays the weights out on every call), each block configuration of
``CONFIGS`` (the five fastest kept), and the fastest configuration with a 1x1 depthwise kernel (the kernel's
matrix product and memory traffic without the taps). ``err``: the fused kernel's relative error against a
float32 reference.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from dsd.kernels import arrange_weights, separable_conv2d
from dsd.kernels.separable_triton import CONFIGS, launch_separable_conv2d
from _results import write

LAYERS = [(64, 56), (128, 28), (256, 14), (512, 7)]  # channels, size
BATCH, DTYPE = 64, torch.bfloat16


def microseconds(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return round(do_bench_cudagraph(fn, rep=30, return_mode="median") * 1000, 2)


def describe(config) -> str:
    k = config.kwargs
    return (f"P{k['BLOCK_P']}/T{k['TILE_W']}/M{k['BLOCK_M']}/C{k['BLOCK_C']}"
            f"/w{config.num_warps}/s{config.num_stages}")


def layer_row(c: int, size: int, start: float) -> dict:
    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=DTYPE)
    x = randn(BATCH, c, size, size).contiguous(memory_format=torch.channels_last)
    dense = randn(c, c, 3, 3).contiguous(memory_format=torch.channels_last)
    dw, dw1, pw = randn(c, 1, 3, 3), randn(c, 1, 1, 1), randn(c, c, 1, 1)
    taps, rows = arrange_weights(dw, pw, c)
    taps1, _ = arrange_weights(dw1, pw, c)
    ref = F.conv2d(F.conv2d(x.float(), dw.float(), None, 1, 1, groups=c), pw.float())
    got = separable_conv2d(x, dw, pw, None, 1, 1, 1).float()

    def fused(config=None, kernel=(3, 3), padding=(1, 1), depthwise=taps):
        return lambda: launch_separable_conv2d(x, depthwise, rows, None, kernel, (1, 1), padding, (1, 1), config)
    row = dict(C=c, err=round(((got - ref).norm() / ref.norm()).item(), 5),
               dense=microseconds(lambda: F.conv2d(x, dense, None, 1, 1)), pw=microseconds(lambda: F.conv2d(x, pw)),
               pair=microseconds(lambda: F.conv2d(F.conv2d(x, dw, None, 1, 1, groups=c), pw)),
               autotuned_arranged=microseconds(fused()),
               public_op=microseconds(lambda: separable_conv2d(x, dw, pw, None, 1, 1, 1)))
    per_config = sorted((microseconds(fused(config)), describe(config), i)
                        for i, config in enumerate(CONFIGS) if config.kwargs["BLOCK_M"] <= c)
    best = CONFIGS[per_config[0][2]]
    row.update(configs=per_config[:5], gemm_only_1x1=microseconds(fused(best, (1, 1), (0, 0), taps1)),
               elapsed=round(time.time() - start))
    print(row, flush=True)
    return row


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("fused_configs.py needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    start = time.time()
    rows = [layer_row(c, size, start) for c, size in LAYERS]
    print(f"wrote {write('fused_configs_gpu', rows)}")


if __name__ == "__main__":
    main()
