"""Property tests: a converted conv keeps the original's output shape for any geometry and input size."""

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dsd.convert import from_conv
from dsd.layers.create import shrink_kernel
from dsd.layers import forms
from dsd.layers.forms import FORMS, multiplier_forward
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


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_and_input(), rank=st.integers(1, 5), new_dilation=st.one_of(st.none(), st.integers(1, 3)),
       channels_last=st.booleans(), form=st.sampled_from(sorted(FORMS)))
def test_every_form_is_the_same_function(case, rank, new_dilation, channels_last, form):
    """Every form a separable layer may compute in (whichever the module picks, timed or not) is the
    depth-multiplier conv's function, also with its weights kept between inference calls."""
    conv, x = case
    assume(conv.kernel_size != (1, 1) and conv.groups != conv.in_channels)
    _original_output(conv, x)
    sep = from_conv(conv.double(), rank=rank, dilation=new_dilation, init="random").double()
    x = x.double()
    if conv.padding_mode in ("reflect", "circular"):
        assume(max(abs(p) for axis in sep.padding for p in axis) < min(x.shape[-2:]))
    if channels_last:
        sep, x = sep.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    padded = sep._pad(x)
    expected = multiplier_forward(sep, padded)
    torch.testing.assert_close(FORMS[form](sep, padded), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sep(x), expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # inference: the module times its forms, and keeps weights laid out for them
        for _ in range(2):
            torch.testing.assert_close(FORMS[form](sep, padded), expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(sep(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs PyTorch built with oneDNN")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_and_input(), rank=st.integers(2, 4), batch=st.integers(1, 3), channels_last=st.booleans())
def test_slices_added_inside_onednn_are_the_same_function(case, rank, batch, channels_last):
    """At float32 inference on a CPU the slices form adds each slice's pointwise product inside oneDNN's conv
    (not the float64 of the test above): the same function, to float32 rounding."""
    conv, x = case
    assume(conv.kernel_size != (1, 1) and conv.groups != conv.in_channels)
    _original_output(conv, x)
    sep = from_conv(conv, rank=rank, init="random")
    x = torch.randn(batch, *x.shape[1:])
    if conv.padding_mode in ("reflect", "circular"):
        assume(max(abs(p) for axis in sep.padding for p in axis) < min(x.shape[-2:]))
    if channels_last:
        sep, x = sep.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    padded = sep._pad(x)
    with torch.no_grad():
        expected = multiplier_forward(sep.double(), padded.double())
        sep.float()
        out = FORMS["slices"](sep, padded)
        assert forms._adds_in_onednn(out)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-6)
