"""Data-aware conversion beyond one tensor in and one out: a torchvision detector on its own loader (lists of
images, heads run once per pyramid level, outputs whose size depends on the values), layers called several times,
layers no calibration input reaches."""
import pytest
import torch
import torch.nn as nn
import torchvision

import dsd
from dsd.calibration import take_batches


def test_calibration_batches_come_as_loaders_yield_them():
    images = [torch.rand(3, 8, 8) for _ in range(2)]
    detection = [(tuple(images), ({"boxes": torch.zeros(0, 4)},) * 2)]  # torchvision's detection collate
    assert all(a is b for a, b in zip(take_batches(detection, 1)[0], images))
    x = torch.randn(4, 3, 8, 8)
    assert take_batches([(x, torch.zeros(4))], 1)[0] is x
    assert take_batches(x, 5)[0] is x  # one tensor: one batch
    with pytest.raises(dsd.DsdError, match="it yielded a dict"):
        take_batches([{"image": x}], 1)
    with pytest.raises(dsd.DsdError, match="it yielded nothing"):
        take_batches([], 1)


def test_a_torchvision_detector_converts_on_its_own_loader():
    """Calibration batches of image lists; FLOPs per image of a list; BatchNorm re-estimated on them."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3).eval()
    images = [torch.rand(3, 128, 128) for _ in range(4)]
    loader = [(tuple(images[i:i + 2]), ({"boxes": torch.zeros(0, 4)},) * 2) for i in (0, 2)]
    converted, report = dsd.convert_model(model, [images[0]], init="data", calibration_data=loader,
                                          target_flops=0.95, calibration_batches=1, recalibrate_bn=True)
    assert report.converted and report.budget.reached <= 0.95
    assert all(r.output_error is not None for r in report.converted)
    assert report.fidelity.samples + report.fidelity.mismatched == 2 and report.fidelity.held_out
    with torch.no_grad():
        assert converted(images[:1])[0]["boxes"].shape[1] == 4


class SharedConv(nn.Module):
    """One conv on two different inputs per forward (a detection head run once per pyramid level)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        return self.shared(y) + self.shared(nn.functional.avg_pool2d(y, 2).repeat_interleave(2, -1)
                                           .repeat_interleave(2, -2) * 3)


def test_each_call_of_a_layer_is_fitted_to_the_original_output_of_that_call():
    """Layer by layer, the refit paired every call of a layer with the original's output of its last call: at
    full rank, where the decoupling is exact, the refit made a shared conv wrong."""
    torch.manual_seed(0)
    model, x = SharedConv().eval(), torch.randn(2, 3, 8, 8)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    converted, report = dsd.convert_model(model, x, init="data", calibration_data=batches, rank="full",
                                          only_if_cheaper=False, sequential=True)
    assert [r.name for r in report.converted] == ["stem", "shared"]
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4)


class EmptyBranch(nn.Module):
    """A conv that runs on the samples a threshold selects: on these inputs, none (a mask head without boxes)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.stem(x)
        return y.mean((1, 2, 3)), self.head(y[y.mean((1, 2, 3)) > 1e6])


def test_a_layer_no_calibration_input_reaches_is_decoupled_from_its_weights_and_named():
    torch.manual_seed(0)
    model, x = EmptyBranch().eval(), torch.randn(2, 3, 8, 8)
    converted, report = dsd.convert_model(model, x, init="data", calibration_data=[torch.randn(4, 3, 8, 8)],
                                          rank=2)
    head = next(r for r in report.converted if r.name == "head")
    svd, _ = dsd.convert_model(model, x, rank=2)
    torch.testing.assert_close(converted.head.depthwise.weight, svd.head.depthwise.weight)
    assert head.output_error is None and head.error_kind == "weight"
    assert any("1 converted layers were not fitted to the calibration data (head" in n for n in report.notes)
    assert converted(x)[1].shape == (0, 8, 8, 8)


class ValueSized(nn.Module):
    """Outputs whose size depends on the values (as a detector's detections do)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y[y > 0.5]


def test_the_fidelity_line_counts_batches_whose_outputs_change_shape_and_compares_the_rest():
    torch.manual_seed(0)
    model, x = ValueSized().eval(), torch.randn(2, 3, 8, 8)
    _, report = dsd.convert_model(model, x, init="data", calibration_data=[torch.randn(4, 3, 8, 8)] * 2, rank=1)
    assert report.fidelity.samples == 0 and report.fidelity.mismatched == 8
    assert "no output error measured" in report.fidelity.describe()
    converted, _ = dsd.convert_model(model, x, rank="full", only_if_cheaper=False)
    fidelity = dsd.convert.fidelity.measure_fidelity(model, converted, [x, x])
    assert fidelity.samples == 4 and fidelity.mismatched == 0 and fidelity.relative_error < 1e-5
