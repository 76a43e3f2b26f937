"""Shapes from a forward on meta tensors: the same as a real run's, and never a trace left on the model."""
import warnings

import pytest
import timm
import torch
import torch.nn as nn

import dsd
from dsd.modes import call_shapes, output_shape, record_shapes, run_on_meta


def _convs(model: nn.Module):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _real_shapes(model: nn.Module, x: torch.Tensor):
    with torch.no_grad(), record_shapes(_convs(model)) as calls:
        model(x)
    return calls


class CachesItsGrid(nn.Module):
    """Keeps a tensor made in forward on itself (as anchor generators and position-embedding caches do)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grid = None

    def forward(self, x):
        if self.grid is None:
            self.grid = torch.linspace(0, 1, x.shape[-1], device=x.device)
        return self.conv(x) * self.grid


class BranchesOnValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.other = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x) if x.mean() > -10 else self.other(x)


class PlainTensorAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = torch.ones(8, 1, 1)  # neither parameter nor buffer

    def forward(self, x):
        return self.conv(x) * self.scale


def test_meta_run_gives_a_real_runs_shapes_and_leaves_the_weights_alone():
    model = timm.create_model("resnet18").eval()
    x = torch.randn(2, 3, 96, 80)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    with record_shapes(_convs(model)) as calls:
        assert run_on_meta(model, (x,))
    assert calls == _real_shapes(model, x)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_a_forward_that_caches_on_its_module_keeps_nothing_from_the_meta_run_or_the_trace():
    model = CachesItsGrid()
    x = torch.randn(1, 3, 8, 8)
    assert run_on_meta(model, (x,))
    assert model.grid is None  # not the meta tensor it made
    assert call_shapes(model, (x,), _convs(model)) == {"conv": [((1, 3, 8, 8), (1, 8, 8, 8))]}
    assert model.grid is None
    converted, report = dsd.convert_model(CachesItsGrid(), x, rank=1)  # traced too: no proxy kept
    assert report.traced and report.shapes_verified
    assert converted.grid is None and converted(x).shape == (1, 8, 8, 8)
    assert not converted.grid.is_meta


def test_value_branches_and_plain_tensor_attributes_fall_back_to_a_real_run():
    x = torch.randn(1, 3, 8, 8)
    for model in (BranchesOnValues(), PlainTensorAttribute()):
        assert not run_on_meta(model, (x,))
        assert call_shapes(model, (x,), _convs(model)) == _real_shapes(model, x)
    _, report = dsd.convert_model(BranchesOnValues(), x, rank=1)
    assert [r.name for r in report.converted] == ["conv"]  # "other" is not called on this input


def test_every_kind_of_batchnorm_keeps_its_shapes_on_meta():
    """Inference BatchNorm is short-cut on meta tensors; batch statistics (no running ones) and timm's
    BatchNormAct2d, in float32 and bfloat16, must still give a real run's shapes and dtypes."""
    from timm.layers import BatchNormAct2d
    for dtype in (torch.float32, torch.bfloat16):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8, track_running_stats=False),
                              nn.Conv2d(8, 6, 3, padding=1), BatchNormAct2d(6), nn.Conv2d(6, 4, 1),
                              nn.BatchNorm2d(4)).eval().to(dtype)
        x = torch.randn(2, 3, 11, 9, dtype=dtype)
        with record_shapes(_convs(model)) as calls:
            assert run_on_meta(model, (x,))
        assert calls == _real_shapes(model, x)
        assert output_shape(model, (2, 3, 11, 9)) == tuple(model(x).shape) == (2, 4, 5, 4)


def test_output_shape_of_a_separable_layer_is_its_dense_convs():
    conv = nn.Conv2d(16, 32, 5, stride=2, padding=3, dilation=2)
    layer, _ = dsd.convert_model(nn.Sequential(conv), torch.randn(1, 16, 20, 20), rank=2)
    assert output_shape(layer[0], (3, 16, 21, 17)) == tuple(conv(torch.randn(3, 16, 21, 17)).shape)


A = torch.ops.aten
SHORT_CUT_CALLS = [  # (op, argument shapes and dtypes, other arguments): broadcasts, promotions, bool results
    (A.add.Tensor, [((2, 1, 5), torch.float32), ((3, 1), torch.float16)], {}),
    (A.add.Tensor, [((4, 3), torch.bfloat16), ((), torch.float32)], {}),  # a 0-dim tensor promotes as a scalar
    (A.mul.Tensor, [((4, 3), torch.int64), ((3,), torch.float16)], {}),
    (A.div.Tensor, [((4, 3), torch.int32), ((4, 3), torch.int32)], {}),  # integers to float
    (A.eq.Tensor, [((2, 3), torch.float32), ((2, 1), torch.float32)], {}),  # bool
    (A.where.self, [((2, 1), torch.bool), ((2, 3), torch.float16), ((3,), torch.float32)], {}),
    (A.relu.default, [((2, 3, 4), torch.bfloat16)], {}),
    (A.hardswish.default, [((2, 3, 4), torch.float32)], {}),  # not tagged element-wise in ATen
    (A.hardtanh.default, [((2, 3), torch.float32)], {"min_val": 0.0, "max_val": 6.0}),
    (A.gelu.default, [((2, 3), torch.float32)], {"approximate": "tanh"}),
    (A.add.Scalar, [((2, 3), torch.int64)], {"other": 2.5}),
    (A.clone.default, [((2, 3, 4, 5), torch.float32)], {"memory_format": torch.channels_last}),
    (A.mean.dim, [((2, 3, 4, 5), torch.float32)], {"dim": [-1, 2], "keepdim": True}),
    (A.mean.dim, [((2, 3, 4, 5), torch.bfloat16)], {"dim": [1]}),
    (A.sum.dim_IntList, [((2, 3, 4), torch.int32)], {"dim": None}),  # every dim; integers sum to int64
    (A.amax.default, [((2, 3, 4), torch.float16)], {"dim": [0, 2]}),
    (A.var.correction, [((2, 3, 4), torch.float32)], {"dim": [1], "correction": 1, "keepdim": True}),
    (A.any.dim, [((2, 3, 4), torch.float32)], {"dim": -2}),  # one dim, bool result
    (A.mean.dim, [((2, 3, 4), torch.float32)], {"dim": (), "keepdim": True}),  # no dims: every dim
    (A.argmax.default, [((2, 3, 4), torch.float32)], {"keepdim": True}),  # dim None
]


@pytest.mark.parametrize("op, tensors, others", SHORT_CUT_CALLS, ids=lambda v: str(v) if callable(v) else None)
def test_ops_short_cut_on_meta_give_their_meta_kernels_shape_dtype_and_layout(op, tensors, others):
    from dsd.modes import _result_on_meta
    args = [torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in tensors]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finding the dtype on one-element tensors says nothing to the user
        ours = _result_on_meta(op, tuple(args), others)
    theirs = op(*args, **others)
    assert ours is not None
    assert (ours.shape, ours.dtype, ours.stride(), ours.is_meta) == (theirs.shape, theirs.dtype, theirs.stride(), True)


def test_in_place_elementwise_ops_short_cut_on_meta_return_their_input_and_other_ops_are_left_alone():
    from dsd.modes import _result_on_meta
    x, y = torch.empty(2, 3, 4, device="meta"), torch.empty(3, 1, device="meta")
    for op, args in ((A.hardswish_.default, (x,)), (A.add_.Tensor, (x, y)), (A.relu_.default, (x,))):
        assert _result_on_meta(op, args, {}) is x
    assert _result_on_meta(A.max.dim, (x, 1), {}) is None  # two results
    assert _result_on_meta(A.convolution.default, (x,) * 2 + (None, [1], [0], [1], False, [0], 1), {}) is None
    assert _result_on_meta(A.add.Tensor, (torch.ones(2), torch.ones(2)), {}) is None  # real tensors: computed


def test_out_variants_and_in_place_ops_are_read_from_the_schema():
    """torch 2.11 has no ``torch.Tag.out``: reading it stopped every conversion there (an H200's image)."""
    from dsd.modes import _shape_rule, _writes
    assert _writes(A.add.out._schema, kwarg_only=True) and not _writes(A.add.Tensor._schema, kwarg_only=True)
    assert _writes(A.add_.Tensor._schema, kwarg_only=False) and not _writes(A.add.Tensor._schema, kwarg_only=False)
    assert _shape_rule(A.add.out) is None and _shape_rule(A.add_.Tensor) == "in place"
    assert _shape_rule(A.add.Tensor) == "broadcast" and _shape_rule(A.sum.dim_IntList) == "reduction"


@pytest.mark.parametrize("name", ["mobilenetv3_large_100", "efficientnet_b0", "regnety_016", "convnext_tiny"])
def test_meta_run_of_models_with_many_elementwise_ops_gives_a_real_runs_shapes(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 72)
    with record_shapes(_convs(model)) as calls:
        assert run_on_meta(model, (x,))
    assert calls == _real_shapes(model, x)


def test_short_cut_results_keep_the_layout_the_meta_kernel_gives():
    from dsd.modes import _result_on_meta
    channels_last = torch.empty(2, 3, 4, 5, device="meta").to(memory_format=torch.channels_last)
    transposed = torch.empty(3, 4, 5, device="meta").transpose(0, 2)
    expanded = torch.empty(3, 1, 5, device="meta").expand(3, 4, 5)
    for x in (channels_last, transposed, expanded):
        for op, args in ((A.relu.default, (x,)), (A.add.Tensor, (x, x)), (A.mul.Tensor, (x, torch.tensor(2.0)))):
            ours, theirs = _result_on_meta(op, args, {}), op(*args)
            assert (ours.shape, ours.stride(), ours.dtype) == (theirs.shape, theirs.stride(), theirs.dtype)


class RegisteredTwice(nn.Module):
    """One conv under two names (a shared block), with a weight tied to another module's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.again = self.conv
        self.tied = nn.Conv2d(8, 8, 3, padding=1)
        self.tied.weight = self.conv.weight

    def forward(self, x):
        return self.tied(self.again(self.conv(x)))


def test_a_module_registered_twice_or_tied_weights_still_run_on_meta():
    """``functional_call`` refuses tied names given different tensors: they ran for real before."""
    model, x = RegisteredTwice(), torch.randn(1, 8, 12, 12)
    before = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    with record_shapes(_convs(model)) as calls:
        assert run_on_meta(model, (x,))
    assert calls == _real_shapes(model, x)
    assert output_shape(model, (1, 8, 12, 12)) == (1, 8, 12, 12)
    assert all(t is before[name] for name, t in model.state_dict(keep_vars=True).items())
    assert model.tied.weight is model.conv.weight


def test_converting_a_model_with_a_module_registered_twice_or_tied_weights_keeps_its_weights():
    """Exact at full rank; the meta run once left the twice-registered conv holding meta tensors."""
    model, x = RegisteredTwice(), torch.randn(1, 8, 12, 12)
    for options in ({"rank": "full"}, {"rank": "full", "only_if_cheaper": False}):
        converted, _ = dsd.convert_model(model, x, **options)
        assert not any(t.is_meta for t in converted.state_dict().values())
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
        assert converted.conv is converted.again
