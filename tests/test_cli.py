"""The installed console scripts, run as a user would: every input format, their refusals, no stray files (the table
of bad inputs runs in-process: tests/test_bad_inputs.py)."""
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import dsd

BIN = Path(sys.executable).parent
SMALL = ["--input-size", "3", "32", "32", "--quiet"]


def run(*args, cwd, script="dsd-convert", env=None):
    result = subprocess.run([str(BIN / script), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=300)
    return result


def files(directory):
    return sorted(p.name for p in Path(directory).iterdir())


def assert_refused(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, last


@pytest.fixture
def resnet_state_dict(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    return path


# -- inputs that work ------------------------------------------------------------------------------

def test_timm_name_writes_weights_and_plan_and_round_trips(tmp_path):
    result = run("timm:resnet18", *SMALL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert files(tmp_path) == ["resnet18_dsd.plan.json", "resnet18_dsd.safetensors"]
    reloaded = dsd.load_converted(tmp_path / "resnet18_dsd.plan.json")
    assert sum(isinstance(m, dsd.DepthwiseSeparableConv2d) for m in reloaded.modules()) == 17
    by_weights = dsd.load_converted(tmp_path / "resnet18_dsd.safetensors")  # the plan beside the weights
    for a, b in zip(reloaded.state_dict().values(), by_weights.state_dict().values()):
        assert torch.equal(a, b)


def test_round_trip_equals_in_memory_conversion(tmp_path, resnet_state_dict):
    result = run(resnet_state_dict, "--arch", "timm:resnet18", "--rank", "2", "--dilation", "2", *SMALL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model = timm.create_model("resnet18")
    model.load_state_dict(torch.load(resnet_state_dict, weights_only=True))
    in_memory, _ = dsd.convert_model(model, torch.randn(1, 3, 32, 32), rank=2, dilation=2)
    reloaded = dsd.load_converted(tmp_path / "weights_dsd.plan.json")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded(x), in_memory.eval()(x))


def test_safetensors_and_nested_checkpoint_and_torchvision(tmp_path):
    model = timm.create_model("resnet18")
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, tmp_path / "ckpt.pth")
    assert run(tmp_path / "w.safetensors", "--arch", "timm:resnet18", "-o", tmp_path / "a.safetensors", *SMALL,
               cwd=tmp_path).returncode == 0
    assert run(tmp_path / "ckpt.pth", "--arch", "timm:resnet18", "-o", tmp_path / "b.safetensors", *SMALL,
               cwd=tmp_path).returncode == 0
    result = run("torchvision:mobilenet_v3_small", *SMALL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mobilenet_v3_small_dsd.plan.json").exists()


def test_factory_arch_with_kwargs(tmp_path):
    (tmp_path / "mynets.py").write_text(
        "import torch.nn as nn\n"
        "def small(width=8):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))\n")
    import importlib
    sys.path.insert(0, str(tmp_path))
    try:
        state = importlib.import_module("mynets").small(width=16).state_dict()
        torch.save(state, tmp_path / "small.pt")
        args = [tmp_path / "small.pt", "--arch", "mynets:small", "--arch-kwarg", "width=16", *SMALL]
        assert_refused(run(*args, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)}), "--trust-code")
        assert files(tmp_path) == ["mynets.py", "small.pt"]
        result = run(*args, "--trust-code", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
        assert result.returncode == 0, result.stderr
        with pytest.raises(dsd.DsdError, match="trust_code=True"):
            dsd.load_converted(tmp_path / "small_dsd.plan.json")
        reloaded = dsd.load_converted(tmp_path / "small_dsd.plan.json", trust_code=True)
        assert isinstance(reloaded[2], dsd.DepthwiseSeparableConv2d)
    finally:
        sys.path.remove(str(tmp_path))


@pytest.mark.parametrize("text,value", [
    ("num_classes=10", 10), ("drop_rate=1e-3", 1e-3), ("weights_backbone=null", None),
    ("weights_backbone=None", None), ("pretrained=True", True), ("size=[224, 224]", [224, 224]),
    ("size=(224, 224)", (224, 224)), ("name=resnet18.a1_in1k", "resnet18.a1_in1k"), ("name='3'", "3"), ("name=", ""),
])
def test_arch_kwargs_read_as_json_then_as_python_literals(text, value):
    """A constructor's keywords are Python's: ``None`` was the string 'None' (torchvision then failed in its enum)."""
    from dsd.cli.common import key_value
    assert key_value(text) == (text.partition("=")[0], value)


def test_pickled_module_only_with_trust_pickle(tmp_path):
    torch.save(timm.create_model("resnet18"), tmp_path / "whole.pt")
    assert_refused(run(tmp_path / "whole.pt", *SMALL, cwd=tmp_path), "--trust-pickle")
    assert files(tmp_path) == ["whole.pt"]
    result = run(tmp_path / "whole.pt", "--trust-pickle", "--save-module", *SMALL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert files(tmp_path) == ["whole.pt", "whole_dsd.plan.json", "whole_dsd.pt", "whole_dsd.safetensors"]


def test_onnx_export_and_report_files(tmp_path):
    result = run("timm:resnet18", "--export", "onnx", "--json", "r.json", "--md", "r.md", "--plot", "r.png",
                 "--iters", "2", "--warmup", "0", *SMALL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert files(tmp_path) == ["r.json", "r.md", "r.png", "resnet18_dsd.onnx", "resnet18_dsd.plan.json",
                               "resnet18_dsd.safetensors"]


def test_report_command_against_converted_plan(tmp_path):
    assert run("timm:resnet18", *SMALL, cwd=tmp_path).returncode == 0
    result = run("report", "timm:resnet18", "--against", "resnet18_dsd.plan.json", "--input-size", "3", "32", "32",
                 "--iters", "2", "--warmup", "0", cwd=tmp_path, script="dsd")
    assert result.returncode == 0, result.stderr
    assert "speedup" in result.stdout and "layer4.1.conv2" in result.stdout


def test_python_m_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dsd.cli", "convert", "timm:resnet18", *SMALL], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_keep_receptive_field_skips_small_kernels_with_a_reason(tmp_path):
    result = run("timm:resnet18", "--keep-receptive-field", "--input-size", "3", "32", "32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 of 20 Conv2d layers converted" in result.stdout and "16 receptive field" in result.stdout


# -- bad input: exit 2, one line, nothing written ----------------------------------------------------

def test_console_script_refuses_in_one_line_with_exit_2(tmp_path):
    """The installed script's refusal as a user meets it; every other bad input is in test_bad_inputs.py's table,
    run in-process through the same entry point."""
    assert_refused(run(tmp_path / "nope.pt", *SMALL, cwd=tmp_path), "no such file")
    assert files(tmp_path) == []


class Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this would create the marker file
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_malicious_pickle_does_not_execute(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weights": Marker(str(marker))}, tmp_path / "evil.pt")
    assert not marker.exists()
    assert_refused(run(tmp_path / "evil.pt", *SMALL, cwd=tmp_path), "--trust-pickle")
    assert not marker.exists()


def test_output_into_a_new_folder_creates_it(tmp_path):
    """As ``mkdir -p``: the folders of -o are made when the outputs are written."""
    result = run("timm:resnet18", "-o", tmp_path / "new" / "deeper" / "x.safetensors", *SMALL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir()) == ["x.plan.json", "x.safetensors"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert_refused(run("timm:resnet18", "-o", locked / "x.safetensors", *SMALL, cwd=tmp_path), "not writable")


def test_debug_shows_traceback(tmp_path):
    result = run(tmp_path / "nope.pt", "--debug", *SMALL, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_pretrained_comes_from_the_local_cache_only(tmp_path):
    """--pretrained never downloads: a clear refusal without cached weights, and the cached file when present."""
    env = {"TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf")}
    assert_refused(run("timm:resnet18", "--pretrained", *SMALL, cwd=tmp_path, env=env), "local Hugging Face cache")
    assert_refused(run("torchvision:resnet18", "--pretrained", *SMALL, cwd=tmp_path, env=env),
                   "resnet18-f37072fd.pth is missing")
    import torchvision
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), checkpoints / "resnet18-f37072fd.pth")
    result = run("torchvision:resnet18", "--pretrained", *SMALL, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
