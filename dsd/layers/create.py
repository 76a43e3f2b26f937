"""Plan and build the separable replacement of one conv: ``from_conv`` and the pieces it is made of."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..errors import DsdError
from ..modes import full_precision
from .adapters import get_conv_adapter
from .decouple import assigns_parameters, full_rank, initialize, list_initializers, resample_taps
from .padding import conv_padding, matched_padding
from .separable import DepthwiseSeparableConv2d
from .spec import LayerSpec

__all__ = ["DATA_INIT", "SkipLayer", "layer_spec", "build_layer", "build_layers", "from_conv", "shrink_kernel",
           "check_layer_args", "check_weight", "effective_weight",
           "FULL_RANK"]

FULL_RANK = "full"
DATA_INIT = "data"
Rank = Union[int, str]


class SkipLayer(DsdError):
    """This conv is left as it is; ``category`` groups the reasons in the report (from :func:`from_conv`: an error)."""

    def __init__(self, category: str, detail: str):
        super().__init__(f"{category}: {detail}")
        self.category, self.detail = category, detail


def check_layer_args(rank: Rank, dilation: Optional[int], keep_receptive_field: Union[bool, int], init: str) -> None:
    """Raise DsdError naming the argument when one is out of range."""
    if rank != FULL_RANK and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise DsdError(f"rank must be a positive integer or {FULL_RANK!r}, got {rank!r}")
    if dilation is not None and (isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1):
        raise DsdError(f"dilation must be an integer >= 1, got {dilation!r}")
    if not isinstance(keep_receptive_field, bool) and (
            not isinstance(keep_receptive_field, int) or keep_receptive_field < 2):
        raise DsdError(f"keep_receptive_field must be True/False or a kernel size >= 2, got {keep_receptive_field!r}")
    if keep_receptive_field and dilation is not None:
        raise DsdError("dilation and keep_receptive_field both set the dilation: choose one")
    if init != DATA_INIT and init not in list_initializers():  # "data": convert_model runs it, with calibration data
        raise DsdError(f"unknown init {init!r}: choose one of {', '.join([*list_initializers(), DATA_INIT])}")


def shrink_kernel(kernel: int, target: Optional[int] = None) -> Optional[Tuple[int, int]]:
    """A smaller kernel whose dilated taps span the same extent: (new_kernel, tap_step), or None.

    ``target`` asks for a specific kernel size; otherwise the smallest kernel of at least 3 taps.
    5 -> (3, 2), 7 -> (3, 3), 7 with target 4 -> (4, 2).
    """
    candidates = [target] if target else range(3, kernel)
    for new in candidates:
        if 2 <= new < kernel and (kernel - 1) % (new - 1) == 0:
            return new, (kernel - 1) // (new - 1)
    return None


def check_weight(conv: nn.Module, name: str = "") -> None:
    """Refuse weights the decoupling cannot use: not floating point, or holding NaN/inf."""
    weight, where = conv.weight, f"layer {name!r}" if name else "the conv"
    if not weight.is_floating_point():
        raise DsdError(f"{where} has {weight.dtype} weights; dsd decouples floating-point weights: "
                       "convert the model with .float() first")
    # a sum propagates NaN and inf in one vectorised pass (2x aminmax's speed), without a mask the size of the
    # weight; only where it is not finite (or overflows) are the values counted
    if weight.device.type != "meta" and weight.numel() and not torch.isfinite(weight.detach().sum()):
        bad = int((~torch.isfinite(weight)).sum())
        if bad:
            raise DsdError(f"{where} has {bad} NaN or inf weight values; the model is broken: fix or retrain it first")


def layer_spec(
        conv: nn.Module,
        rank: Rank = 1,
        dilation: Optional[int] = None,
        keep_receptive_field: Union[bool, int] = False,
        init: str = "svd",
        name: str = "",
        single_channel: bool = False,
) -> LayerSpec:
    """The separable geometry for ``conv``; raises :class:`SkipLayer` where none applies.

    A conv with one input channel is a bank of filters; its rank-r form (r basis filters, then a 1x1 mix) is
    offered only with ``single_channel`` (dsd does so under a budget)."""
    adapter = get_conv_adapter(conv)
    cls_name = f"{type(conv).__module__}.{type(conv).__qualname__}"
    if adapter is None:
        raise SkipLayer("unsupported subclass",
                        f"{cls_name} may compute more than a plain conv; register a dsd ConvAdapter for it")
    kernel, conv_dilation = tuple(conv.kernel_size), tuple(conv.dilation)
    if kernel == (1, 1):
        raise SkipLayer("1x1 kernel", "a pointwise conv has nothing to separate")
    if conv.in_channels == 1 and not single_channel:
        raise SkipLayer("single input channel", f"one input channel: the conv is one bank of {conv.out_channels} "
                        "filters, of which a uniform rank r keeps r; converted only under a budget, which weighs "
                        "that error against the savings")
    if conv.groups == conv.in_channels and conv.in_channels > 1:
        multiplier = conv.out_channels // conv.in_channels
        raise SkipLayer("already depthwise", f"groups == in_channels == {conv.in_channels}"
                        + (f" (depth multiplier {multiplier})" if multiplier > 1 else ""))

    new_kernel, new_dilation, step = kernel, conv_dilation, (1, 1)
    if keep_receptive_field:
        target = None if keep_receptive_field is True else int(keep_receptive_field)
        shrunk = [shrink_kernel(k, target) for k in kernel]
        if not any(shrunk):
            raise SkipLayer("receptive field", f"no smaller dilated kernel spans a {kernel[0]}x{kernel[1]} kernel")
        new_kernel = tuple(s[0] if s else k for s, k in zip(shrunk, kernel))
        step = tuple(s[1] if s else 1 for s in shrunk)
        new_dilation = tuple(d * t for d, t in zip(conv_dilation, step))
    elif dilation is not None:
        new_dilation = tuple(dilation if k > 1 else 1 for k in kernel)

    q = full_rank(conv.out_channels, conv.groups, new_kernel)
    rank = q if rank == FULL_RANK else min(int(rank), q)
    padding = conv_padding(conv, adapter.dynamic_same(conv))
    return LayerSpec(
        name=name, conv_class=cls_name, in_channels=conv.in_channels, out_channels=conv.out_channels,
        kernel_size=kernel, stride=tuple(conv.stride), padding=padding, dilation=conv_dilation,
        groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode, rank=rank,
        new_kernel_size=new_kernel, new_dilation=new_dilation,
        new_padding=matched_padding(padding, kernel, conv_dilation, new_kernel, new_dilation),
        tap_step=step, init=init)


def effective_weight(conv: nn.Module, spec: LayerSpec) -> torch.Tensor:
    """The weight the dense conv applies (its adapter's view), on the taps the spec's kernel keeps."""
    return resample_taps(get_conv_adapter(conv).effective_weight(conv), spec.tap_step)


def build_layer(conv: nn.Module, spec: LayerSpec) -> Tuple[DepthwiseSeparableConv2d, LayerSpec]:
    """Build ``spec``'s layer on ``conv``'s device and dtype, initialised from ``conv``'s effective weight."""
    return build_layers([(conv, spec)])[0]


@torch.no_grad()
@full_precision()
def build_layers(pairs: Sequence[Tuple[nn.Module, LayerSpec]]) -> List[Tuple[DepthwiseSeparableConv2d, LayerSpec]]:
    """:func:`build_layer` for each ``(conv, spec)``, each initialiser run once over all its layers (``svd``
    decouples them in one batched computation)."""
    # built on meta; svd gives them the decoupled tensors as parameters, other initialisers get them allocated and
    # write every weight (PyTorch's random init is skipped either way). Never as inference tensors (a conversion
    # under torch.inference_mode): with no version counter to say when they change, a layer could not keep its
    # weights' layouts between calls (its dense form ran 1.4x slower)
    errors: List[Optional[float]] = [None] * len(pairs)
    with torch.inference_mode(False):
        modules = [spec.build(device="meta", dtype=conv.weight.dtype) for conv, spec in pairs]
        for init in dict.fromkeys(spec.init for _, spec in pairs):
            members = [i for i, (_, spec) in enumerate(pairs) if spec.init == init]
            assign = assigns_parameters(init)
            if not assign:
                for i in members:
                    modules[i] = modules[i].to_empty(device=pairs[i][0].weight.device)
            triples = [(modules[i], effective_weight(*pairs[i]), pairs[i][0].bias) for i in members]
            for i, error in zip(members, initialize(init, triples, assign)):
                errors[i] = error
    return [(module, spec.with_error(error)) for module, (_, spec), error in zip(modules, pairs, errors)]


def from_conv(
        conv: nn.Module,
        rank: Rank = 1,
        dilation: Optional[int] = None,
        keep_receptive_field: Union[bool, int] = False,
        init: str = "svd",
) -> DepthwiseSeparableConv2d:
    """A depthwise-separable layer that replaces ``conv`` and keeps its output shape for every input.

    ``rank`` is the depth multiplier (``"full"``: exact decoupling); ``dilation`` dilates the depthwise
    kernel; ``keep_receptive_field`` turns a large kernel into a smaller dilated one of the same extent
    (``True``: smallest such kernel; an int: that kernel size).
    """
    check_layer_args(rank, dilation, keep_receptive_field, init)
    spec = layer_spec(conv, rank, dilation, keep_receptive_field, init)
    check_weight(conv)
    module, _ = build_layer(conv, spec)
    return module
