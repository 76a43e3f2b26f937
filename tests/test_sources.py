"""One source parser for the CLI, load_model, plans and recipes; code runs only with trust_code."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsd
from dsd.io import default_stem, parse_source

BIN = Path(sys.executable).parent
NET = ("import torch.nn as nn\n"
       "def small(width=8):\n"
       "    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))\n")


@pytest.mark.parametrize("text,kind,name", [
    ("timm:resnet18", "timm", "resnet18"),
    ("torchvision:resnet18", "torchvision", "resnet18"),
    ("dsd:digits_cnn", "dsd", "digits_cnn"),
    ("my_pkg.nets:small", "factory", "my_pkg.nets:small"),
    ("model.pt", "file", "model.pt"),
    ("dir/model_dsd.plan.json", "plan", "dir/model_dsd.plan.json"),
])
def test_parse_source(text, kind, name):
    ref = parse_source(text)
    assert (ref.kind, ref.name) == (kind, name)


def test_existing_file_wins_over_factory_reading(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.b:c").write_text("x")
    assert parse_source("a.b:c").kind == "file"


def test_default_stem_for_every_kind():
    assert default_stem("timm:resnet50") == Path("resnet50")
    assert default_stem("my_pkg.nets:small") == Path("my_pkg_nets_small")
    assert default_stem("dir/model.pt") == Path("dir/model")
    assert default_stem("dir/m_dsd.plan.json") == Path("dir/m_dsd")


@pytest.mark.parametrize("name", sorted(dsd.zoo.MODELS))
def test_built_in_models_say_what_input_they_take(tmp_path, monkeypatch, name):
    """As timm's models do (``pretrained_cfg``): ``dsd-convert dsd:NAME`` needs no --input-size."""
    from dsd.cli.main import convert_main
    model = dsd.load_model(f"dsd:{name}", arch_kwargs={"in_chans": 3})[0]
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    assert model.eval()(x).shape == (2, model.pretrained_cfg["num_classes"])
    monkeypatch.chdir(tmp_path)
    assert convert_main([f"dsd:{name}", "--quiet"]) == 0
    plan = json.loads((tmp_path / f"{name}_dsd.plan.json").read_text())
    assert plan["layers"]


@pytest.mark.parametrize("name", ["fcn_resnet50", "fasterrcnn_mobilenet_v3_large_320_fpn",
                                  "ssdlite320_mobilenet_v3_large"])
def test_torchvision_models_with_a_backbone_build_without_downloading(monkeypatch, name):
    """Segmentation and detection builders default to ImageNet backbone weights: without --pretrained dsd builds
    them with random weights (no download; the one attempt would fail offline with a URLError)."""
    def no_download(*args, **kwargs):
        raise AssertionError("dsd tried to download weights")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model, source = dsd.load_model(f"torchvision:{name}")
    assert source.random_weights and sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 10


def test_weights_saved_through_ddp_or_torch_compile_load(tmp_path):
    """A training script's checkpoint of a wrapped model names its keys module.* (DDP), _orig_mod.* (torch.compile)
    or both; dsd reads them as timm's clean_state_dict does."""
    from safetensors.torch import save_file
    original = dsd.zoo.digits_cnn(width=8).state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in original.items()}}, tmp_path / "ddp.pth")
    save_file({f"_orig_mod.module.{k}": v for k, v in original.items()}, tmp_path / "both.safetensors")
    for name in ("ddp.pth", "both.safetensors"):
        model, _ = dsd.load_model(str(tmp_path / name), arch="dsd:digits_cnn", arch_kwargs={"width": 8})
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, original[key], rtol=0, atol=0)


def test_training_checkpoints_of_timm_pytorch_examples_and_lightning_load(tmp_path):
    """timm's train.py writes model_best.pth.tar with its argparse.Namespace of arguments; PyTorch's ImageNet
    example checkpoint.pth.tar with DataParallel's module.*; Lightning a .ckpt whose keys carry the attribute the
    LightningModule keeps the network under (model.*). Each loads with weights_only=True, and converts."""
    import argparse

    from dsd.cli.main import convert_main
    original = dsd.zoo.digits_cnn(width=8).state_dict()
    torch.save({"epoch": 3, "arch": "digits_cnn", "state_dict": original, "version": 2, "metric": 71.2,
                "args": argparse.Namespace(lr=0.1, model="digits_cnn")}, tmp_path / "model_best.pth.tar")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in original.items()},
                "best_acc1": torch.tensor(70.1)}, tmp_path / "checkpoint.pth.tar")
    torch.save({"epoch": 3, "global_step": 10, "hyper_parameters": {"lr": 0.1},
                "state_dict": {f"model.{k}": v for k, v in original.items()}}, tmp_path / "lightning.ckpt")
    for name in ("model_best.pth.tar", "checkpoint.pth.tar", "lightning.ckpt"):
        model, _ = dsd.load_model(str(tmp_path / name), arch="dsd:digits_cnn", arch_kwargs={"width": 8})
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, original[key], rtol=0, atol=0)
    assert convert_main([str(tmp_path / "model_best.pth.tar"), "--arch", "dsd:digits_cnn", "--arch-kwarg", "width=8",
                         "--quiet"]) == 0
    assert (tmp_path / "model_best_dsd.safetensors").exists() and (tmp_path / "model_best_dsd.plan.json").exists()


def test_a_common_prefix_is_removed_only_where_the_keys_then_fit(tmp_path):
    original = dsd.zoo.digits_cnn(width=8).state_dict()
    torch.save({f"student.{k}": v for k, v in list(original.items())[:-1]}, tmp_path / "partial.pt")
    with pytest.raises(dsd.DsdError, match="does not fit .* missing"):
        dsd.load_model(str(tmp_path / "partial.pt"), arch="dsd:digits_cnn", arch_kwargs={"width": 8})


def test_weights_saved_by_safetensors_save_model_load_where_the_model_holds_a_tensor_under_two_names(tmp_path):
    """safetensors' ``save_model`` writes a shared tensor once (timm's coat shares its conv position encodings
    between stages): the other names were reported missing."""
    import timm
    from safetensors.torch import save_model
    original = timm.create_model("coat_lite_tiny").eval()
    save_model(original, str(tmp_path / "coat.safetensors"))
    model, _ = dsd.load_model(str(tmp_path / "coat.safetensors"), arch="timm:coat_lite_tiny")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original.state_dict()[key], rtol=0, atol=0)
    assert model.serial_blocks1[0].cpe is model.cpe1


def test_a_model_that_checks_its_state_dict_version_loads_from_safetensors(tmp_path):
    """safetensors keeps no module versions; torchvision's MNASNet refuses a state dict without one, so its
    weights and its converted model could not be loaded."""
    import torchvision
    from safetensors.torch import save_model
    original, x = torchvision.models.mnasnet0_5().eval(), torch.randn(1, 3, 64, 64)
    save_model(original, str(tmp_path / "mnasnet.safetensors"))
    model = dsd.load_model(str(tmp_path / "mnasnet.safetensors"), arch="torchvision:mnasnet0_5")[0].eval()
    converted, report = dsd.convert_model(model, x, rank=2)
    dsd.save_converted(converted, report.plan, tmp_path / "mnasnet_dsd.safetensors", arch="torchvision:mnasnet0_5")
    again = dsd.load_converted(tmp_path / "mnasnet_dsd.plan.json")
    with dsd.layers.static_forms(), torch.no_grad():
        torch.testing.assert_close(again(x), converted(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)


class _BlockRegisteredTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.block = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16))
        self.again = self.block

    def forward(self, x):
        return self.again(self.block(self.stem(x)))


def test_a_converted_model_with_a_batchnorm_registered_twice_reloads(tmp_path):
    """safetensors' ``load_model`` counted the BatchNorm's ``num_batches_tracked`` under its second name as
    unexpected (BatchNorm fills that key in itself): ``load_converted`` refused every such model."""
    torch.manual_seed(0)
    model, x = _BlockRegisteredTwice().eval(), torch.randn(2, 3, 12, 12)
    model.block[1].running_var.uniform_(0.5, 2)
    converted, report = dsd.convert_model(model, x, rank=2)
    dsd.save_converted(converted, report.plan, tmp_path / "net.safetensors")
    again = dsd.load_converted(tmp_path / "net.plan.json", model=_BlockRegisteredTwice())
    torch.testing.assert_close(again(x), converted(x), rtol=0, atol=0)
    assert again.block is again.again


def test_a_converted_model_whose_weights_miss_a_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    model, x = _BlockRegisteredTwice().eval(), torch.randn(1, 3, 8, 8)
    converted, report = dsd.convert_model(model, x, rank=1)
    dsd.save_converted(converted, report.plan, tmp_path / "net.safetensors")
    weights = load_file(str(tmp_path / "net.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.endswith("running_var")}, str(tmp_path / "net.safetensors"))
    plan = json.loads((tmp_path / "net.plan.json").read_text())
    plan["source"].pop("weights_sha256")
    (tmp_path / "net.plan.json").write_text(json.dumps(plan))
    with pytest.raises(dsd.DsdError, match=r"does not fit the model rebuilt from .*missing: .*running_var"):
        dsd.load_converted(tmp_path / "net.plan.json", model=_BlockRegisteredTwice())


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_nets_for_dsd.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_nets_for_dsd:small"
    sys.modules.pop("user_nets_for_dsd", None)


def test_package_module_factory_source_needs_trust_code(user_module):
    with pytest.raises(dsd.DsdError, match="--trust-code"):
        dsd.load_model(user_module)
    model, source = dsd.load_model(user_module, arch_kwargs={"width": 4}, trust_code=True)
    assert model[2].out_channels == 4 and source.arch == user_module


def test_factory_source_converts_from_the_command_line(tmp_path, user_module):
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([str(BIN / "dsd-convert"), user_module, "--trust-code", "--input-size", "3", "16", "16",
                             "--quiet"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "user_nets_for_dsd_small_dsd.plan.json").is_file()


def _evil_plan(tmp_path: Path) -> Path:
    """A plan whose architecture would create a file if it were ever called."""
    marker = tmp_path / "code_ran"
    plan = {"version": 1, "options": {}, "layers": [],
            "source": {"arch": "os:system",
                       "arch_kwargs": {"command": f"touch {marker}"}, "converted_weights": "evil.safetensors"}}
    (tmp_path / "evil.safetensors").write_bytes(b"")
    path = tmp_path / "evil.plan.json"
    path.write_text(json.dumps(plan))
    return path


def test_a_plan_cannot_run_code_through_any_entry_point(tmp_path):
    plan = _evil_plan(tmp_path)
    with pytest.raises(dsd.DsdError, match="trust_code=True"):
        dsd.load_converted(plan)
    torch.save(torch.nn.Conv2d(3, 4, 3).state_dict(), tmp_path / "orig.pt")
    commands = [["dsd-convert", str(plan)],
                ["dsd", "report", "timm:resnet18", "--against", str(plan), "--input-size", "3", "32", "32"]]
    for command in commands:
        result = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=tmp_path, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2, result.stderr
        assert "--trust-code" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "code_ran").exists()


def test_a_recipe_teacher_cannot_run_code(tmp_path, user_module):
    from dsd.finetune import finetune, load_recipe
    recipe = load_recipe("digits", [f"teacher.source={user_module}", "teacher.pretrained=false",
                                    f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(dsd.DsdError, match="trust_code=True"):
        finetune(recipe, progress=False)
