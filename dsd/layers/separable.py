"""The depthwise-separable replacement for a dense ``nn.Conv2d``."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ..kernels import fused_kernel_enabled, separable_conv2d
from .padding import TF_SAME, PaddingSpec, is_symmetric, tf_same_pad

__all__ = ["DepthwiseSeparableConv2d"]


def _is_nhwc(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


# Up to this many input channels, rank r runs as one depthwise conv with depth multiplier r: with so few
# groups it is a (grouped) dense conv on the fast kernels, where r rank-1 slices would cost r conv launches
# (CREPE's 1-channel conv at rank 64 made the model 6x slower than its original as slices; from 16 channels
# on, slices win at low ranks).
MULTIPLIER_FORM_CHANNELS = 8


class DepthwiseSeparableConv2d(nn.Module):
    """Depthwise KxK conv (``groups=in_channels``, depth multiplier ``rank``) then a pointwise 1x1 conv.

    Stride and dilation act on the depthwise conv; the bias lives on the pointwise conv, which is
    grouped like the dense conv it replaces. ``padding`` is ``((top, bottom), (left, right))`` or
    ``"tf_same"`` (input-size dependent, like timm's ``Conv2dSame``); symmetric padding is done by the
    depthwise conv itself, anything else by an explicit ``F.pad`` first.
    """

    _slice_cache: Optional[Tuple[tuple, torch.Tensor, torch.Tensor]] = None  # see _slice_weights

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: Union[int, Tuple[int, int]],
            rank: int = 1,
            stride: Union[int, Tuple[int, int]] = 1,
            padding: PaddingSpec = ((0, 0), (0, 0)),
            dilation: Union[int, Tuple[int, int]] = 1,
            groups: int = 1,
            bias: bool = True,
            padding_mode: str = "zeros",
            device=None,
            dtype=None,
    ):
        super().__init__()
        if padding_mode not in _PAD_MODES:
            raise ValueError(f"padding_mode must be one of {sorted(_PAD_MODES)}, got {padding_mode!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must divide by groups={groups}")
        self.in_channels, self.out_channels, self.rank, self.groups = in_channels, out_channels, rank, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if padding == TF_SAME else tuple(tuple(int(p) for p in axis) for axis in padding)
        self.padding_mode = padding_mode
        conv_padding = (self.padding[0][0], self.padding[1][0]) if is_symmetric(self.padding) else (0, 0)
        # F.pad takes (left, right, top, bottom); None means the depthwise conv pads by itself.
        self._explicit_pad: Optional[Tuple[int, int, int, int]] = None
        if padding != TF_SAME and not is_symmetric(self.padding):
            (top, bottom), (left, right) = self.padding
            self._explicit_pad = (left, right, top, bottom)
        factory = dict(device=device, dtype=dtype)
        self.depthwise = nn.Conv2d(
            in_channels, in_channels * rank, self.kernel_size, self.stride, conv_padding, self.dilation,
            groups=in_channels, bias=False, padding_mode=padding_mode if conv_padding != (0, 0) else "zeros",
            **factory)
        self.pointwise = nn.Conv2d(in_channels * rank, out_channels, 1, groups=groups, bias=bias, **factory)
        # what the fused CUDA kernel computes: symmetric zero padding, an ungrouped pointwise conv
        self._fusable = groups == 1 and self._explicit_pad is None and padding != TF_SAME and (
            padding_mode == "zeros" or conv_padding == (0, 0))

    @property
    def weight(self) -> torch.Tensor:
        """The depthwise weight, for code that reads ``conv.weight.dtype`` or ``.device`` of a conv layer."""
        return self.depthwise.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.pointwise.bias

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == TF_SAME:
            (top, bottom), (left, right) = (
                tf_same_pad(size, k, s, d)
                for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation))
            return F.pad(x, (left, right, top, bottom))
        if self._explicit_pad is None:
            return x
        mode = _PAD_MODES[self.padding_mode]
        if mode != "constant" and min(self._explicit_pad) < 0:
            # Only constant padding accepts negative (cropping) amounts: crop first, then pad.
            x = F.pad(x, tuple(min(p, 0) for p in self._explicit_pad))
            return F.pad(x, tuple(max(p, 0) for p in self._explicit_pad), mode=mode)
        return F.pad(x, self._explicit_pad, mode=mode)

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the depthwise kernel sees it, every kind of padding applied (for calibration)."""
        x = self._pad(x)
        ph, pw = self.depthwise.padding
        return F.pad(x, (pw, pw, ph, ph), mode=_PAD_MODES[self.padding_mode]) if ph or pw else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self._fusable and not torch.is_grad_enabled() and fused_kernel_enabled():
            return separable_conv2d(x, self.depthwise.weight, self.pointwise.weight, self.pointwise.bias,
                                    self.stride, self.depthwise.padding, self.dilation)
        x = self._pad(x)
        if self.rank == 1 or self.in_channels <= MULTIPLIER_FORM_CHANNELS:
            return self.pointwise(self.depthwise(x))
        return self._rank_slices_forward(x)

    def _rank_slices_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rank r as the sum of r rank-1 separable convs: the same sums, on the fast depthwise kernels.

        With many channels, a depthwise conv with a depth multiplier falls off the fast kernels (3-8x slower
        on a CPU, 13-24x in bf16 channels_last on a GPU). Depthwise channel ``c*r + j`` is slice ``j`` of input
        channel ``c``, and pointwise input ``c*r + j`` (within each group) its weight; summing the per-slice
        pointwise products avoids concatenating the slices (a strided copy in channels_last).
        """
        dw, g = self.depthwise, self.groups
        depthwise, pointwise = self._slice_weights()
        out = F.conv2d(dw._conv_forward(x, depthwise[0], None), pointwise[0], self.pointwise.bias, groups=g)
        for j in range(1, self.rank):
            z = dw._conv_forward(x, depthwise[j], None)
            weight = pointwise[j, :, :, 0, 0].to(out.dtype)  # (M, C); in-place GEMMs are not autocast
            # accumulate in place, as one GEMM into the output: no temporary the size of the output, no add pass
            if g == 1 and _is_nhwc(out) and _is_nhwc(z):
                out.permute(0, 2, 3, 1).view(-1, self.out_channels).addmm_(
                    z.permute(0, 2, 3, 1).reshape(-1, self.in_channels), weight.t())
            elif g == 1 and out.dim() == 4 and out.is_contiguous() and z.is_contiguous():  # NCHW
                n = out.shape[0]
                out.view(n, self.out_channels, -1).baddbmm_(weight.expand(n, -1, -1), z.view(n, self.in_channels, -1))
            else:
                out = out + F.conv2d(z, pointwise[j], None, groups=g)
        return out

    def _slice_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The weights slice-major, each slice contiguous: depthwise (r, C, 1, kh, kw), pointwise (r, M, C/g, 1, 1).

        A strided slice sends the conv down a slow path (about 5x on a CPU), and re-laying the weights out on
        every call cost up to a third of the layer's time (512 channels at 7x7, batch 8, CPU). So where autograd
        does not record, the layout is kept until the weights change (a new version or storage: optimizer steps,
        ``load_state_dict``, ``.to()``; not writes through ``.data``, which PyTorch hides from version counters).
        """
        dw, pw, r = self.depthwise.weight, self.pointwise.weight, self.rank

        def layout() -> Tuple[torch.Tensor, torch.Tensor]:
            return (dw.view(self.in_channels, r, *dw.shape[1:]).transpose(0, 1).contiguous(),
                    pw.view(self.out_channels, -1, r, 1, 1).permute(2, 0, 1, 3, 4).contiguous())
        # inference tensors (weights made under torch.inference_mode) have no version counter: never kept
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or dw.is_inference() or pw.is_inference():
            return layout()
        key = (dw._version, pw._version, dw.data_ptr(), pw.data_ptr(), dw.device)
        if self._slice_cache is None or self._slice_cache[0] != key:
            self._slice_cache = (key, *layout())
        return self._slice_cache[1], self._slice_cache[2]

    def _apply(self, fn, recurse=True):
        self._slice_cache = None  # the weights move or change dtype: drop the old layout with them
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_slice_cache", None)  # a copy or a pickle re-derives it
        return state

    def extra_repr(self) -> str:
        parts = [
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}",
            f"stride={self.stride}",
        ]
        if self.padding == TF_SAME:
            parts.append("padding=tf_same")
        elif any(p for axis in self.padding for p in axis):
            parts.append(f"padding={self.padding}")
        if self.dilation != (1, 1):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.padding_mode != "zeros":
            parts.append(f"padding_mode={self.padding_mode}")
        if self.pointwise.bias is None:
            parts.append("bias=False")
        return ", ".join(parts)
