"""Shapes from a forward on meta tensors: the same as a real run's, and never a trace left on the model."""
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
