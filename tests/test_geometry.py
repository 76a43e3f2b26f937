"""Property tests: a converted conv keeps the original's output shape for any geometry and input size."""
import copy
from unittest import mock

import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dsd.convert import from_conv
from dsd.layers.create import shrink_kernel
from dsd.layers.separable import MULTIPLIER_FORM_CHANNELS, DepthwiseSeparableConv2d
from dsd.layers.padding import matched_padding, output_size


@st.composite
def conv_and_input(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(st.one_of(st.sampled_from(["same", "valid"]), st.integers(0, 4),
                             st.tuples(st.integers(0, 4), st.integers(0, 4))))
    stride = 1 if padding == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, dilation, groups,
                     bias=draw(st.booleans()), padding_mode=mode)
    size = (draw(st.integers(1, 23)), draw(st.integers(1, 23)))
    return conv, torch.randn(1, in_channels, *size)


def _original_output(conv, x):
    try:
        return conv(x)
    except RuntimeError:  # input too small for this conv (or its padding mode): not a valid case
        assume(False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_and_input(), rank=st.integers(1, 3))
def test_same_output_shape_any_geometry(case, rank):
    conv, x = case
    assume(conv.kernel_size != (1, 1) and conv.groups != conv.in_channels)
    expected = _original_output(conv, x)
    assert from_conv(conv, rank=rank)(x).shape == expected.shape


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_and_input(), new_dilation=st.integers(1, 3), keep_rf=st.booleans())
def test_same_output_shape_with_new_dilation(case, new_dilation, keep_rf):
    conv, x = case
    assume(conv.kernel_size != (1, 1) and conv.groups != conv.in_channels)
    if keep_rf:
        assume(any(shrink_kernel(k) for k in conv.kernel_size))
        sep = from_conv(conv, keep_receptive_field=True)
    else:
        sep = from_conv(conv, dilation=new_dilation)
    if conv.padding_mode in ("reflect", "circular"):
        # As in PyTorch, these modes cannot pad by more than the input size; a wider kernel needs more.
        assume(max(abs(p) for axis in sep.padding for p in axis) < min(x.shape[-2:]))
    expected = _original_output(conv, x)
    assert sep(x).shape == expected.shape


@given(size=st.integers(1, 64), kernel=st.integers(1, 7), dilation=st.integers(1, 3), stride=st.integers(1, 3),
       before=st.integers(0, 4), after=st.integers(0, 4), new_kernel=st.integers(1, 7), new_dilation=st.integers(1, 3))
def test_matched_padding_rule(size, kernel, dilation, stride, before, after, new_kernel, new_dilation):
    """The issue's rule: 2*pad - dilation*(k-1) is the same for the new conv, per axis."""
    (new_before, new_after), _ = matched_padding(((before, after), (0, 0)), (kernel, 1), (dilation, 1),
                                                 (new_kernel, 1), (new_dilation, 1))
    assert new_before + new_after - new_dilation * (new_kernel - 1) == before + after - dilation * (kernel - 1)
    assume(output_size(size, kernel, stride, before, after, dilation) >= 1)
    assert (output_size(size, new_kernel, stride, new_before, new_after, new_dilation)
            == output_size(size, kernel, stride, before, after, dilation))


def _multiplier_forward(sep, x):
    """The textbook computation: one depthwise conv with depth multiplier ``rank``, then the pointwise conv."""
    return sep.pointwise(sep.depthwise(sep._pad(x)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_and_input(), rank=st.integers(1, 5), new_dilation=st.one_of(st.none(), st.integers(1, 3)),
       channels_last=st.booleans(), slices=st.booleans())
def test_fast_rank_r_forward_is_the_same_function(case, rank, new_dilation, channels_last, slices):
    """Whatever formulation the module computes rank r with, it is the depth-multiplier conv's function.
    ``slices``: the rank-1 slice form even for the few channels drawn here (where the module would not use it)."""
    conv, x = case
    assume(conv.kernel_size != (1, 1) and conv.groups != conv.in_channels)
    _original_output(conv, x)
    sep = from_conv(conv.double(), rank=rank, dilation=new_dilation, init="random").double()
    x = x.double()
    if conv.padding_mode in ("reflect", "circular"):
        assume(max(abs(p) for axis in sep.padding for p in axis) < min(x.shape[-2:]))
    if channels_last:
        sep, x = sep.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with mock.patch("dsd.layers.separable.MULTIPLIER_FORM_CHANNELS", 0 if slices else MULTIPLIER_FORM_CHANNELS):
        expected = _multiplier_forward(sep, x)
        torch.testing.assert_close(sep(x), expected, rtol=1e-12, atol=1e-12)
        with torch.no_grad():  # inference: the slice layout is made, then kept
            for _ in range(2):
                torch.testing.assert_close(sep(x), expected, rtol=1e-12, atol=1e-12)


def test_the_kept_slice_layout_follows_the_weights():
    """Inference keeps the rank-r slice layout between calls; every way PyTorch changes weights renews it."""
    sep = DepthwiseSeparableConv2d(16, 24, 3, rank=3, padding=((1, 1), (1, 1)), dtype=torch.float64)
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    optimizer = torch.optim.SGD(sep.parameters(), lr=0.5)

    def check(tolerance=1e-12):
        with torch.no_grad():
            inputs = x.to(sep.weight.dtype)
            torch.testing.assert_close(sep(inputs), _multiplier_forward(sep, inputs), rtol=tolerance, atol=tolerance)
    check()
    sep(x).square().sum().backward()  # autograd records: no kept layout involved, gradients reach the weights
    assert sep.depthwise.weight.grad.abs().sum() > 0 and sep.pointwise.weight.grad.abs().sum() > 0
    optimizer.step()
    check()
    with torch.no_grad():
        sep.pointwise.weight.mul_(-2)
    check()
    sep.load_state_dict({k: torch.randn_like(v) for k, v in sep.state_dict().items()})
    check()
    copied = copy.deepcopy(sep)
    assert "_slice_cache" not in vars(copied)
    with torch.inference_mode():
        torch.testing.assert_close(copied(x), sep(x), rtol=1e-12, atol=1e-12)
    sep.float()
    assert sep._slice_cache is None
    check(1e-4)
    with torch.inference_mode():  # weights made here have no version counter: computed afresh every call
        made = DepthwiseSeparableConv2d(16, 24, 3, rank=3, padding=((1, 1), (1, 1)))
        for _ in range(2):
            torch.testing.assert_close(made(x.float()), _multiplier_forward(made, x.float()))
        made.pointwise.weight.mul_(2)
        torch.testing.assert_close(made(x.float()), _multiplier_forward(made, x.float()))


def test_the_slice_form_trains_like_the_multiplier_form():
    """The in-place accumulation of the slices keeps autograd's gradients those of the textbook form."""
    for channels_last in (False, True):
        sep = DepthwiseSeparableConv2d(12, 20, 3, rank=3, stride=2, padding=((1, 1), (1, 1)), dtype=torch.float64)
        x = torch.randn(2, 12, 11, 9, dtype=torch.float64, requires_grad=True)
        if channels_last:
            sep = sep.to(memory_format=torch.channels_last)
        inputs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        grads = []
        for forward in (sep, lambda t: _multiplier_forward(sep, t)):
            outputs = forward(inputs)
            grads.append(torch.autograd.grad(outputs.square().sum(), [x, *sep.parameters()]))
        for fast, textbook in zip(*grads):
            torch.testing.assert_close(fast, textbook, rtol=1e-12, atol=1e-12)


def test_the_slice_form_runs_under_autocast():
    """The in-place GEMMs are not autocast: they must follow the convs' bfloat16 in both memory formats."""
    for channels_last in (False, True):
        sep = DepthwiseSeparableConv2d(16, 24, 3, rank=3, padding=((1, 1), (1, 1)))
        x = torch.randn(2, 16, 9, 9)
        if channels_last:
            sep, x = sep.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast, textbook = sep(x), _multiplier_forward(sep, x)
        assert fast.dtype == textbook.dtype == torch.bfloat16
        torch.testing.assert_close(fast.float(), textbook.float(), rtol=0.05, atol=0.05)
