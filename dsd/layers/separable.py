"""The depthwise-separable replacement for a dense ``nn.Conv2d``."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .forms import FORMS, run_form
from .padding import TF_SAME, PaddingSpec, is_symmetric, tf_same_pad

__all__ = ["DepthwiseSeparableConv2d"]


_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _in_dtype(weights: Tuple[torch.Tensor, ...], dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, ...]:
    return weights if dtype is None else tuple(w.to(dtype) for w in weights)


class DepthwiseSeparableConv2d(nn.Module):
    """Depthwise KxK conv (``groups=in_channels``, depth multiplier ``rank``) then a pointwise 1x1 conv.

    Stride and dilation act on the depthwise conv; the bias lives on the pointwise conv, which is
    grouped like the dense conv it replaces. ``padding`` is ``((top, bottom), (left, right))`` or
    ``"tf_same"`` (input-size dependent, like timm's ``Conv2dSame``); symmetric padding is done by the
    depthwise conv itself, anything else by an explicit ``F.pad`` first. The output is computed in whichever
    form of this function measures fastest (:mod:`dsd.layers.forms`): the parameters are these two convs'.
    """

    # per form, weights laid out for it and the key they were made under (see kept_weights)
    _kept: Optional[Dict[str, Tuple[tuple, Tuple[torch.Tensor, ...]]]] = None
    _tuned_forms: Optional[Dict[tuple, str]] = None  # kind of input -> fastest form (see dsd.layers.forms)
    pinned_form: Optional[str] = None  # the form every call computes in, whatever is measured (see pin_form)

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
        return run_form(self, self._pad(x))

    def kept_weights(self, form: str, make: Callable[["DepthwiseSeparableConv2d"], Tuple[torch.Tensor, ...]],
                     layout: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, ...]:
        """``make(self)``: the weights laid out for ``form``, kept between calls where autograd does not record;
        ``layout`` tells apart layouts of one form (made anew when it changes). ``dtype``: cast to it, as autocast
        would (float64 weights stay as they are, as autocast leaves them).

        Making them on every call cost up to a third of a rank-2 layer's time (512 channels at 7x7, batch 8,
        CPU). They are renewed when the weights change (a new version or storage: optimizer steps,
        ``load_state_dict``, ``.to()``; not writes through ``.data``, which PyTorch hides from version counters).
        This runs on every inference call: each ``nn.Module`` attribute lookup costs about a microsecond here.
        """
        dw, pw = self.depthwise.weight, self.pointwise.weight
        if dtype == dw.dtype or dw.dtype == torch.float64:
            dtype = None
        # inference tensors (weights made under torch.inference_mode) have no version counter, and a trace
        # or a compiled graph must read the parameters, not a copy made before: never kept there
        if (torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or dw.is_inference() or pw.is_inference()):
            return _in_dtype(make(self), dtype)
        key = (dw._version, pw._version, dw.data_ptr(), pw.data_ptr(), dw.device, dw.dtype, layout, dtype)
        if self._kept is None:
            self._kept = {}
        if form not in self._kept or self._kept[form][0] != key:
            self._kept[form] = (key, _in_dtype(make(self), dtype))
        return self._kept[form][1]

    def pin_form(self, form: Optional[str]) -> "DepthwiseSeparableConv2d":
        """Compute every call in ``form`` (one of :data:`dsd.layers.forms.FORMS`), in eager mode and in what a
        trace or an export records, instead of timing the forms or taking the static rule; ``None`` unpins.
        The ONNX export pins each layer to the form that runs fastest in ONNX Runtime."""
        if form is not None and form not in FORMS:
            raise ValueError(f"form must be one of {sorted(FORMS)} or None, got {form!r}")
        self.pinned_form = form
        return self

    def release_kept_weights(self, keep: Set[str]) -> None:
        """Drop the weights kept for every form not in ``keep``."""
        if self._kept:
            self._kept = {form: kept for form, kept in self._kept.items() if form in keep}

    def tuned_forms(self) -> Dict[tuple, str]:
        """The form measured fastest for each kind of input so far (:func:`dsd.layers.forms.choose_form`)."""
        if self._tuned_forms is None:
            self._tuned_forms = {}
        return self._tuned_forms

    def _apply(self, fn, recurse=True):
        # the weights move or change dtype: drop their layouts, and the timings made where they were
        self._kept, self._tuned_forms = None, None
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_kept", None)  # a copy or a pickle re-derives these; it may run on another machine
        state.pop("_tuned_forms", None)
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
        if self.pinned_form is not None:
            parts.append(f"form={self.pinned_form}")
        return ", ".join(parts)
