"""convert_model and apply_plan on hand-built nets: selection rules, sharing, side effects, plans, export."""
import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

import dsd
from dsd.convert import ConversionPlan, DepthwiseSeparableConv2d, PlanMismatch
from dsd.layers.create import check_weight


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32))
        self.proj = nn.Conv2d(32, 32, 1)
        self.wide = nn.Conv2d(32, 8, 5, padding=2)
        self.unused = nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn(self.stem(x))
        x = self.wide(self.proj(self.body(x)))
        return self.head(x.mean((2, 3)))


def records(report):
    return {r.name: r for r in report.layers}


def test_reasons_and_counts():
    model, x = Net(), torch.randn(2, 3, 16, 16)
    converted, report = dsd.convert_model(model, x, rank=1)
    by_name = records(report)
    assert {n for n, r in by_name.items() if r.status == "converted"} == {"stem", "body.0", "wide"}
    assert by_name["body.2"].category == "already depthwise"
    assert by_name["proj"].category == "1x1 kernel"
    assert by_name["unused"].category == "not called"
    assert len(report.layers) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert sum(isinstance(m, DepthwiseSeparableConv2d) for m in converted.modules()) == len(report.converted)
    assert all(r.reason for r in report.skipped)
    assert report.shapes_verified and report.traced
    assert by_name["wide"].macs_before == 16 * 16 * 32 * 8 * 25
    assert by_name["wide"].macs_after == 16 * 16 * (32 * 25 + 32 * 8)
    assert converted(x).shape == model(x).shape
    assert isinstance(model.stem, nn.Conv2d), "the original model must not be modified"


@pytest.mark.parametrize("kwargs,name,category", [
    (dict(exclude=["wide"]), "wide", "excluded"),
    (dict(exclude=["re:^w"]), "wide", "excluded"),
    (dict(include=["body.*"]), "stem", "not included"),
    (dict(min_channels=16), "wide", "min_channels"),
    (dict(skip=["stem"]), "stem", "skip rule"),
    (dict(skip=[lambda name, conv: name == "wide"]), "wide", "skip rule"),
    (dict(rank=16), "body.0", "not cheaper"),
    (dict(keep_receptive_field=True), "stem", "receptive field"),
])
def test_selection_rules(kwargs, name, category):
    _, report = dsd.convert_model(Net(), torch.randn(1, 3, 16, 16), **kwargs)
    assert records(report)[name].category == category


def test_keep_receptive_field_converts_large_kernels_only():
    _, report = dsd.convert_model(Net(), torch.randn(1, 3, 16, 16), keep_receptive_field=True)
    wide = records(report)["wide"]
    assert wide.status == "converted" and wide.new_kernel_size == (3, 3) and wide.new_dilation == (2, 2)


def test_rank_is_clamped_to_full_rank():
    _, report = dsd.convert_model(Net(), torch.randn(1, 3, 16, 16), rank=100, only_if_cheaper=False)
    assert records(report)["wide"].rank == 8  # min(out_channels=8, 5*5)
    assert records(report)["wide"].init_error < 1e-6


def test_unsupported_subclass_is_skipped_not_changed():
    class Scaled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)
    model = nn.Sequential(Scaled(4, 8, 3, padding=1))
    converted, report = dsd.convert_model(model, torch.randn(1, 4, 8, 8))
    assert report.layers[0].category == "unsupported subclass"
    assert type(converted[0]) is Scaled


def test_a_users_hooks_on_a_converted_conv_fire_on_its_separable_layer():
    """As torch.ao's swap_module: forward hooks and pre-hooks (with their kwargs / always_call flags) carry over;
    none of them sees the meta tensors of the shape check."""
    model = timm.create_model("resnet18").eval()
    seen = []
    conv = model.layer2[0].conv1
    conv.register_forward_pre_hook(lambda module, args: seen.append(("pre", type(module), args[0].device.type)))
    conv.register_forward_hook(lambda module, args, kwargs, out: seen.append(("post", tuple(out.shape))),
                               with_kwargs=True, always_call=True)
    converted, report = dsd.convert_model(model, torch.randn(1, 3, 64, 64), rank=1)
    layer = converted.layer2[0].conv1
    assert isinstance(layer, DepthwiseSeparableConv2d)
    seen.clear()
    with torch.no_grad():
        converted(torch.randn(2, 3, 64, 64))
    assert seen == [("pre", DepthwiseSeparableConv2d, "cpu"), ("post", (2, 128, 8, 8))]
    assert list(layer._forward_hooks_with_kwargs) == list(layer._forward_hooks_always_called) == list(
        layer._forward_hooks)
    assert len(conv._forward_hooks) == len(conv._forward_pre_hooks) == 1, "the original keeps its hooks"


@pytest.mark.parametrize("parametrization", ["weight_norm", "spectral_norm"])
def test_a_parametrized_conv_is_decoupled_from_its_effective_weight(parametrization):
    """torch.nn.utils.parametrizations make a subclass of the conv's class; the weight it computes is decoupled
    (exact at full rank) and the separable layer has no parametrization."""
    torch.manual_seed(0)
    wrap = getattr(torch.nn.utils.parametrizations, parametrization)
    model = nn.Sequential(wrap(nn.Conv2d(6, 12, 3, padding=1)), nn.ReLU(), wrap(nn.Conv2d(12, 12, 3))).double()
    x = torch.randn(2, 6, 11, 9, dtype=torch.float64)
    with torch.no_grad():
        model(x)  # spectral_norm's power iteration settles its vectors in training mode
    model.eval()
    converted, report = dsd.convert_model(model, x, rank="full", only_if_cheaper=False)
    assert [r.status for r in report.layers] == ["converted", "converted"]
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in converted.modules())
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-9, atol=1e-9)


def test_a_conv_with_the_deprecated_weight_norm_is_copied_and_converted():
    """torch.nn.utils.weight_norm keeps a weight inside an autograd graph, which copy.deepcopy refuses; its
    recomputing pre-hook stays behind with the conv."""
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):
        model = nn.Sequential(torch.nn.utils.weight_norm(nn.Conv2d(6, 12, 3, padding=1)), nn.ReLU(),
                              torch.nn.utils.weight_norm(nn.Conv2d(12, 12, 1))).double().eval()
    x = torch.randn(2, 6, 11, 9, dtype=torch.float64)
    converted, report = dsd.convert_model(model, x, rank="full", only_if_cheaper=False)
    assert isinstance(converted[0], DepthwiseSeparableConv2d) and not converted[0]._forward_pre_hooks
    assert "weight_g" not in dict(converted[0].named_parameters())
    assert "weight_g" in dict(converted[2].named_parameters()), "the 1x1 conv kept dense keeps its weight norm"
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-9, atol=1e-9)
        for dense in (converted[2], model[2]):  # the kept conv's weight norm still recomputes its weight
            dense.weight_g.mul_(2)
        torch.testing.assert_close(converted(x), model(x), rtol=1e-9, atol=1e-9)


def test_a_stale_weight_of_the_deprecated_weight_norm_is_recomputed_before_decoupling():
    """Until its next call, a conv under torch.nn.utils.weight_norm keeps the weight of before a load_state_dict."""
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):
        model, trained = (nn.Sequential(torch.nn.utils.weight_norm(nn.Conv2d(6, 12, 3, padding=1))) for _ in "ab")
    model.load_state_dict(trained.state_dict())
    x = torch.randn(2, 6, 11, 9)
    for inplace in (False, True):
        converted, _ = dsd.convert_model(model, x, rank="full", only_if_cheaper=False, inplace=inplace)
        with torch.no_grad():
            torch.testing.assert_close(converted(x), trained(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,feature_cls", [("resnet18", "getter"), ("resnet18", "hook"), ("resnet18", "fx"),
                                               ("ghostnet_100", "hook")])
def test_timm_feature_extractors_convert_exactly_at_full_rank(name, feature_cls):
    """features_only models (a list of feature maps; "fx" wraps torchvision's feature extractor, a GraphModule
    whose copy came back in training mode; ghostnet's "hook" extractor collects a feature from a hook on its stem
    conv, which the converted stem keeps)."""
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=True, feature_cls=feature_cls).eval()
    x = torch.randn(2, 3, 64, 64)
    converted, report = dsd.convert_model(model, x[:1], rank="full", only_if_cheaper=False)
    assert len(report.plan.layers) == {"resnet18": 17, "ghostnet_100": 1}[name] and not converted.training
    with torch.no_grad():
        for ours, theirs in zip(converted(x), model(x), strict=True):
            assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


def test_a_model_converted_under_inference_mode_can_be_fine_tuned():
    """The copy, the calibration batches and the new layers are ordinary tensors: BatchNorm's running statistics
    update and gradients flow afterwards, as for the original."""
    model, x = timm.create_model("resnet18").eval(), torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
        converted, _ = dsd.convert_model(model, x, target_flops=0.5, init="data", allocation="sensitivity",
                                         calibration_data=batches)
    assert not any(t.is_inference() for t in converted.state_dict(keep_vars=True).values())
    converted.train()
    converted(torch.randn(2, 3, 32, 32)).sum().backward()
    assert converted.layer1[0].conv1.pointwise.weight.grad is not None


def test_weights_on_the_meta_device_are_refused_unless_random_init():
    with torch.device("meta"):
        model = timm.create_model("resnet18")
    x = torch.empty(1, 3, 32, 32, device="meta")
    with pytest.raises(dsd.DsdError, match="meta device .* init='random'"):
        dsd.convert_model(model, x)
    converted, report = dsd.convert_model(model, x, init="random")
    assert len(report.plan.layers) == 17 and converted.layer1[0].conv1.depthwise.weight.is_meta


def test_converting_a_converted_model_again_leaves_its_separable_layers_as_they_are():
    model, x = timm.create_model("resnet18").eval(), torch.randn(1, 3, 32, 32)
    converted, _ = dsd.convert_model(model, x, rank=2)
    again, report = dsd.convert_model(converted, x, rank=1)
    by_category = {}
    for record in report.layers:
        by_category.setdefault(record.category, []).append(record.name)
    assert not report.converted and set(by_category) == {"already separable", "1x1 kernel"}
    separable = by_category["already separable"]
    assert "layer1.0.conv1.depthwise" in separable and len(separable) == 34


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.alias = self.conv  # the same module under two names

    def forward(self, x):
        return self.alias(self.conv(x))


def test_shared_module_converted_once_and_stays_shared():
    model = Shared().double()
    x = torch.randn(1, 8, 10, 10, dtype=torch.float64)
    converted, report = dsd.convert_model(model, x, rank="full", only_if_cheaper=False)
    assert len(report.layers) == 1 and report.layers[0].calls == 2
    assert converted.conv is converted.alias and isinstance(converted.conv, DepthwiseSeparableConv2d)
    torch.testing.assert_close(converted(x), model(x))


def test_the_converted_model_shares_no_parameter_with_the_original():
    """The copy borrows the original's conv weights while it converts; every conv it keeps (1x1, depthwise,
    excluded, unused, frozen) ends up with its own, equal copy, a tied weight stays tied, and the original is
    left as it was."""
    model, x = Net(), torch.randn(1, 3, 16, 16)
    model.unused.weight = model.stem.weight  # a weight tied between a converted conv and one left dense
    model.proj.requires_grad_(False)
    before = {name: p.clone() for name, p in model.named_parameters()}
    converted, report = dsd.convert_model(model, x, rank=1, exclude=["wide"])
    assert records(report)["stem"].status == "converted" and records(report)["unused"].status != "converted"
    originals = {id(p) for p in model.parameters()}
    assert not any(id(p) in originals for p in converted.parameters())
    for name in ("body.2", "proj", "wide", "unused"):
        for (key, kept), (_, original) in zip(converted.get_submodule(name).named_parameters(),
                                              model.get_submodule(name).named_parameters()):
            assert kept is not original and torch.equal(kept, original), (name, key)
            assert kept.requires_grad == original.requires_grad and isinstance(kept, nn.Parameter)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    with torch.no_grad():
        converted.unused.weight.add_(1.0)
    assert torch.equal(model.unused.weight, before["stem.weight"])


def test_training_flags_and_batchnorm_statistics_untouched():
    model = Net().train()
    model.bn.eval()  # a user's frozen BN
    stats = model.bn.running_mean.clone()
    converted, _ = dsd.convert_model(model, torch.randn(4, 3, 16, 16), inplace=True)
    assert converted is model and model.training and not model.bn.training
    torch.testing.assert_close(model.bn.running_mean, stats)


def test_without_example_inputs():
    converted, report = dsd.convert_model(Net())
    assert report.shapes_verified is None and report.conv_macs() == (None, None)
    assert records(report)["unused"].calls == 0 and records(report)["stem"].status == "converted"


def test_untraceable_model_falls_back_to_module_tree():
    class Branchy(Net):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                x = x + 1
            return super().forward(x)
    converted, report = dsd.convert_model(Branchy(), torch.randn(1, 3, 16, 16))
    assert not report.traced and "control flow" in report.trace_error
    assert {r.found_by for r in report.layers} == {"module-tree"}
    assert len(report.converted) == 3 and report.shapes_verified


def test_bad_example_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"does not run on example inputs of shape \(1, 5, 16, 16\)"):
        dsd.convert_model(Net(), torch.randn(1, 5, 16, 16))
    with pytest.raises(ValueError, match=r"example inputs \(a list of 1\).*a tuple holds the forward's arguments"):
        dsd.convert_model(Net(), [torch.randn(1, 3, 16, 16)])


def test_calibration_data_that_the_model_cannot_take_is_a_clear_error():
    with pytest.raises(dsd.DsdError, match=r"does not run on calibration_data \(its first input\) of shape "
                                           r"\(1, 1, 16, 16\).*3 channels"):
        dsd.convert_model(Net(), torch.randn(1, 3, 16, 16), init="data", calibration_data=[torch.randn(4, 1, 16, 16)])


def test_a_calibration_tensor_is_one_batch():
    """Iterated, a tensor would give single images; it is taken as the batch it is."""
    model, x, batch = Net(), torch.randn(1, 3, 16, 16), torch.randn(8, 3, 16, 16)
    _, from_tensor = dsd.convert_model(model, x, init="data", target_flops=0.5, calibration_data=batch)
    _, from_list = dsd.convert_model(model, x, init="data", target_flops=0.5, calibration_data=[batch])
    assert from_tensor.plan.to_dict() == from_list.plan.to_dict()


def test_plan_round_trip_through_safetensors(tmp_path):
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    converted, report = dsd.convert_model(model, x, rank=2, dilation=2)
    save_model(converted, str(tmp_path / "w.safetensors"))
    report.plan.save(tmp_path / "plan.json")

    fresh = dsd.apply_plan(Net(), ConversionPlan.load(tmp_path / "plan.json"))
    load_model(fresh, str(tmp_path / "w.safetensors"))
    fresh.eval()
    torch.testing.assert_close(fresh(x), converted.eval()(x), rtol=0, atol=0)
    assert ConversionPlan.load(tmp_path / "plan.json").to_dict() == report.plan.to_dict()


@pytest.mark.parametrize("init", ["svd", "data"])
def test_a_converted_model_has_the_layout_of_the_same_model_rebuilt_from_its_plan(init):
    """DDP compares every parameter's strides across ranks: a student converted on rank 0 and rebuilt from its plan
    on the others must match (the svd pointwise weights were transposed views, strides (1, 64, 1, 1))."""
    model = timm.create_model("resnet18", num_classes=10).eval()
    batches = [torch.randn(2, 3, 32, 32)]
    converted, report = dsd.convert_model(model, batches[0][:1], rank=1, init=init, calibration_data=batches)
    rebuilt = dsd.apply_plan(timm.create_model("resnet18", num_classes=10).eval(), report.plan)
    rebuilt.load_state_dict(converted.state_dict())
    layouts = lambda m: {n: t.stride() for n, t in m.state_dict().items()}  # noqa: E731
    assert layouts(converted) == layouts(rebuilt)


def test_plan_that_does_not_fit_is_refused():
    _, report = dsd.convert_model(Net(), torch.randn(1, 3, 16, 16))
    other = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(PlanMismatch, match="does not have"):
        dsd.apply_plan(other, report.plan)


def test_timm_model_keeps_its_class_and_methods():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", num_classes=10)
    converted, _ = dsd.convert_model(model, torch.randn(1, 3, 64, 64))
    assert type(converted) is type(model) and converted.pretrained_cfg == model.pretrained_cfg
    assert converted.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)
    converted.reset_classifier(5)
    assert converted(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def _separable(**kwargs):
    return dsd.from_conv(nn.Conv2d(8, 16, 3, **kwargs), rank=2).eval()


@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(padding="same", padding_mode="reflect"),
                                    dict(padding=(0, 2), stride=2)])
def test_jit_trace(kwargs):
    module, x = _separable(**kwargs), torch.randn(1, 8, 12, 12)
    traced = torch.jit.trace(module, x)
    torch.testing.assert_close(traced(x), module(x))


@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(kernel_size=4, padding="same")])
def test_torch_compile(kwargs):
    conv_kwargs = {"kernel_size": 3, **kwargs}
    module = dsd.from_conv(nn.Conv2d(8, 16, **conv_kwargs), rank=2).eval()
    x = torch.randn(1, 8, 12, 12)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x))


def test_torch_compile_tf_same_padding():
    timm = pytest.importorskip("timm")
    module = dsd.from_conv(timm.layers.Conv2dSame(8, 16, 3, stride=2), rank=2).eval()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    for size in (11, 12):
        x = torch.randn(1, 8, size, size)
        torch.testing.assert_close(compiled(x), module(x))


def test_onnx_export_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    module, x = _separable(padding=(1, 2)), torch.randn(1, 8, 12, 12)
    path = tmp_path / "sep.onnx"
    torch.onnx.export(module, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), module(x), rtol=1e-4, atol=1e-5)


def test_a_compiled_or_data_parallel_model_is_converted_inside_its_wrapper():
    """Traced as the plain model (not through the wrapper, which would compile it on the analysis run), returned
    unwrapped with a note; the same layers and weights as converting the plain model."""
    timm = pytest.importorskip("timm")
    model, x = timm.create_model("resnet18").eval(), torch.randn(1, 3, 32, 32)
    plain, plain_report = dsd.convert_model(model, x)
    for wrapped in (torch.compile(model), nn.DataParallel(torch.compile(model))):
        converted, report = dsd.convert_model(wrapped, x)
        assert type(converted) is type(model) and report.traced
        assert any("wrapper" in note and "again" in note for note in report.notes)
        assert [layer.name for layer in report.plan.layers] == [layer.name for layer in plain_report.plan.layers]
        for key, value in plain.state_dict().items():
            torch.testing.assert_close(converted.state_dict()[key], value, rtol=0, atol=0)


def test_extra_repr_is_readable():
    text = repr(dsd.from_conv(nn.Conv2d(8, 16, 3, padding=1, stride=2, groups=2), rank=2, dilation=2))
    assert "8, 16, kernel_size=(3, 3), rank=2" in text and "dilation=(2, 2)" in text and "groups=2" in text


@pytest.mark.slow
def test_torch_compile_inductor_on_a_converted_model():
    """The default backend (inductor, which generates and compiles C++ here) on a whole converted model."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    converted, _ = dsd.convert_model(model, x)
    compiled = torch.compile(converted)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), converted(x), rtol=1e-4, atol=1e-4)


def test_shape_verification_catches_a_changed_output_shape():
    """The check behind shapes_verified: a replacement that maps an input shape to another output fails."""
    from dsd.convert.match import analyze
    from dsd.convert.pipeline import verify_shapes
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), torch.randn(2, 3, 8, 8)
    analysis = analyze(model, x)
    model[0] = nn.Conv2d(3, 4, 3)  # no padding: 8x8 -> 6x6
    with pytest.raises(RuntimeError, match=r"changed output shape.*\(2, 4, 8, 8\), \(2, 4, 6, 6\)"):
        verify_shapes(analysis, {"0": model[0]})
    assert verify_shapes(analysis, {"0": nn.Conv2d(3, 4, 5, padding=2)})


def test_frozen_layers_stay_frozen():
    model, x = Net(), torch.randn(1, 3, 16, 16)
    model.stem.requires_grad_(False)
    converted, _ = dsd.convert_model(model, x, rank=1)
    assert not any(p.requires_grad for p in converted.stem.parameters())
    assert all(p.requires_grad for p in converted.wide.parameters())


def test_weights_that_cannot_be_decoupled_are_refused():
    model, x = Net(), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        model.wide.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(dsd.DsdError, match="layer 'wide' has 1 NaN or inf weight values"):
        dsd.convert_model(model, x)
    huge = nn.Conv2d(4, 8, 3)
    with torch.no_grad():
        huge.weight[:, 0, 0, 0] = 3e38  # finite, though their sum is not
    check_weight(huge)
    with pytest.raises(dsd.DsdError, match="already depthwise"):
        dsd.from_conv(nn.Conv2d(8, 8, 3, groups=8))
    integer = nn.Conv2d(4, 8, 3)
    integer.weight = nn.Parameter(integer.weight.data.round().to(torch.int32), requires_grad=False)
    with pytest.raises(dsd.DsdError, match="torch.int32 weights"):
        dsd.from_conv(integer)
    with pytest.raises(dsd.DsdError, match="no such plan file"):
        dsd.ConversionPlan.load("no_such.plan.json")


def test_the_report_says_what_the_options_did():
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    batches = [torch.randn(2, 3, 16, 16) for _ in range(5)]
    _, report = dsd.convert_model(model, x, init="data", calibration_data=batches, calibration_batches=2,
                                  recalibrate_bn=True)
    assert ("calibration used the first 2 of the 5 batches given (calibration_batches), and the fidelity figure the "
            "next 2, held out" in report.summary())
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        assert "the model has no BatchNorm layers, so nothing was re-estimated" in report.summary()
    _, report = dsd.convert_model(model, x, rank="full")
    assert "rank 'full' (the exact conversion) costs more multiply-adds than the dense conv" in report.summary()
    assert "--allow-costlier" in report.summary() and not report.notes == []


def test_a_single_input_channel_conv_is_named_as_such():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    _, report = dsd.convert_model(model, torch.randn(1, 1, 8, 8))
    first = records(report)["0"]
    assert first.category == "single input channel" and "8 filters" in first.reason
    assert "only under a budget" in first.reason


def test_a_single_input_channel_conv_is_a_low_rank_filter_bank_under_a_budget():
    """CREPE's first conv (1 -> 1024 channels, 512 taps) is 45% of its FLOPs: a budget may convert it."""
    model = nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1)).double().eval()
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    _, report = dsd.convert_model(model, x, target_params=0.3)
    assert records(report)["0"].rank is not None  # converted: a rank-r bank of r basis filters and a 1x1 mix
    exact, _ = dsd.convert_model(model, x, target_params=1.0, only_if_cheaper=False)
    torch.testing.assert_close(exact(x), model(x))  # the least-error choice fits: everything stays as it was
    spec = dsd.layers.layer_spec(model[0], 25, single_channel=True)
    layer = spec.build(dtype=torch.float64)
    dsd.layers.get_initializer("svd")(layer, model[0].weight, model[0].bias)
    torch.testing.assert_close(layer(x), model[0](x))  # exact at full rank (min(32, 5 * 5))


def test_fidelity_on_the_calibration_data_is_reported():
    model = timm.create_model("resnet18", num_classes=10).eval()
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    converted, report = dsd.convert_model(model, batches[0][:1], rank="full", only_if_cheaper=False,
                                          calibration_data=batches)
    assert report.fidelity.samples == 8 and report.fidelity.relative_error < 1e-4
    assert report.fidelity.top1_agreement == 1.0 and "top-1 agreement 100.0%" in report.summary()
    _, rank1 = dsd.convert_model(model, batches[0][:1], calibration_data=batches)
    assert rank1.fidelity.relative_error > report.fidelity.relative_error
    assert dsd.convert_model(model, batches[0][:1])[1].fidelity is None  # no data, no figure
    assert not report.fidelity.held_out and "fidelity on 8 calibration samples" in report.summary()
    _, one_batch = dsd.convert_model(model, batches[0][:1], calibration_data=torch.cat(batches * 2))
    assert one_batch.fidelity.samples == 16 and not one_batch.notes  # a tensor is one batch, not 16 batches of one


def test_fidelity_is_measured_on_held_out_batches_where_given():
    """Batches beyond calibration_batches (up to as many again) are what the fidelity figure is measured on: data
    the conversion was not fitted to (on CREPE the in-sample figure was up to a quarter lower)."""
    from dsd.convert.fidelity import measure_fidelity
    model = timm.create_model("resnet18", num_classes=10).eval()
    batches = [torch.randn(4, 3, 32, 32) for _ in range(4)]
    options = dict(rank=2, init="data", calibration_batches=1)
    _, in_sample = dsd.convert_model(model, batches[0][:1], calibration_data=batches[:1], **options)
    converted, held_out = dsd.convert_model(model, batches[0][:1], calibration_data=batches, **options)
    assert held_out.plan.to_dict() == in_sample.plan.to_dict()  # the same conversion: only the figure's data moved
    assert held_out.fidelity == measure_fidelity(model, converted, batches[1:2], held_out=True)
    assert in_sample.fidelity == measure_fidelity(model, converted, batches[:1])
    assert "fidelity on 4 held-out calibration samples" in held_out.summary()
    assert "the first 1 of the 4 batches given" in held_out.summary()


def test_one_error_figure_per_layer_named_by_its_kind():
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    _, plain = dsd.convert_model(model, x)
    stem = records(plain)["stem"]
    assert stem.error == stem.init_error and stem.error_kind == "weight" and "(weight)" in plain.to_markdown()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    _, data = dsd.convert_model(model, x, init="data", calibration_data=batches)
    stem = records(data)["stem"]
    assert stem.error == stem.output_error and stem.error_kind == "output" and 0 <= stem.error < 1
    assert "(output)" in data.to_markdown() and records(data)["proj"].error is None


@pytest.mark.parametrize("init", ["svd", "data"])
def test_a_conversion_under_autocast_decouples_in_full_precision(init):
    """A caller's autocast does not reach the decoupling: the same layers as without it (a bfloat16 Gram product
    put a full-rank conversion 4e-3 off its conv)."""
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(4, 3, 16, 16)
    kwargs = dict(rank="full", only_if_cheaper=False, init=init)
    if init == "data":
        kwargs["calibration_data"] = [x]
    plain, _ = dsd.convert_model(model, x, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under, _ = dsd.convert_model(model, x, **kwargs)
    assert torch.is_autocast_enabled("cpu") is False
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(under.state_dict()[key], value, rtol=0, atol=0, msg=key)
