"""Fine-tuning: each loss option, resume equality, DDP on 2 CPU processes, NaN guard, recipes, data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import dsd
from dsd.errors import DsdError
from dsd.finetune import TrainingDiverged, builtin_recipes, finetune, load_recipe, recalibrate_batchnorm
from dsd.finetune.data import build_datasets
from dsd.zoo import digits_splits
from dsd.finetune.losses import distillation_loss
from dsd.finetune.recipe import DataConfig

BIN = Path(sys.executable).parent
FAST = ["schedule.epochs=1", "schedule.warmup_epochs=0", "data.batch_size=128", "tensorboard=false"]


def recipe(tmp_path, *overrides):
    return load_recipe("digits", [f"output_dir={tmp_path / 'run'}", *FAST, *overrides])


@pytest.mark.parametrize("overrides", [
    ["loss.alpha=0.0"],                                   # labels only
    ["loss.alpha=0.9", "loss.temperature=2.0"],           # KL distillation
    ["loss.feature_weight=1.0"],                          # + feature MSE on converted layers
    ["optim.name=sgd", "optim.lr=0.1", "schedule.warmup_epochs=0", "optim.clip_grad=5.0", "ema.enabled=true",
     "ema.decay=0.9"],
    ["precision.amp=bfloat16", "student.convert.rank=2", "bn_recalibration_batches=0"],
], ids=["ce", "kd", "features", "sgd-clip-ema", "bf16-rank2"])
def test_one_epoch_each_option(tmp_path, digits_cache, overrides):
    result = finetune(recipe(tmp_path, *overrides), progress=False)
    run = tmp_path / "run"
    assert result.epochs == 1 and result.converted_layers == 3
    assert result.student_flops < result.teacher_flops / 3
    assert result.student_acc_after > result.student_acc_before
    assert {"checkpoint.pt", "metrics.jsonl", "student_dsd.safetensors", "student_dsd.plan.json",
            "summary.json"} <= {p.name for p in run.iterdir()}
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and np.isfinite(record["train_loss"])
    if "ema.enabled=true" in overrides:
        assert result.student_acc_ema is not None


def test_distillation_loss_terms():
    logits, teacher = torch.randn(8, 10), torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    cfg = load_recipe("digits").loss
    cfg.alpha, cfg.temperature, cfg.feature_weight = 0.5, 2.0, 0.5
    terms = distillation_loss(logits, labels, cfg, teacher, [torch.ones(2, 3)], [torch.zeros(2, 3)])
    kd = torch.nn.functional.kl_div(torch.log_softmax(logits / 2, -1), torch.softmax(teacher / 2, -1),
                                    reduction="batchmean") * 4
    expected = 0.5 * torch.nn.functional.cross_entropy(logits, labels) + 0.5 * kd + 0.5 * 1.0
    torch.testing.assert_close(terms.total, expected)
    assert distillation_loss(teacher, labels, cfg, teacher).kd.abs() < 1e-6


@pytest.mark.slow  # about a minute each on a 2-core CPU: CI's slow pass runs it
def test_resume_reaches_the_same_result(tmp_path, digits_cache):
    straight = finetune(recipe(tmp_path / "a", "schedule.epochs=2"), progress=False)
    finetune(recipe(tmp_path / "b", "schedule.epochs=2"), progress=False, stop_after_epoch=1)
    assert len((tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    resumed = finetune(recipe(tmp_path / "b", "schedule.epochs=2"), resume=str(tmp_path / "b" / "run"), progress=False)
    a = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    assert straight.history[-1]["train_loss"] == resumed.history[-1]["train_loss"]
    assert straight.student_acc_after == resumed.student_acc_after


def test_fresh_run_refuses_an_existing_run(tmp_path, digits_cache):
    finetune(recipe(tmp_path), progress=False)
    with pytest.raises(DsdError, match="already holds a run"):
        finetune(recipe(tmp_path), progress=False)
    finetune(recipe(tmp_path), progress=False, force=True)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_fresh_run_refuses_to_overwrite_files_it_would_write(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("the user's own")
    with pytest.raises(DsdError, match="already holds summary.json, which a run would overwrite; pass --force"):
        finetune(recipe(tmp_path), progress=False)
    assert (run / "summary.json").read_text() == "the user's own"


def test_forced_run_that_fails_keeps_the_earlier_run(tmp_path, digits_cache):
    finetune(recipe(tmp_path), progress=False)
    run = tmp_path / "run"
    earlier = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert {"metrics.jsonl", "checkpoint.pt", "summary.json"} <= set(earlier)

    def diverges(*args, **kwargs):
        terms = distillation_loss(*args, **kwargs)
        terms.total = terms.total * float("nan")
        return terms
    with pytest.raises(TrainingDiverged, match="no checkpoint was written yet|last good checkpoint"):
        finetune(recipe(tmp_path), progress=False, force=True, loss_fn=diverges)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == earlier


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digits_cache):
    calls = {"n": 0}
    steps_per_epoch = 1437 // 128

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        terms = distillation_loss(*args, **kwargs)
        if calls["n"] > steps_per_epoch:  # the second epoch diverges
            terms.total = terms.total * float("nan")
        return terms
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2, step 1.*last good checkpoint"):
        finetune(recipe(tmp_path, "schedule.epochs=3"), progress=False, loss_fn=poisoned)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def test_ddp_two_processes_gloo(tmp_path, digits_cache):
    env = {**os.environ, "DSD_CACHE": str(digits_cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29517", "-m", "dsd.cli", "finetune",
         "digits", "--quiet", *[a for o in [f"output_dir={tmp_path / 'ddp'}", *FAST, "device=cpu"] for a in ("--set", o)]],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_agree"] is True
    assert summary["student_acc_after"] > summary["student_acc_before"]


_STUDENT_PER_RANK = """
import json, sys, torch
import dsd
from dsd.errors import DsdError
from dsd.finetune.distributed import init_distributed
from dsd.finetune.models import build_student
from dsd.finetune.recipe import load_recipe
out, target = sys.argv[1], sys.argv[2]
env = init_distributed("cpu")
torch.manual_seed(0)
teacher = dsd.zoo.digits_cnn(width=8).eval()
g = torch.Generator().manual_seed(env.rank)
noise = [torch.randn(16, 1, 32, 32, generator=g) for _ in range(4)]
calibration = noise if env.rank == 0 else [torch.nn.functional.avg_pool2d(b, 5, 1, 2) for b in noise]  # its shard
recipe = load_recipe("digits", ["student.convert.init=data", f"student.convert.target_flops={target}"])
try:
    student, plan = build_student(teacher, recipe, noise[0][:1], calibration=calibration, env=env)
    result = {"ranks": {l.name: l.rank for l in plan.layers},
              "weights": [t.double().sum().item() for t in student.state_dict().values()]}
except DsdError as error:
    result = {"error": str(error)}
open(f"{out}/rank{env.rank}.json", "w").write(json.dumps(result))
env.close()
"""


def test_under_torchrun_every_rank_trains_the_student_rank_0_converted(tmp_path):
    """A budget's ranks depend on the calibration shard (and on timings): each rank converting on its own gave
    students of different architectures, which DDP cannot wrap. Rank 0 converts; a failure there reaches all."""
    script = tmp_path / "student_per_rank.py"
    script.write_text(_STUDENT_PER_RANK)
    results = {}
    for target in ("0.4", "0.01"):
        result = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29519", str(script),
                                 str(tmp_path), target], capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        results[target] = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    first, second = results["0.4"]
    assert first == second and len(set(first["ranks"].values())) > 1
    assert "cannot be met" in results["0.01"][0]["error"]
    assert results["0.01"][1]["error"].startswith("rank 0 failed: DsdError: target_flops=0.01 cannot be met")


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=0.1"], "unknown recipe key optim.lrr"),
    (["optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
    (["schedule.epochs=1.5"], "schedule.epochs: expected an integer"),
    (["data.name=imagenet21k"], "data.name: expected one of digits, mnist, cifar10, imagefolder"),
    (["colour=blue"], "unknown recipe key colour"),
    (["optim"], "expected key=value"),
])
def test_recipe_validation(overrides, message):
    with pytest.raises(DsdError, match=message):
        load_recipe("digits", overrides)


def test_recipe_errors_from_the_cli(tmp_path):
    result = subprocess.run([str(BIN / "dsd"), "finetune", "digits", "--set", "optim.lr=fast"], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 2 and "optim.lr: expected a number" in result.stderr
    result = subprocess.run([str(BIN / "dsd"), "finetune", "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "built-in: cifar10, digits, imagenet" in result.stderr


def test_shipped_recipes_parse():
    assert {"digits", "cifar10", "imagenet"} <= set(builtin_recipes())
    for name in builtin_recipes():
        load_recipe(name)
        assert Path(__import__("dsd").__file__).parent.joinpath("recipes", f"{name}.yaml").read_text().startswith("#")


def test_digits_split_is_fixed_and_stratified():
    train, val = digits_splits(16, 3)
    assert len(train) == 1437 and len(val) == 360 and train.tensors[0].shape[1:] == (3, 16, 16)
    assert torch.bincount(val.tensors[1]).min() >= 35
    torch.testing.assert_close(digits_splits(16, 3)[1].tensors[0], val.tensors[0])


def _write_idx(path, array):
    with open(path, "wb") as f:
        dims = array.shape
        f.write(bytes([0, 0, 0x08, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims))
        f.write(array.astype(np.uint8).tobytes())


def test_mnist_loader_on_generated_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 6)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    train, val = build_datasets(DataConfig(name="mnist", root=str(tmp_path), image_size=32, channels=1))
    assert len(train) == 12 and len(val) == 6 and train[0][0].shape == (1, 32, 32)


def test_cifar10_loader_on_generated_files(tmp_path, monkeypatch):
    import pickle

    import torchvision
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    # torchvision verifies the real archive's md5 sums; generated files cannot match them.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    train, val = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), image_size=32, channels=3))
    assert len(train) == 20 and len(val) == 4 and train[0][0].shape == (3, 32, 32)


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DsdError, match="MNIST not found under .*data.download=true"):
        build_datasets(DataConfig(name="mnist", root=str(tmp_path)))
    with pytest.raises(DsdError, match="train/ and val/"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path)))


@pytest.mark.parametrize("data, message", [
    (["data.name=imagefolder", "data.root=nowhere"], "data.root: nowhere must contain train/ and val/ folders"),
    (["data.name=mnist"], "data.root: mnist needs the folder"),
])
def test_a_bad_data_section_is_refused_before_the_teacher_loads(tmp_path, monkeypatch, data, message):
    """An uncached built-in teacher trains for minutes first; a typo in data.root should not wait for that."""
    def teacher_first(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the data section was checked")
    monkeypatch.setattr("dsd.finetune.run.load_teacher", teacher_first)
    with pytest.raises(DsdError, match=message):
        finetune(recipe(tmp_path, *data), progress=False)


@pytest.mark.parametrize("channels", [3, 1])
def test_imagefolder_with_timm_transforms(tmp_path, channels):
    """RGB files in the recipe's channels: a one-channel model reads them as grayscale."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    train, val = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=32, channels=channels))
    assert len(train) == 6 and train.classes == ["cat", "dog"]
    assert train[0][0].shape == (channels, 32, 32) and val[0][0].shape == (channels, 32, 32)


def test_imagefolder_normalises_as_the_teachers_pretrained_cfg(tmp_path):
    """timm's convention: the data config comes from the model (here mean = std = 0.5), not ImageNet's defaults."""
    from PIL import Image
    for split in ("train", "val"):
        (tmp_path / split / "gray").mkdir(parents=True)
        Image.new("RGB", (32, 32), (128, 128, 128)).save(tmp_path / split / "gray" / "0.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=32, channels=3)
    teacher = dsd.zoo.digits_cnn(in_chans=3)
    _, val = build_datasets(cfg, teacher)
    torch.testing.assert_close(val[0][0], torch.full((3, 32, 32), (128 / 255 - 0.5) / 0.5), atol=1e-3, rtol=0)
    _, imagenet = build_datasets(cfg)
    assert imagenet[0][0][0].mean() == pytest.approx((128 / 255 - 0.485) / 0.229, abs=1e-3)


def test_batchnorm_recalibration_changes_running_stats_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [torch.randn(8, 3, 10, 10) * 3 + 1 for _ in range(4)]
    assert recalibrate_batchnorm(model, batches, num_batches=3) == 3
    bn = model[1]
    assert not model.training and not bn.training and bn.momentum == 0.1
    with torch.no_grad():
        outs = torch.cat([model[0](b) for b in batches[:3]])
    torch.testing.assert_close(bn.running_mean, outs.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    for key, value in model.state_dict().items():
        if key in weights:
            torch.testing.assert_close(value, weights[key], rtol=0, atol=0)


@pytest.mark.slow  # about a minute each on a 2-core CPU: CI's slow pass runs it
def test_demo_end_to_end(tmp_path, digits_cache):
    result = subprocess.run([str(BIN / "dsd"), "demo", "--epochs", "1", "--output-dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, env={**os.environ, "DSD_CACHE": str(digits_cache)},
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("original", "converted, rank 1 (before fine-tuning)", "fine-tuned (1 epochs"):
        assert row in result.stdout
    assert "latency ms" in result.stdout and (tmp_path / "demo" / "student_dsd.plan.json").exists()


def test_diverging_weights_are_never_saved(tmp_path, digits_cache):
    """lr 1e6: whether the loss or the weights go first, the run stops with an error and saves nothing non-finite."""
    with pytest.raises(TrainingDiverged, match="diverge|became"):
        finetune(recipe(tmp_path, "optim.lr=1e6", "schedule.epochs=3", "optim.weight_decay=0"), progress=False)
    run = tmp_path / "run"
    assert not (run / "student_dsd.safetensors").exists()
    if (run / "checkpoint.pt").exists():
        checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
        for state in (checkpoint["model"], checkpoint["ema"] or {}):
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_non_finite_buffers_stop_the_run_before_the_checkpoint(tmp_path, digits_cache):
    from dsd.finetune import engine
    original = engine._optimizer_step

    def step(loss, student, recipe_, parts, global_step):
        original(loss, student, recipe_, parts, global_step)
        bn = next(m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_var.fill_(float("inf"))  # a buffer, not the loss, goes bad
    engine._optimizer_step, saved = step, original
    try:
        with pytest.raises(TrainingDiverged, match=r"epoch 1: .*running_var became NaN or inf"):
            finetune(recipe(tmp_path, "schedule.epochs=2"), progress=False)
    finally:
        engine._optimizer_step = saved
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_resume_with_a_changed_recipe_says_what_changed(tmp_path, digits_cache):
    finetune(recipe(tmp_path, "schedule.epochs=2"), progress=False, stop_after_epoch=1)
    with pytest.raises(DsdError, match=r"optim.lr: 0.002 -> 0.01.*--allow-recipe-change"):
        finetune(recipe(tmp_path, "schedule.epochs=2", "optim.lr=0.01"), resume=str(tmp_path / "run"), progress=False)
    result = finetune(recipe(tmp_path, "schedule.epochs=2", "optim.lr=0.01"), resume=str(tmp_path / "run"),
                      progress=False, allow_recipe_change=True)
    assert result.epochs == 2


def test_a_student_plan_with_folded_batchnorm_is_warned_about(tmp_path, digits_cache, capsys):
    """dsd-convert --fold-bn writes an inference form: fine-tuned, the student trains without its BatchNorm."""
    from dsd.cli.main import convert_main
    assert convert_main(["dsd:digits_cnn", "--fold-bn", "-o", str(tmp_path / "s.safetensors"), "--quiet"]) == 0
    capsys.readouterr()
    result = finetune(recipe(tmp_path, f"student.plan={tmp_path / 's.plan.json'}"), progress=False)
    err = capsys.readouterr().err
    assert "student.plan folded 4 BatchNorm layers" in err and "convert without --fold-bn" in err
    assert result.epochs == 1
