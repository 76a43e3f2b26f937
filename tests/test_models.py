"""Real timm and torchvision models (random weights, no downloads): conversion works on "any model"."""
import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import dsd
import dsd.zoo
from dsd.convert import DepthwiseSeparableConv2d
from dsd.layers import static_forms

TIMM_MODELS = [  # one or two per family, small variants; (name, input size)
    ("resnet18", 64), ("resnext26ts", 64), ("regnetx_002", 64), ("efficientnet_b0", 64),
    ("tf_efficientnet_b0", 65),  # Conv2dSame: dynamic TF padding, odd size on purpose
    ("mobilenetv3_small_050", 64), ("convnext_atto", 64), ("densenet121", 64), ("vgg11", 64), ("dla34", 64),
    ("dm_nfnet_f0", 64),  # ScaledStdConv2dSame
    ("cspresnet50", 64), ("hrnet_w18_small", 64), ("inception_v3", 96),  # non-square 1x7 / 7x1 kernels
    ("skresnet18", 64), ("mobilevit_xxs", 64),  # convs inside leaf modules
]

TORCHVISION_MODELS = [("resnet18", {}), ("mobilenet_v3_small", {}), ("regnet_x_400mf", {}),
                      ("googlenet", {"aux_logits": False, "init_weights": False})]


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def check_report(model, converted, report):
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(report.layers) == len(set(map(id, convs)))
    assert sum(isinstance(m, DepthwiseSeparableConv2d) for m in converted.modules()) == len(report.converted) > 0
    assert all(r.reason and r.category for r in report.skipped)
    assert all(r.rank >= 1 and r.init_error is not None for r in report.converted)
    assert report.shapes_verified
    before, after = report.conv_macs()
    assert after < before


# vgg's 7x7 512->4096 pre-logits conv would become a 25,088-channel depthwise layer at full rank: slow on CPU.
FULL_RANK_EXCLUDE = {"vgg11": ["pre_logits.*"]}


def check_full_rank(model, example, forward=lambda m, x: m(x), exclude=()):
    """At full rank (and original dilation) the converted model reproduces the original, in float64 (in the
    layers' static forms: every form is the same function, tested in test_geometry, and timing four of them at
    full rank in float64 took up to half of a test)."""
    model = model.double().eval()
    example = example.double()
    converted, report = dsd.convert_model(model, example, rank="full", only_if_cheaper=False, exclude=exclude)
    assert len(report.converted) > 0
    with torch.no_grad(), static_forms():
        assert rel_error(forward(converted, example), forward(model, example)) < 1e-6


@pytest.mark.parametrize("name,size", TIMM_MODELS, ids=[n for n, _ in TIMM_MODELS])
def test_timm_model(name, size):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, size, size)
    converted, report = dsd.convert_model(model, x, rank=1)
    assert report.traced, report.trace_error
    check_report(model, converted, report)
    assert converted(x).shape == model(x).shape
    check_full_rank(model, x, exclude=FULL_RANK_EXCLUDE.get(name, ()))


@pytest.mark.parametrize("name,kwargs", TORCHVISION_MODELS, ids=[n for n, _ in TORCHVISION_MODELS])
def test_torchvision_model(name, kwargs):
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    converted, report = dsd.convert_model(model, x, rank=1)
    check_report(model, converted, report)
    check_full_rank(model, x)


@pytest.mark.parametrize("name", ["digits_cnn", "digits_resnet", "digits_mobilenet"])
def test_builtin_digits_models(name):
    """The built-in models (torchvision BasicBlock, timm EfficientNet blocks) convert, exactly at full rank."""
    model = dsd.zoo.build(name).eval()
    x = torch.randn(2, 1, 32, 32)
    converted, report = dsd.convert_model(model, x, rank=1)
    assert report.traced
    check_report(model, converted, report)
    check_full_rank(model, x)


def test_torchvision_detection_model_falls_back():
    """Detection models do not trace (data-dependent control flow): the module-tree fallback converts them."""
    model = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                         weights_backbone=None).eval()
    images = [torch.rand(3, 160, 160)]
    converted, report = dsd.convert_model(model, (images,), rank=1)
    assert not report.traced and report.trace_error
    check_report(model, converted, report)
    assert set(converted(images)[0]) == {"boxes", "labels", "scores"}

    def features(m, x):  # detections of a random net are empty; compare the FPN features instead
        return torch.cat([f.flatten() for f in m.backbone(x).values()])
    check_full_rank(model, torch.rand(1, 3, 160, 160), features)


def test_conv_modules_timm_reads_outside_forward_still_work():
    """edgenext's positional encoding reads ``conv.weight`` for its dtype; only 1x1 convs there, never converted."""
    model = timm.create_model("edgenext_xx_small").eval()
    x = torch.randn(1, 3, 64, 64)
    converted, report = dsd.convert_model(model, x, rank=1)
    assert converted(x).shape == model(x).shape


def test_detection_heads_with_data_dependent_batch():
    """Mask R-CNN's mask head runs on however many boxes survive: after conversion that number changes,
    which is not a changed output shape (this raised "dsd bug" before shapes were compared per input)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model("maskrcnn_resnet50_fpn", weights=None, weights_backbone=None).eval()
    converted, report = dsd.convert_model(model, ([torch.rand(3, 160, 160)],), rank=1)
    assert report.shapes_verified and any(r.name.startswith("roi_heads.mask_head") for r in report.converted)
