"""The forms a separable layer computes in: weights kept between inference calls, and the measured choice."""
import copy
import io
from unittest import mock

import pytest
import torch

import dsd
from dsd.kernels import use_fused_kernel
from dsd.layers import forms
from dsd.layers.forms import (FORMS, autotune_forms, candidate_forms, choose_form, forms_timed_as_cuda_graphs,
                             multiplier_forward, static_form)
from dsd.layers.separable import DepthwiseSeparableConv2d


def _layer(channels=16, rank=3, **kwargs):
    return DepthwiseSeparableConv2d(channels, 24, 3, rank=rank, padding=((1, 1), (1, 1)), **kwargs)


def _textbook(sep, x):
    return multiplier_forward(sep, sep._pad(x))


def test_kept_weights_follow_the_weights():
    """Inference keeps each form's weight layout between calls; every way PyTorch changes weights renews it."""
    sep = _layer(dtype=torch.float64)
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    optimizer = torch.optim.SGD(sep.parameters(), lr=0.5)

    def check(tolerance=1e-12):
        with torch.no_grad():
            inputs = x.to(sep.weight.dtype)
            for form in FORMS.values():
                torch.testing.assert_close(form(sep, sep._pad(inputs)), _textbook(sep, inputs),
                                           rtol=tolerance, atol=tolerance)
    check()
    assert set(sep._kept) == {"slices", "concat", "dense", "fused"}
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
    assert "_kept" not in vars(copied) and "_tuned_forms" not in vars(copied)
    with torch.inference_mode():
        torch.testing.assert_close(copied(x), sep(x), rtol=1e-12, atol=1e-12)
    sep.float()
    assert sep._kept is None and sep._tuned_forms is None
    check(1e-4)
    with torch.inference_mode():  # weights made here have no version counter: laid out afresh every call
        made = _layer()
        for _ in range(2):
            torch.testing.assert_close(made(x.float()), _textbook(made, x.float()))
        made.pointwise.weight.mul_(2)
        torch.testing.assert_close(made(x.float()), _textbook(made, x.float()))
        assert made._kept is None


@pytest.mark.parametrize("form", ["slices", "concat", "dense"])
def test_a_form_trains_like_the_multiplier_form(form):
    """Autograd through a form (the in-place accumulation of the slices, their concatenation, the recomposed dense
    kernel) gives the textbook form's gradients."""
    for channels_last in (False, True):
        sep = DepthwiseSeparableConv2d(12, 20, 3, rank=3, stride=2, padding=((1, 1), (1, 1)), dtype=torch.float64)
        x = torch.randn(2, 12, 11, 9, dtype=torch.float64, requires_grad=True)
        if channels_last:
            sep = sep.to(memory_format=torch.channels_last)
        inputs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        grads = []
        for forward in (FORMS[form], multiplier_forward):
            outputs = forward(sep, inputs)
            grads.append(torch.autograd.grad(outputs.square().sum(), [x, *sep.parameters()]))
        for fast, textbook in zip(*grads):
            torch.testing.assert_close(fast, textbook, rtol=1e-12, atol=1e-12)


def test_every_form_takes_an_empty_batch():
    """A detector's mask head runs on however many boxes survive, none included: the slices' in-place sum
    reshaped its NCHW output with -1, which no size defines for zero elements (Mask R-CNN at rank 2 crashed)."""
    for rank, groups in ((1, 1), (3, 1), (2, 2)):
        sep = DepthwiseSeparableConv2d(16, 12, 3, rank=rank, stride=2, padding=((1, 1), (1, 1)), groups=groups).eval()
        for channels_last in (False, True):
            x = torch.randn(0, 16, 14, 14)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for form in ("multiplier", "slices", "concat", "dense"):
                assert FORMS[form](sep, x).shape == (0, 12, 7, 7), (rank, groups, channels_last, form)
            with torch.no_grad():
                assert sep(x).shape == (0, 12, 7, 7)  # the forms timed on it, the fastest kept


@pytest.mark.parametrize("form", ["slices", "concat", "dense"])
def test_a_form_runs_under_autocast(form):
    """The in-place GEMMs and the recomposition are not autocast: the output follows the convs' bfloat16."""
    for channels_last in (False, True):
        sep, x = _layer(), torch.randn(2, 16, 9, 9)
        if channels_last:
            sep, x = sep.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            fast, textbook = FORMS[form](sep, x), _textbook(sep, x)
        assert fast.dtype == textbook.dtype == torch.bfloat16
        torch.testing.assert_close(fast.float(), textbook.float(), rtol=0.05, atol=0.05)


def _timed_as(seconds):
    """A stand-in for the stopwatch: each form takes the given seconds; records which were timed."""
    timed = []

    def fastest_runs(layer, x, names):
        timed.extend(names)
        return {name: seconds[name] for name in names}
    return mock.patch.object(forms, "_fastest_runs", fastest_runs), timed


def test_inference_keeps_the_fastest_form_per_kind_of_input():
    sep, x = _layer(), torch.randn(2, 16, 9, 9)
    stopwatch, timed = _timed_as({"multiplier": 3.0, "slices": 2.0, "concat": 2.5, "dense": 1.0})
    with stopwatch, torch.no_grad():
        assert choose_form(sep, x) == "dense" and timed == ["multiplier", "slices", "concat", "dense"]
        assert choose_form(sep, x) == "dense" and len(timed) == 4  # timed once per kind of input
        choose_form(sep, x.contiguous(memory_format=torch.channels_last))  # another memory format
        choose_form(sep, x[:1])  # another shape
        with torch.autocast("cpu", dtype=torch.bfloat16):
            choose_form(sep, x)
    assert len(timed) == 16 and len(sep.tuned_forms()) == 4
    # what it chose is what it runs: the dense kernel is then kept
    with torch.no_grad(), mock.patch.dict(sep.tuned_forms(), {k: "dense" for k in sep.tuned_forms()}):
        torch.testing.assert_close(sep(x), _textbook(sep, x), rtol=1e-5, atol=1e-5)
    assert "dense" in sep._kept


def test_only_the_chosen_forms_keep_weights():
    """Timing every form lays out weights for each; the dense kernel alone is the size of the replaced conv."""
    sep, x = _layer(), torch.randn(2, 16, 9, 9)
    stopwatch, _ = _timed_as({"multiplier": 2.0, "slices": 1.0, "concat": 1.5, "dense": 3.0})
    with stopwatch, torch.no_grad():
        for form in ("slices", "concat", "dense"):
            FORMS[form](sep, x)
        assert set(sep._kept) == {"slices", "concat", "dense"}
        sep(x)
    assert set(sep._kept) == {"slices"}


def test_timings_are_dropped_with_a_move_or_a_copy():
    sep, x = _layer(), torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        sep(x)
    assert len(sep.tuned_forms()) == 1
    assert copy.deepcopy(sep)._tuned_forms is None
    buffer = io.BytesIO()
    torch.save(sep, buffer)
    assert torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)._tuned_forms is None
    sep.double()
    assert sep._tuned_forms is None


def test_the_static_rule_where_nothing_may_be_timed():
    """Training, tracing, deterministic mode and the switch take the static form, and time nothing."""
    sep, x = _layer(), torch.randn(2, 16, 9, 9)
    stopwatch, timed = _timed_as({"multiplier": 1.0, "slices": 2.0, "concat": 2.5, "dense": 3.0})
    with stopwatch:
        assert choose_form(sep, x) == static_form(sep) == "concat"  # autograd records
        with torch.no_grad():
            torch.jit.trace(sep, x, check_trace=False)  # (the check would run the layer eagerly)
            assert timed == [] and not sep._kept  # nor does a trace read a layout kept from before
            previous = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True)
            try:
                assert choose_form(sep, x) == "concat"
            finally:
                torch.use_deterministic_algorithms(previous)
            autotune_forms(False)
            try:
                assert choose_form(sep, x) == "concat"
            finally:
                autotune_forms(True)
            assert timed == []
            assert choose_form(sep, x) == "multiplier" and timed == ["multiplier", "slices", "concat", "dense"]


def test_a_pinned_form_is_taken_everywhere_and_kept_by_copies():
    """Pinned: eager inference times nothing, autograd and a trace take the pinned form, not the static rule; the
    pin shows in the repr (so the layer-timing cache tells pinned layers apart) and survives copies."""
    sep, x = _layer(), torch.randn(2, 16, 9, 9)
    assert sep.pin_form("dense") is sep and "form=dense" in repr(sep)
    stopwatch, timed = _timed_as({"multiplier": 1.0, "slices": 2.0, "concat": 2.5, "dense": 3.0})
    with stopwatch:
        assert choose_form(sep, x) == "dense"  # autograd records
        with torch.no_grad():
            assert choose_form(sep, x) == "dense" and timed == []
            traced = torch.jit.trace(sep, x, check_trace=False)
        assert any(n.kind() == "aten::_convolution" for n in traced.graph.nodes())
        assert sum(n.kind() == "aten::_convolution" for n in traced.graph.nodes()) == 1  # one dense conv
        assert copy.deepcopy(sep).pinned_form == "dense"
        torch.testing.assert_close(sep(x), _textbook(sep, x), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            sep.pin_form(None)
            assert choose_form(sep, x) == "multiplier" and timed == ["multiplier", "slices", "concat", "dense"]
    with pytest.raises(ValueError, match="form must be one of"):
        sep.pin_form("fastest")


def test_candidates_and_static_rule():
    assert static_form(_layer(rank=1)) == "multiplier" and candidate_forms(_layer(rank=1)) == ("multiplier", "dense")
    assert static_form(_layer(channels=3, rank=4)) == "multiplier"  # an RGB stem: no r launches of a tiny conv
    # on CUDA the slices lose to the dense conv at every layer measured but 512 channels 7x7 in bf16, batch 64
    assert static_form(_layer(), "cuda") == static_form(_layer(), torch.device("cuda", 1)) == "dense"
    assert static_form(_layer(), "cpu") == static_form(_layer(), "meta") == "concat"
    assert static_form(_layer(rank=1), "cuda") == "multiplier"
    assert static_form(_layer(channels=3, rank=4), "cuda") == "dense"  # a depth multiplier is slow on CUDA too
    assert candidate_forms(_layer(channels=3, rank=4)) == ("multiplier", "dense")
    assert candidate_forms(_layer()) == ("multiplier", "slices", "concat", "dense")


def test_the_fused_kernel_is_timed_on_cuda_only_when_switched_on():
    sep, x = _layer(), torch.randn(2, 16, 9, 9)
    use_fused_kernel(True)
    try:
        assert candidate_forms(sep, x) == ("multiplier", "slices", "concat", "dense")  # a CPU input
        # no input: the ONNX export's candidates
        assert candidate_forms(sep) == ("multiplier", "slices", "concat", "dense")
        if torch.cuda.is_available():
            assert candidate_forms(sep.cuda(), x.cuda())[-1] == "fused"
            assert "fused" not in candidate_forms(_layer(groups=2).cuda(), x.cuda())
    finally:
        use_fused_kernel(False)
    if torch.cuda.is_available():
        assert "fused" not in candidate_forms(sep.cuda(), x.cuda())


def test_calibration_runs_with_the_static_forms():
    """dsd's calibration (data-aware init, sequential refits, BN re-estimation, the fidelity line) never times
    forms: it gives the same weights on every run."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1)).eval()
    batches = [torch.randn(4, 3, 12, 12) for _ in range(3)]

    def never(*args):
        raise AssertionError("a form was timed during calibration")
    with mock.patch.object(forms, "_fastest_runs", never):
        converted = [dsd.convert_model(model, batches[0], rank=3, init="data", calibration_data=batches,
                                       recalibrate_bn=True)[0] for _ in range(2)]
    for a, b in zip(converted[0].state_dict().values(), converted[1].state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad(), pytest.raises(AssertionError, match="was timed"), mock.patch.object(
            forms, "_fastest_runs", never):
        converted[0](batches[0])  # while a user's inference does time them


def test_the_dense_kernel_is_kept_in_the_inputs_memory_format():
    """An NCHW kernel on an NHWC input costs a layout change on every call: the recomposed kernel follows the
    input, and the output is the same either way."""
    sep, x = _layer().pin_form("dense"), torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        nchw = sep(x)
        assert sep._kept["dense"][1][0].is_contiguous()
        nhwc = sep(x.contiguous(memory_format=torch.channels_last))
        assert sep._kept["dense"][1][0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, nchw)


def test_timing_as_cuda_graphs_leaves_cpu_layers_as_they_are():
    """forms_timed_as_cuda_graphs concerns CUDA inputs: a CPU layer keeps one choice inside and outside."""
    sep, x = _layer(), torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        outside = sep(x)
        with forms_timed_as_cuda_graphs():
            inside = sep(x)
    assert len(sep.tuned_forms()) == 1
    torch.testing.assert_close(inside, outside)


@pytest.mark.parametrize("channels_last", [False, True])
def test_under_autocast_weights_are_kept_in_its_dtype(channels_last):
    """Under autocast the dense, slices and concat forms keep their weights in its dtype (cast once, not on every call)
    and compute what autocast's own casts of the float32 weights give."""
    sep, x = _layer(), torch.randn(2, 16, 9, 9)
    if channels_last:
        sep, x = sep.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    dw = sep.depthwise
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (weight,) = forms.dense_weight(sep)
        want = torch.nn.functional.conv2d(x, weight, sep.pointwise.bias, dw.stride, dw.padding, dw.dilation)
        assert torch.equal(FORMS["dense"](sep, x), want)
        for form in ("slices", "concat"):
            torch.testing.assert_close(FORMS[form](sep, x), FORMS["multiplier"](sep, x), rtol=2e-2, atol=2e-2)
    assert {w.dtype for form in ("dense", "slices", "concat") for w in sep._kept[form][1]} == {torch.bfloat16}
    with torch.no_grad():  # autocast off: float32 kept again
        torch.testing.assert_close(FORMS["dense"](sep, x), _textbook(sep, x), rtol=1e-5, atol=1e-5)
    assert sep._kept["dense"][1][0].dtype == torch.float32


def test_under_autocast_float64_weights_stay_float64():
    """Autocast leaves float64 alone; so do the kept weights."""
    sep, x = _layer(dtype=torch.float64), torch.randn(2, 16, 9, 9, dtype=torch.float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = FORMS["dense"](sep, x)
    assert out.dtype == torch.float64 and sep._kept["dense"][1][0].dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(out, _textbook(sep, x))


def test_a_conversion_under_inference_mode_keeps_weight_layouts():
    """Layers converted (or rebuilt from a plan) under torch.inference_mode get ordinary parameters, whose
    version counters let them keep their weight layouts between calls; inference tensors have none."""
    conv = torch.nn.Conv2d(16, 24, 3, padding=1)
    with torch.inference_mode():
        converted, report = dsd.convert_model(torch.nn.Sequential(conv), rank=3)
        rebuilt = dsd.apply_plan(torch.nn.Sequential(torch.nn.Conv2d(16, 24, 3, padding=1)), report.plan)
    for sep in (converted[0], rebuilt[0]):
        assert not sep.depthwise.weight.is_inference() and not sep.pointwise.weight.is_inference()
        with torch.inference_mode():
            FORMS["dense"](sep, torch.randn(1, 16, 5, 5))
        assert "dense" in sep._kept


def test_slices_add_inside_onednn_only_where_it_may():
    """oneDNN adds the slices' products at eager float32 CPU inference only: autograd, another dtype, an empty
    output or oneDNN switched off take the in-place GEMM (and give the same function)."""
    sep, x = _layer(), torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        out = FORMS["multiplier"](sep, x)
        assert forms._adds_in_onednn(out) == torch.backends.mkldnn.is_available()
        assert not forms._adds_in_onednn(out.double()) and not forms._adds_in_onednn(out[:0])
        with torch.backends.mkldnn.flags(enabled=False):
            assert not forms._adds_in_onednn(out)
            torch.testing.assert_close(FORMS["slices"](sep, x), out, rtol=1e-5, atol=1e-5)
    assert not forms._adds_in_onednn(out)  # autograd records
