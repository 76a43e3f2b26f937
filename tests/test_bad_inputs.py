"""Every bad input: exit code 2, one line on stderr naming what is wrong, and nothing written or lost.

Run in-process through the CLI's own entry points (the same code the console scripts run), so the
table stays cheap as it grows: add a row for every error found later.
"""
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

import dsd
from dsd.cli.main import convert_main, main

GPU = torch.cuda.is_available()
SMALL = ["--input-size", "3", "32", "32", "--quiet"]


def _state_dict_files(folder: Path) -> None:
    state = timm.create_model("resnet18").state_dict()
    torch.save(state, folder / "r18.pt")
    torch.save({k: (v.round().to(torch.int64) if v.is_floating_point() else v) for k, v in state.items()},
               folder / "int.pt")
    nan = dict(state)
    nan["layer1.0.conv1.weight"] = torch.full_like(nan["layer1.0.conv1.weight"], float("nan"))
    torch.save(nan, folder / "nan.pt")
    torch.save(timm.create_model("resnet18"), folder / "whole.pt")
    (folder / "cut.pt").write_bytes((folder / "r18.pt").read_bytes()[:(folder / "r18.pt").stat().st_size // 2])
    torch.save([1, 2, 3], folder / "list.pt")
    with warnings.catch_warnings():  # TorchScript is deprecated; users still hold such archives
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3))).save(str(folder / "scripted.pt"))
    torch.save(nn.Sequential(nn.Linear(4, 4)).state_dict(), folder / "mlp.pt")
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "model.onnx").write_bytes(b"onnx")
    (folder / "a_dir").mkdir()
    save_file({"x": torch.zeros(1)}, folder / "existing.safetensors")


def _plans(folder: Path) -> None:
    base = {"version": 1, "options": {}, "layers": [],
            "source": {"arch": "timm:resnet18", "arch_kwargs": {}, "converted_weights": "w.safetensors"}}
    (folder / "notjson.plan.json").write_text("{nope")
    (folder / "badversion.plan.json").write_text(json.dumps({**base, "version": 9}))
    (folder / "corrupt.plan.json").write_text(json.dumps({**base, "layers": [{"name": "conv1", "rank": 1}]}))
    (folder / "evil.plan.json").write_text(json.dumps(
        {**base, "source": {"arch": "os:system", "arch_kwargs": {"command": "touch code_ran"}}}))
    (folder / "escape.plan.json").write_text(json.dumps(
        {**base, "source": {"arch": "timm:resnet18", "converted_weights": "../../etc/passwd"}}))
    (folder / "noweights.plan.json").write_text(json.dumps(base))
    (folder / "list.yaml").write_text("- 1\n- 2\n")
    (folder / "broken.yaml").write_text("data: [unclosed\n")
    (folder / "mynets.py").write_text("import torch.nn as nn\ndef small():\n    return nn.Conv2d(3, 4, 3)\n"
                                      "def mlp():\n    return nn.Sequential(nn.Linear(4, 4))\n")
    digits = dsd.zoo.digits_cnn(width=8)  # a real conversion of a 1-channel model: inputs of another shape fail
    converted, report = dsd.convert_model(digits, torch.randn(1, 1, 32, 32))
    dsd.save_converted(converted, report.plan, folder / "digits_dsd.safetensors", arch="dsd:digits_cnn",
                       arch_kwargs={"width": 8})


CONVERT = [  # dsd-convert arguments, a fragment (or a tuple of fragments) of the one-line error
    (["timm:resnet18", "--rank", "0"], "must be at least 1"),
    (["timm:resnet18", "--rank", "-2"], "must be at least 1"),
    (["timm:resnet18", "--rank", "x"], "is not an integer"),
    (["timm:resnet18", "--rank", "1.5"], "is not an integer"),
    (["timm:resnet18", "--dilation", "0"], "dilation must be an integer >= 1"),
    (["timm:resnet18", "--init", "zeros"], "unknown init 'zeros'"),
    (["timm:resnet18", "--init", "data"], "need calibration data: add --calib"),
    (["timm:resnet18", "--target-flops", "2"], "must be a fraction in (0, 1]"),
    (["timm:resnet18", "--target-flops", "abc"], "invalid float value"),
    (["timm:resnet18", "--target-flops", "0.5", "--energy", "0.9"], "choose one of"),
    (["timm:resnet50", "--target-flops", "0.5"], "cannot be met: what no conversion changes"),
    (["timm:resnet18", "--target-flops", "0.5", "--rank", "2"], "rank and a budget"),
    (["timm:resnet18", "--exclude", "re:(["], "not a valid regular expression"),
    (["timm:resnet18", "--skip", "head"], "unknown skip rule 'head'"),
    (["timm:resnet18", "--min-channels", "-1"], "min_channels must be an integer >= 0"),
    (["timm:resnet18", "--keep-receptive-field", "1"], "keep_receptive_field must be True/False or a kernel size >= 2"),
    (["timm:resnet18", "--arch-kwarg", "foo"], "not of the form key=value"),
    (["timm:resnet18", "--device", "bogus"], "is not a torch device"),
    pytest.param(["timm:resnet18", "--device", "cuda"], "no CUDA GPU", marks=pytest.mark.skipif(GPU, reason="GPU")),
    (["timm:resnet18", "--dtype", "float64"], "invalid choice"),
    (["timm:resnet18", "--runtime", "tensorrt"], "invalid choice: 'tensorrt'"),
    (["timm:resnet18", "--runtime", "cudagraph"], "needs a CUDA device"),
    pytest.param(["timm:resnet18", "--runtime", "cudagraph", "--device", "cuda"], "no CUDA GPU",
                 marks=pytest.mark.skipif(GPU, reason="GPU")),
    (["timm:resnet18", "--runtime", "onnxruntime", "--dtype", "bfloat16"], "times the float32 ONNX export"),
    (["timm:resnet18", "--runtime", "onnxruntime", "--channels-last"], "channels_last does not apply"),
    (["timm:resnet18", "--threads", "0"], "threads must be an integer >= 1"),
    (["timm:resnet18", "--iters", "0"], "iters must be an integer >= 1"),
    (["timm:resnet18", "--warmup", "-1"], "warmup must be an integer >= 0"),
    (["timm:resnet18", "--batch-size", "0"], "batch_size must be an integer >= 1"),
    (["timm:resnet18", "--calib", "no_such_folder"], "not a folder"),
    (["timm:resnt18"], "timm has no model 'resnt18'"),
    (["timm:resnet51"], ("timm has no model 'resnet51'", "resnet50")),
    (["torchvision:resnt18"], "torchvision has no model 'resnt18'"),
    (["torchvision:resnet_18"], ("torchvision has no model", "resnet18")),
    (["dsd:nope"], "no built-in model 'nope'"),
    (["timm:"], "names no model"),
    (["missing.pt"], "no such file"),
    (["a_dir"], "is a directory"),
    (["empty.pt"], "is empty"),
    (["model.onnx"], ("unsupported file type '.onnx'", "supported:")),
    (["scripted.pt"], "TorchScript archive"),
    (["cut.pt", "--arch", "timm:resnet18"], "truncated or corrupt"),
    (["list.pt"], "holds a list, not a state dict or a model"),
    (["r18.pt"], "say which model it belongs to with --arch"),
    (["r18.pt", "--arch", "timm:resnet50"], "does not fit timm:resnet50"),
    (["r18.pt", "--arch", "timm:resnet34"], ("does not fit timm:resnet34", "missing: layer1.2.conv1.weight")),
    (["r18.pt", "--arch", "timm:resnet18", "--arch-kwarg", "num_classes=10"],
     ("wrong shape: fc.weight", "num_classes")),
    (["mlp.pt", "--arch", "mynets:mlp", "--trust-code", "--input-size", "1", "1", "4"], "has no nn.Conv2d layers"),
    (["r18.pt", "--arch", "nonsense"], "is not of the form"),
    (["timm:resnet18", "--arch-kwarg", "num_clases=10"],
     ("timm:resnet18 could not be built with num_clases=10", "unexpected keyword", "--arch-kwarg")),
    (["torchvision:resnet18", "--arch-kwarg", "num_classes=ten"], "torchvision:resnet18 could not be built"),
    (["dsd:digits_cnn", "--arch-kwarg", "wdth=3"], "dsd:digits_cnn could not be built with wdth=3"),
    (["int.pt", "--arch", "timm:resnet18"], "holds torch.int64 values"),
    (["nan.pt", "--arch", "timm:resnet18"], "NaN or inf weight values"),
    (["whole.pt"], "--trust-pickle"),
    (["corrupt.safetensors", "--arch", "timm:resnet18"], "not a readable safetensors file"),
    (["mynets:small"], "--trust-code"),
    (["r18.pt", "--arch", "mynets:small"], "--trust-code"),
    (["evil.plan.json"], "--trust-code"),
    (["missing.plan.json"], "no such plan file"),
    (["notjson.plan.json"], "not a readable dsd conversion plan"),
    (["corrupt.plan.json"], "not a readable dsd conversion plan"),
    (["badversion.plan.json"], "version 9 is not supported"),
    (["escape.plan.json"], "must be a file name beside the plan"),
    (["noweights.plan.json"], "are missing"),
    (["timm:resnet18", "-o", "x.pt"], "give a *.safetensors path"),
    (["timm:resnet18", "-o", "r18.pt/x.safetensors"], "is not a writable directory"),
    (["timm:resnet18", "-o", "/proc/x.safetensors"], "not writable"),
    (["existing.safetensors", "--arch", "timm:resnet18", "-o", "existing.safetensors", "--force"], "is also an input"),
    (["timm:resnet18", "-o", "existing.safetensors"], "exists; pass --force"),
    (["timm:resnet18", "--json", "r.json", "--md", "r.json", "--force"], "named for two outputs"),
    (["timm:resnet18", "--json", "resnet18_dsd.plan.json", "--force"], "named for two outputs"),
    (["r18.pt", "--arch", "timm:resnet18", "--json", "r18.pt", "--force"], "is also an input"),
    (["timm:resnet18", "--input-size", "1", "32", "32"], "does not run on example inputs of shape (1, 1, 32, 32)"),
]

DSD = [  # dsd arguments
    (["bogus"], "invalid choice: 'bogus'"),
    (["report"], "the following arguments are required"),
    (["report", "timm:resnet18", "--against", "missing.plan.json", *SMALL], "no such plan file"),
    (["report", "timm:resnet18", "--against", "evil.plan.json", *SMALL], "--trust-code"),
    (["report", "timm:resnet18", "--runtime", "cudagraph", *SMALL], "needs a CUDA device"),
    (["report", "timm:resnet18", "--runtime", "bogus", *SMALL], "invalid choice: 'bogus'"),
    (["report", "dsd:digits_cnn", "--arch-kwarg", "width=8", "--against", "digits_dsd.plan.json", *SMALL],
     ("the original model does not run on example inputs of shape (1, 3, 32, 32)", "(--input-size C H W)")),
    (["report", "timm:resnet18", "--against", "digits_dsd.plan.json", *SMALL],
     "the converted model does not run on example inputs of shape (1, 3, 32, 32)"),
    (["validate", "dsd:digits_cnn", "--arch-kwarg", "width=8", "--against", "digits_dsd.plan.json", "--data-dir",
      "digits", *SMALL], ("model 'original' does not run on example inputs of shape (1, 3, 32, 32)", "--input-size")),
    (["validate", "timm:resnet18", "--arch-kwarg", "features_only=true", "--data-dir", "digits", *SMALL],
     ("the original model returns a list, not a tensor of class scores", "evaluates classifiers")),
    (["finetune", "no_such_recipe"], "no such recipe file"),
    (["finetune", "list.yaml"], "expected a mapping"),
    (["finetune", "broken.yaml"], "is not valid YAML"),
    (["finetune", "digits", "--set", "schedule.epochs=-1"], "schedule.epochs: expected a value >= 1"),
    (["finetune", "digits", "--set", "optim.lr=fast"], "optim.lr: expected a number"),
    (["finetune", "digits", "--set", "optim.lr=-1e-3"], "optim.lr: expected a value > 0"),
    (["finetune", "digits", "--set", "bogus.key=1"], "unknown recipe key bogus"),
    (["finetune", "digits", "--set", "noequals"], "expected key=value"),
    (["finetune", "digits", "--set", "optim.lr=[1"], "not valid YAML"),
    (["finetune", "digits", "--set", "student.convert.rank=0"], "student.convert: rank must be"),
    (["finetune", "digits", "--set", "teacher.source=mynets:small", "--set", "teacher.pretrained=false",
      "--set", "output_dir=run"], "--trust-code"),
    (["finetune", "digits", "--resume", "nowhere"], "no such checkpoint"),
    (["finetune", "digits", "--set", "teacher.source=timm:resnet18", "--set", "teacher.pretrained=false",
      "--set", "teacher.arch_kwargs={features_only: true, in_chans: 1}", "--set", "output_dir=new/run"],
     ("the teacher returns a list, not a tensor of class scores", "distils classifiers")),
    (["finetune", "digits", "--set", "teacher.source=timm:resnet18", "--set", "teacher.pretrained=false",
      "--set", "output_dir=new/run"], ("the teacher does not run on the data's images of shape (1, 1, 32, 32)",
                                       "expected input[1, 1, 32, 32] to have 3 channels")),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-inputs")
    _state_dict_files(folder)
    _plans(folder)
    return folder


def _run(entry, argv, folder, monkeypatch, capsys):
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    try:
        code = entry(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    sys.modules.pop("mynets", None)
    err = capsys.readouterr().err.strip().splitlines()
    after = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if "__pycache__" not in p.parts}
    return code, err, {p: t for p, t in before.items() if "__pycache__" not in p.parts}, after


def _fragments(fragment):
    return fragment if isinstance(fragment, tuple) else (fragment,)


@pytest.mark.parametrize("argv,fragment", CONVERT)
def test_dsd_convert_refuses(workdir, monkeypatch, capsys, argv, fragment):
    code, err, before, after = _run(convert_main, [*SMALL, *argv], workdir, monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and all(f in err[0] for f in _fragments(fragment)), err
    assert after == before, "a refused run wrote, changed or removed files"
    assert not (workdir / "code_ran").exists()


@pytest.mark.parametrize("argv,fragment", DSD)
def test_dsd_refuses(workdir, monkeypatch, capsys, argv, fragment):
    code, err, before, after = _run(main, argv, workdir, monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and all(f in err[0] for f in _fragments(fragment)), err
    assert after == before, "a refused run wrote, changed or removed files"


def test_the_table_is_large_enough():
    assert len(CONVERT) + len(DSD) >= 40


def test_a_runtime_that_is_not_installed_is_refused_before_any_work(workdir, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    monkeypatch.setattr("dsd.io.load_model", lambda *a, **k: pytest.fail("loaded a model first"))
    code, err, before, after = _run(convert_main, [*SMALL, "timm:resnet18", "--runtime", "onnxruntime"], workdir,
                                    monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "pip install 'dsd[onnx]'" in err[0], err
    assert after == before
