"""The everyday workflow: dry run, validation on your own data, the module table, warnings, help, start-up."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import dsd
from dsd.cli.main import build_parser, convert_main, main
from dsd.finetune.recipe import load_recipe
from dsd.finetune.run import schedule_warnings

SMALL = ["--input-size", "3", "32", "32"]


def _files(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_dry_run_lists_every_conv_with_its_action_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert convert_main(["timm:resnet18", *SMALL, "--dry-run", "--json", "r.json"]) == 0
    out = capsys.readouterr().out
    convs = [name for name, m in timm.create_model("resnet18").named_modules() if isinstance(m, torch.nn.Conv2d)]
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert set(convs) <= set(rows), set(convs) - set(rows)
    assert all("convert, rank 1" in rows[n] or "keep dense: 1x1 kernel" in rows[n] for n in convs)
    assert "dry run: nothing written" in out and _files(tmp_path) == []


def test_the_summary_lists_skipped_layers_with_reasons_and_the_json_all_of_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert convert_main(["timm:resnet18", *SMALL, "--quiet", "--json", "r.json", "--iters", "1", "--warmup", "0"]) == 0
    import json
    data = json.loads((tmp_path / "r.json").read_text())
    skipped = [r for r in data["conversion"]["layers"] if r["status"] == "skipped"]
    assert {r["name"] for r in skipped} == {"layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"}
    assert all(r["reason"] for r in skipped)
    _, report = dsd.convert_model(timm.create_model("resnet18"), torch.randn(1, 3, 32, 32))
    assert "  1x1 kernel: layer2.0.downsample.0, layer3.0.downsample.0, layer4.0.downsample.0" in report.summary()


def test_quiet_silences_messages_but_not_the_results_asked_for(tmp_path, monkeypatch, capsys):
    """--quiet drops progress bars, "wrote ..." and summaries; a --report, --dry-run or dsd report table prints."""
    monkeypatch.chdir(tmp_path)
    fast = ["timm:resnet18", *SMALL, "--quiet", "--iters", "1", "--warmup", "0", "--no-layers"]
    assert convert_main(fast[:-1] + ["-o", "a.safetensors"]) == 0
    assert capsys.readouterr().out == ""
    assert convert_main(fast[:-1] + ["-o", "b.safetensors", "--report"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "speedup" in out and "wrote" not in out
    assert convert_main(fast[:-1] + ["--dry-run"]) == 0
    assert "convert, rank 1" in capsys.readouterr().out
    assert main(["report", *fast, "--against", "b.plan.json"]) == 0
    assert "speedup" in capsys.readouterr().out


def test_converting_random_weights_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert convert_main(["timm:resnet18", *SMALL, "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "timm:resnet18 has random weights" in err and "--pretrained" in err
    state = tmp_path / "r18.pt"
    torch.save(timm.create_model("resnet18").state_dict(), state)
    assert convert_main([str(state), "--arch", "timm:resnet18", *SMALL, "--dry-run"]) == 0
    assert "random weights" not in capsys.readouterr().err


def _image_folder(root: Path, classes=("cats", "dogs"), per_class=3) -> Path:
    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (40, 40), (40 * i + 10 * j, 80, 120)).save(root / name / f"{j}.png")
    return root


def test_validate_on_a_two_class_image_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = _image_folder(tmp_path / "pets")
    args = ["validate", "timm:resnet18", "--arch-kwarg", "num_classes=2", "--data-dir", str(data), *SMALL,
            "--batch-size", "4", "--json", "acc.json"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "6 images, 2 classes" in out and "original: top-1" in out and "converted: top-1" in out
    assert "agreement" in out
    import json
    result = json.loads((tmp_path / "acc.json").read_text())
    assert [a["model"] for a in result["accuracies"]] == ["original", "converted"]
    assert all(0 <= a["top1"] <= 100 and a["top5"] is None for a in result["accuracies"])
    assert result["samples"] == 6 and 0 <= result["agreement"] <= 100


@pytest.mark.parametrize("workers", ["0", "2"])
def test_image_files_of_every_mode_are_read_and_a_broken_one_is_named(tmp_path, monkeypatch, capsys, workers):
    """RGBA, palette, 16-bit grayscale and CMYK files are read in the model's channels; a file PIL cannot read is
    one line naming it, exit 2 (from a DataLoader worker too: its traceback stays out of the message)."""
    import numpy as np
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 50, 4), dtype=np.uint8), "RGBA").save(tmp_path / "data/a/rgba.png")
    Image.fromarray(pixels).convert("P").save(tmp_path / "data/a/palette.png")
    Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16)).save(tmp_path / "data/b/gray16.png")
    Image.fromarray(pixels).convert("CMYK").save(tmp_path / "data/b/cmyk.jpg")
    args = ["validate", "dsd:digits_cnn", "--arch-kwarg", "num_classes=2", "--arch-kwarg", "in_chans=3", "--arch-kwarg",
            "width=8", "--data-dir", str(tmp_path / "data"), *SMALL, "--batch-size", "2", "--workers", workers, "--quiet"]
    assert main(args) == 0 and "4 images, 2 classes" in capsys.readouterr().out
    (tmp_path / "data/b/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dsd validate: error: {tmp_path / 'data/b/broken.jpg'}: not a "
                                               "readable image (") and err[0].endswith("; remove or replace it"), err


def test_a_one_channel_model_validates_and_calibrates_on_rgb_image_files(tmp_path, monkeypatch, capsys):
    """dsd:digits_cnn (1x32x32 by its pretrained_cfg) on a folder of RGB files: read as grayscale, normalised as
    the model's pretrained_cfg says (to [-1, 1])."""
    from dsd.calibration import calibration_batches
    monkeypatch.chdir(tmp_path)
    data = _image_folder(tmp_path / "digits", classes=[str(d) for d in range(10)], per_class=1)
    assert main(["validate", "dsd:digits_cnn", "--arch-kwarg", "width=8", "--data-dir", str(data)]) == 0
    assert "10 images, 10 classes" in capsys.readouterr().out
    (batch,) = calibration_batches(str(data), (1, 32, 32), 1, 4, model=dsd.zoo.digits_cnn())
    assert batch.shape == (4, 1, 32, 32) and -1 <= batch.min() and batch.max() <= 1
    assert convert_main(["dsd:digits_cnn", "--arch-kwarg", "width=8", "--init", "data", "--calib", str(data),
                         "--target-flops", "0.5", "--quiet", "--dry-run"]) == 0


def test_cli_calibration_holds_batches_out_for_the_fidelity_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert convert_main(["dsd:digits_cnn", "--arch-kwarg", "width=8", "--init", "data", "--calib", "digits",
                         "--calib-batches", "1", "--calib-batch-size", "16", "--rank", "2", "--dry-run"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "fidelity on 16 held-out calibration samples" in out
    assert "calibration used the first 1 of the 2 batches given" in out


@pytest.mark.parametrize("make, fragment", [
    (lambda root: root, "not a folder"),
    (lambda root: root.mkdir() or root, "not an ImageFolder"),
    (lambda root: _image_folder(root), "head has 1000 outputs but the data has 2 classes"),
])
def test_validate_refuses_bad_data_in_one_line(tmp_path, monkeypatch, capsys, make, fragment):
    monkeypatch.chdir(tmp_path)
    data = make(tmp_path / "data")
    code = main(["validate", "timm:resnet18", "--data-dir", str(data), *SMALL, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err


def test_validate_on_the_built_in_digits(digits_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "dsd:digits_cnn", "--data-dir", "digits", "--input-size", "1", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "360 images, 10 classes from digits" in out and "top-5" in out


def test_report_layers_prints_fvcore_module_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "timm:resnet18", *SMALL, "--layers", "2", "--no-layers", "--iters", "1",
                 "--warmup", "0"]) == 0
    tables = capsys.readouterr().out.split("dsd savings")[0]  # the savings table follows
    assert tables.count("| module") == 2 and tables.count("| model ") == 2
    assert "| layer1.0 " in tables and "layer1.0.conv1" not in tables  # depth 2


def test_python_dash_m_dsd_and_a_version_without_torch():
    result = subprocess.run([sys.executable, "-m", "dsd", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "validate" in result.stdout
    code = ("import sys; from dsd.cli.main import main; main(['--version']); "
            "assert 'torch' not in sys.modules, 'the version imported torch'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == f"dsd {dsd.__version__}", result.stderr


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    missing, defaults = [], 0
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help" and not action.help:
                missing.append(f"dsd {name} {action.option_strings[0]}")
        defaults += "(default: 1)" in sub.format_help()
    assert not missing, missing
    assert "--iters ITERS" in subparsers["convert"].format_help() and defaults >= 2
    assert "timed iterations (default: 40)" in " ".join(subparsers["report"].format_help().split())


def test_finetune_says_when_the_schedule_does_nothing_useful():
    recipe = load_recipe("digits", ["schedule.epochs=1", "schedule.warmup_epochs=1"])
    assert "the whole run is learning-rate warm-up" in schedule_warnings(recipe)[0]
    recipe = load_recipe("digits", ["schedule.epochs=3", "schedule.warmup_epochs=0"])
    assert schedule_warnings(recipe) == []
    assert "already finished its 3 epochs" in schedule_warnings(recipe, {"epoch": 3})[0]
    assert schedule_warnings(recipe, {"epoch": 2}) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the notice is about a machine without a GPU")
def test_the_compile_runtime_keeps_torchs_no_cuda_notice_out_of_dsds_output():
    """torch.utils.cpp_extension logs "No CUDA runtime is found" as inductor imports it; dsd's compile runtime
    imports it with that logger quiet (the plain import, for contrast, does log it)."""
    def stderr_of(code):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stderr
    plain = stderr_of("import torch.utils.cpp_extension")
    ours = stderr_of("from dsd.timing.runtimes import _import_cpp_extension_quietly as q; q(); "
                     "import torch.utils.cpp_extension")
    if "No CUDA runtime is found" not in plain:
        pytest.skip("this machine's torch does not log the notice (no CUDA_HOME)")
    assert "No CUDA runtime" not in ours, ours
