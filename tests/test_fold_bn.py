"""BatchNorm folding for inference: same outputs, on real models, converted or not; plans reload it exactly."""
import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import dsd
from dsd.cli.main import convert_main
from dsd.convert import find_foldable


def _with_trained_statistics(model: nn.Module) -> nn.Module:
    """Random weights come with BatchNorm at its identity init; give every norm real-looking statistics."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def _relative(a, b):
    return ((a - b).norm() / a.norm()).item()


@pytest.mark.parametrize("build,expected", [
    (lambda: timm.create_model("resnet18"), 20),
    (lambda: timm.create_model("efficientnet_b0"), 49),  # timm BatchNormAct2d: the activation stays
    (lambda: torchvision.models.mobilenet_v3_small(), 34),
    (lambda: torchvision.models.resnet18(), 20),
])
@pytest.mark.parametrize("convert", [False, True])
def test_folding_keeps_outputs(build, expected, convert):
    model, x = _with_trained_statistics(build()), torch.randn(2, 3, 64, 64)
    if convert:
        model, _ = dsd.convert_model(model, x[:1], rank=2)
    folded = dsd.fold_batchnorm(model)
    assert len(find_foldable(model).pairs) == expected
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert _relative(model(x), folded(x)) < 1e-5
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the original is not changed"


def test_a_hook_on_a_folded_norm_fires_on_what_replaces_it():
    model = _with_trained_statistics(timm.create_model("resnet18"))
    outputs = []
    model.layer1[0].bn1.register_forward_hook(lambda module, args, out: outputs.append(out))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        dsd.fold_batchnorm(model)(x)
    assert len(outputs) == 2 and _relative(outputs[0], outputs[1]) < 1e-5


@pytest.mark.parametrize("norms", ["frozen", "sync"])
@pytest.mark.parametrize("build", [lambda: timm.create_model("resnet18"), lambda: timm.create_model("efficientnet_b0"),
                                   lambda: torchvision.models.resnet18()], ids=["timm-resnet18", "timm-efficientnet_b0",
                                                                               "tv-resnet18"])
def test_frozen_and_synchronised_norms_are_folded(build, norms):
    """timm's freeze_batch_norm_2d makes torchvision's FrozenBatchNorm2d and timm's FrozenBatchNormAct2d (as in
    pretrained detection backbones); a model trained with DDP keeps SyncBatchNorm / SyncBatchNormAct layers."""
    model = _with_trained_statistics(build())
    expected = len(find_foldable(model).pairs)
    if norms == "frozen":
        frozen = timm.layers.freeze_batch_norm_2d(model)
    else:
        frozen = timm.layers.convert_sync_batchnorm(model).eval()  # as timm's train.py --sync-bn
    assert not any(type(m) in (nn.BatchNorm2d, timm.layers.BatchNormAct2d) for m in frozen.modules())
    x = torch.randn(2, 3, 64, 64)
    folded = dsd.fold_batchnorm(frozen)
    assert len(find_foldable(frozen).pairs) == expected
    with torch.no_grad():
        assert _relative(frozen(x), folded(x)) < 1e-5


class Branchy(nn.Module):
    """Data-dependent control flow at the top: torch.fx cannot trace it, its children trace fine."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))

    def forward(self, x):
        return self.block(x) if x.sum() > 0 else self.other(x)


def test_untraceable_parts_are_searched_child_by_child():
    model = _with_trained_statistics(Branchy())
    plan = find_foldable(model)
    assert plan.pairs == [("block.0", "block.1"), ("other.0", "other.1")]
    x = torch.randn(1, 3, 8, 8).abs()
    with torch.no_grad():
        assert _relative(model(x), dsd.fold_batchnorm(model)(x)) < 1e-5


def test_a_conv_with_two_users_is_not_folded():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y
    assert find_foldable(Residual().eval()).pairs == []


class _ConvNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class _LeafConvNorm(_ConvNorm):
    """A module the tracer keeps whole, as timm's registered leaf modules are."""


class _CalledTwice(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(self.block(x))


class _SharedConvOwnNorms(nn.Module):
    """One conv on two inputs, a norm of its own after each call (a detection head shared across levels)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x * 2))


def test_a_block_called_twice_folds_once():
    """A conv and its norm that run together on every call fold; a leaf module called twice was searched twice,
    its pair folded twice (outputs 1.4 off)."""
    from timm.layers import register_notrace_module
    from timm.layers._fx import _leaf_modules
    register_notrace_module(_LeafConvNorm)
    try:
        for block in (_ConvNorm(), _LeafConvNorm()):
            model = _with_trained_statistics(_CalledTwice(block))
            assert find_foldable(model).pairs == [("block.conv", "block.bn")]
            x = torch.randn(2, 8, 8, 8)
            folded = dsd.fold_batchnorm(model)
            with torch.no_grad():
                assert _relative(model(x), folded(x)) < 1e-5
            assert isinstance(folded.block.bn, nn.Identity)
    finally:
        _leaf_modules.discard(_LeafConvNorm)
    assert find_foldable(_with_trained_statistics(_SharedConvOwnNorms())).pairs == []


def test_train_mode_norms_are_left_alone():
    model = _with_trained_statistics(timm.create_model("resnet18")).train()
    assert find_foldable(model).pairs == []


def test_fold_bn_on_the_command_line_reloads_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _with_trained_statistics(timm.create_model("resnet18"))
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    assert convert_main(["r18.pt", "--arch", "timm:resnet18", "--fold-bn", "--input-size", "3", "32", "32",
                         "--quiet"]) == 0
    plan = dsd.ConversionPlan.load(tmp_path / "r18_dsd.plan.json")
    assert len(plan.folded_batchnorm) == 20
    reloaded = dsd.load_converted(tmp_path / "r18_dsd.plan.json")
    converted, _ = dsd.convert_model(model, torch.randn(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _relative(converted(x), reloaded(x)) < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in reloaded.modules())


def test_folding_under_inference_mode_keeps_weight_layouts():
    """Folded under torch.inference_mode, a separable layer's weights are still ordinary tensors (inference
    tensors have no version counter, so its forms could not keep their weight layouts)."""
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)).eval()
    converted, _ = dsd.convert_model(model, torch.randn(1, 8, 6, 6), rank=2)
    with torch.inference_mode():
        folded = dsd.fold_batchnorm(converted)
        layer = folded[0]
        assert not any(p.is_inference() for p in layer.parameters())
        layer.pin_form("dense")(torch.randn(1, 8, 6, 6))
    assert "dense" in layer._kept
