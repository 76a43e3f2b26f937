"""deepcopy_module: what copy.deepcopy makes of a module tree, on real timm and torchvision models and on the
sharing, hooks and copy protocols a user's module may have."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

from dsd.module_tree import deepcopy_module


def assert_copied(copied: nn.Module, original: nn.Module) -> None:
    """Same structure, classes, attributes and tensor values; no tensor or module shared with the original."""
    assert type(copied) is type(original) and str(copied) == str(original)
    originals = {id(t) for t in [*original.parameters(), *original.buffers(), *original.modules()]}
    assert not any(id(t) in originals for t in [*copied.parameters(), *copied.buffers(), *copied.modules()])
    ours, theirs = copied.state_dict(keep_vars=True), original.state_dict(keep_vars=True)
    assert list(ours) == list(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]) and ours[name].requires_grad == theirs[name].requires_grad, name
        assert type(ours[name]) is type(theirs[name]), name
    for mine, yours in zip(copied.modules(), original.modules()):
        assert set(vars(mine)) == set(vars(yours)) and mine.training == yours.training


@pytest.mark.parametrize("build", [lambda: timm.create_model("resnet18"), lambda: timm.create_model("efficientnet_b0"),
                                   lambda: torchvision.models.mobilenet_v3_small(),
                                   lambda: torchvision.models.vgg11_bn()],
                         ids=["timm-resnet18", "timm-efficientnet_b0", "tv-mobilenet_v3_small", "tv-vgg11_bn"])
def test_real_models_copy_as_deepcopy_does(build):
    torch.manual_seed(0)
    model = build().eval()
    model.get_submodule(next(n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))).train()
    copied = deepcopy_module(model)
    assert_copied(copied, model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)
    assert getattr(copied, "pretrained_cfg", None) == getattr(model, "pretrained_cfg", None)
    if hasattr(model, "pretrained_cfg"):
        assert copied.pretrained_cfg is not model.pretrained_cfg


@pytest.mark.parametrize("build", [
    lambda: torchvision.models.feature_extraction.create_feature_extractor(torchvision.models.resnet18(),
                                                                           {"layer2": "mid", "layer4": "out"}),
    lambda: timm.create_model("resnet18", features_only=True, feature_cls="fx"),
    lambda: torch.fx.symbolic_trace(torchvision.models.resnet18()),
], ids=["tv-feature-extractor", "timm-features-fx", "fx-symbolic-trace"])
def test_graph_modules_keep_their_training_flags(build):
    """GraphModule's deepcopy rebuilds it through __init__, and torchvision's DualGraphModule came back in training
    mode; deepcopy_module gives each module of the copy its original's flag (and the eval graph)."""
    model = build().eval()
    model.get_submodule(next(n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))).train()
    copied = deepcopy_module(model)
    assert [m.training for m in copied.modules()] == [m.training for m in model.modules()]
    model.eval(), copied.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # a tied parameter
        self.alias = self.a  # one module under two names
        self.register_buffer("scale", torch.ones(4))
        self.tensors = [self.scale, torch.zeros(2)]  # a plain attribute holding a buffer
        self.cache = {}
        self.same_cache = self.cache  # one empty dict under two names
        self.calls = 0

    def forward(self, x):
        return self.b(self.alias(x)) * self.scale


def test_sharing_ties_and_attributes_are_kept():
    model = Tied()
    copied = deepcopy_module(model)
    assert_copied(copied, model)
    assert copied.alias is copied.a and copied.b.weight is copied.a.weight
    assert copied.tensors[0] is copied.scale and copied.tensors[1] is not model.tensors[1]
    assert copied.cache is copied.same_cache and copied.cache is not model.cache
    copied.cache["x"] = 1
    assert model.cache == {}


def test_hooks_are_kept_and_a_hook_bound_to_the_module_follows_the_copy():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)
            self.count = torch.zeros(())
            self.register_forward_hook(Counting.bump)

        def bump(self, args, output):
            self.count += 1

        def forward(self, x):
            return self.linear(x)

    model = Counting()
    seen = []
    model.linear.register_forward_pre_hook(lambda module, args: seen.append(module))
    for copier in (copy.deepcopy, deepcopy_module):
        copied = copier(model)
        copied(torch.zeros(1, 2))
        assert float(copied.count) == 1 and float(model.count) == 0
        assert seen[-1] is copied.linear


def test_memo_entries_are_used_instead_of_copies():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    borrowed = model[0].weight
    copied = deepcopy_module(model, {id(borrowed): borrowed})
    assert copied[0].weight is borrowed and copied[0].bias is not model[0].bias


class OwnProtocol(nn.Module):
    """A module with its own copy protocol: left to copy.deepcopy."""
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.deep_copies = 0

    def __deepcopy__(self, memo):
        new = OwnProtocol()
        new.linear.load_state_dict(self.linear.state_dict())
        new.deep_copies = self.deep_copies + 1
        return new


class WithState(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.derived = "kept"

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("derived")
        return state


def test_modules_with_their_own_copy_protocol_are_left_to_deepcopy():
    model = nn.Sequential(OwnProtocol(), WithState())
    copied = deepcopy_module(model)
    assert copied[0].deep_copies == 1
    assert not hasattr(copied[1], "derived") and copied[1].linear is not model[1].linear
