"""``separable_conv2d``: depthwise then pointwise convolution as one op (``torch.ops.dsd.separable_conv2d``).

On CUDA, for float32/float16/bfloat16 with an ungrouped pointwise conv, it runs the fused Triton kernel;
everywhere else it computes the same function as two ``conv2d`` calls. It is a registered custom op (with
a fake implementation for shapes), so ``torch.compile`` and ``torch.export`` treat it as one opaque node.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

__all__ = ["separable_conv2d", "arranged_separable_conv2d", "arrange_weights", "standard_weights",
           "reference_separable_conv2d", "interpreted_separable_conv2d", "FUSED_DTYPES", "use_fused_kernel",
           "fused_kernel_enabled"]

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Off until benchmarks/kernels.py measures it faster on a GPU: a kernel of this design measured 0.67-0.88x of
# the dense conv on an H100, slower than cuDNN's two kernels (../shared/notes/speed-facts.md, section 2).
_FUSED = {"enabled": os.environ.get("DSD_FUSED_KERNEL", "0") == "1"}


def use_fused_kernel(enabled: bool = True) -> None:
    """Let ``DepthwiseSeparableConv2d`` time the fused kernel among its forms on CUDA at eager inference and
    take it where it measures fastest (also ``DSD_FUSED_KERNEL=1``)."""
    _FUSED["enabled"] = bool(enabled)


def fused_kernel_enabled() -> bool:
    return _FUSED["enabled"]
IntPair = Union[int, Sequence[int]]


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def reference_separable_conv2d(x: torch.Tensor, depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor,
                               bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                               dilation: Sequence[int]) -> torch.Tensor:
    """The definition: ``conv2d(conv2d(x, dw, stride, padding, dilation, groups=C), pw, bias)``."""
    depthwise = F.conv2d(x, depthwise_weight, None, stride, padding, dilation, groups=x.shape[1])
    groups = depthwise.shape[1] // pointwise_weight.shape[1]
    return F.conv2d(depthwise, pointwise_weight, bias, groups=groups)


def arrange_weights(depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor,
                    in_channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's weight layouts, channels innermost so that its loads are contiguous: the depthwise
    taps as ``(KH*KW, R, C)`` from ``(C*R, 1, KH, KW)``, the pointwise weights as ``(R, C, M)`` from
    ``(M, C*R, 1, 1)``."""
    c, m = in_channels, pointwise_weight.shape[0]
    rank, taps = depthwise_weight.shape[0] // c, depthwise_weight.shape[2] * depthwise_weight.shape[3]
    return (depthwise_weight.reshape(c, rank, taps).permute(2, 1, 0).contiguous(),
            pointwise_weight.reshape(m, c, rank).permute(2, 1, 0).contiguous())


def standard_weights(depthwise_taps: torch.Tensor, pointwise_rows: torch.Tensor,
                     kernel_size: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`arrange_weights`."""
    _, rank, c = depthwise_taps.shape
    return (depthwise_taps.permute(2, 1, 0).reshape(c * rank, 1, *kernel_size),
            pointwise_rows.permute(2, 1, 0).reshape(pointwise_rows.shape[2], c * rank, 1, 1))


@torch.library.custom_op("dsd::separable_conv2d", mutates_args=())
def _separable_conv2d_op(x: torch.Tensor, depthwise_taps: torch.Tensor, pointwise_rows: torch.Tensor,
                         bias: Optional[torch.Tensor], kernel_size: List[int], stride: List[int], padding: List[int],
                         dilation: List[int]) -> torch.Tensor:
    if x.is_cuda and x.dtype in FUSED_DTYPES:
        from .separable_triton import launch_separable_conv2d
        return launch_separable_conv2d(x, depthwise_taps.to(x.dtype), pointwise_rows.to(x.dtype), bias, kernel_size,
                                       stride, padding, dilation)
    out = reference_separable_conv2d(x, *standard_weights(depthwise_taps, pointwise_rows, kernel_size), bias, stride,
                                     padding, dilation)
    return out.contiguous(memory_format=torch.channels_last)  # the fused kernel's layout, whichever path ran


@_separable_conv2d_op.register_fake
def _(x, depthwise_taps, pointwise_rows, bias, kernel_size, stride, padding, dilation):
    n, _, h, w = x.shape
    size = (n, pointwise_rows.shape[2], _output_size(h, kernel_size[0], stride[0], padding[0], dilation[0]),
            _output_size(w, kernel_size[1], stride[1], padding[1], dilation[1]))
    return x.new_empty(size).contiguous(memory_format=torch.channels_last)


def _setup_context(ctx, inputs, output) -> None:
    x, depthwise_taps, pointwise_rows, bias, kernel_size, stride, padding, dilation = inputs
    ctx.save_for_backward(x, depthwise_taps, pointwise_rows, bias)
    ctx.geometry = (kernel_size, stride, padding, dilation)


def _backward(ctx, grad):
    """Gradients of the two-conv definition (training runs the two convs; this keeps the op differentiable)."""
    tensors = [t.detach().requires_grad_(needs) if t is not None else None
               for t, needs in zip(ctx.saved_tensors, ctx.needs_input_grad[:4])]
    x, depthwise_taps, pointwise_rows, bias = tensors
    kernel_size, stride, padding, dilation = ctx.geometry
    with torch.enable_grad():
        out = reference_separable_conv2d(x, *standard_weights(depthwise_taps, pointwise_rows, kernel_size), bias,
                                         stride, padding, dilation)
        wanted = [t for t in tensors if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad.to(out.dtype)) if wanted else [])
    return (*[next(grads) if t is not None and t.requires_grad else None for t in tensors], None, None, None, None)


_separable_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor) -> None:
    c = x.shape[1]
    if depthwise_weight.dim() != 4 or depthwise_weight.shape[1] != 1 or depthwise_weight.shape[0] % c:
        raise ValueError(f"depthwise_weight must be (C*rank, 1, kh, kw) for C={c}, got {tuple(depthwise_weight.shape)}")
    if pointwise_weight.dim() != 4 or pointwise_weight.shape[2:] != (1, 1) \
            or depthwise_weight.shape[0] % pointwise_weight.shape[1]:
        raise ValueError(f"pointwise_weight must be (M, C*rank/groups, 1, 1), got {tuple(pointwise_weight.shape)}")


def arranged_separable_conv2d(x: torch.Tensor, depthwise_taps: torch.Tensor, pointwise_rows: torch.Tensor,
                              bias: Optional[torch.Tensor], kernel_size: Sequence[int], stride: Sequence[int],
                              padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """:func:`separable_conv2d` on weights already laid out by :func:`arrange_weights` (a layer keeps them so)."""
    return torch.ops.dsd.separable_conv2d(x, depthwise_taps, pointwise_rows, bias, list(kernel_size), list(stride),
                                          list(padding), list(dilation))


def separable_conv2d(x: torch.Tensor, depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
                     dilation: IntPair = 1) -> torch.Tensor:
    """``conv2d(conv2d(x, depthwise_weight, None, stride, padding, dilation, groups=C), pointwise_weight, bias)``,
    fused on CUDA for an ungrouped pointwise conv. The rank is ``depthwise_weight.shape[0] // C``; padding is
    symmetric (zeros)."""
    _check(x, depthwise_weight, pointwise_weight)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if pointwise_weight.shape[1] != depthwise_weight.shape[0]:  # a grouped pointwise conv: the two convs
        return reference_separable_conv2d(x, depthwise_weight, pointwise_weight, bias, stride, padding, dilation)
    return arranged_separable_conv2d(x, *arrange_weights(depthwise_weight, pointwise_weight, x.shape[1]), bias,
                                     depthwise_weight.shape[2:], stride, padding, dilation)


def interpreted_separable_conv2d(x: torch.Tensor, depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor,
                                 bias: Optional[torch.Tensor] = None, stride: IntPair = 1, padding: IntPair = 0,
                                 dilation: IntPair = 1, config: int = 0) -> torch.Tensor:
    """The fused Triton kernel itself on CPU tensors, run by Triton's interpreter: slow, for exactness tests.
    ``config``: which of the autotuner's block configurations (``separable_triton.CONFIGS``) runs.

    Needs ``TRITON_INTERPRET=1`` in the environment before Triton is first imported."""
    import triton

    from .separable_triton import CONFIGS, launch_separable_conv2d
    if not triton.knobs.runtime.interpret:
        raise RuntimeError("set TRITON_INTERPRET=1 before importing triton to run the kernel on the CPU")
    _check(x, depthwise_weight, pointwise_weight)
    if pointwise_weight.shape[1] != depthwise_weight.shape[0]:
        raise ValueError("the fused kernel takes an ungrouped pointwise conv")
    taps, rows = (w.to(x.dtype) for w in arrange_weights(depthwise_weight, pointwise_weight, x.shape[1]))
    return launch_separable_conv2d(x, taps, rows, bias, depthwise_weight.shape[2:], _pair(stride), _pair(padding),
                                   _pair(dilation), CONFIGS[config])
