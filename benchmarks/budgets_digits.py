"""Budgets on real digits: accuracy at equal FLOP budgets, without and after a short fine-tune,
for random < svd < data-aware < data-aware + BatchNorm re-estimation; and the per-layer choices of a
latency budget for timm models on this CPU.

    python benchmarks/budgets_digits.py [--budgets 0.5 0.3 0.2] [--finetune-epochs 3]
        [--latency-models resnet50 convnext_tiny] [--target-latency 0.85]

Writes results/budgets_digits.json (accuracy) and results/budgets_latency.json (timings; run those on an
otherwise idle machine: ``--budgets`` with no value skips the accuracy part, ``--latency-models`` with
none skips the timings).

Targets (issue 6): at the 0.5 FLOP budget, data-aware + BN re-estimation keeps at least 95% of the
original accuracy on digits with no fine-tuning; --only-if-faster never yields a model slower than the
original on the device it measured.
"""
from __future__ import annotations

import argparse
import tempfile

import timm
import torch

import dsd
from dsd import zoo
from dsd.errors import DsdError
from dsd.finetune import finetune, load_recipe
from dsd.zoo import digits_splits
from dsd.finetune.distributed import DistEnv
from dsd.finetune.models import train_builtin
from dsd.timing import BenchmarkSettings, model_latency
from _results import write

METHODS = {"random": dict(init="random"), "svd": dict(init="svd"), "data": dict(init="data"),
           "data+bn": dict(init="data", recalibrate_bn=True)}


def accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return (model.eval()(images).argmax(-1) == labels).float().mean().item()


def digits_rows(budgets, epochs):
    train, val = digits_splits(32, 1)
    calib = [train.tensors[0][i:i + 64] for i in range(0, 512, 64)]
    teacher = zoo.build("digits_cnn", pretrained=True).eval()
    original = accuracy(teacher, *val.tensors)
    rows = []
    print(f"original accuracy {original:.2%}\n{'budget':>7} {'method':8} {'reached':>8} {'no FT':>8} {'FT':>8}")
    for budget in budgets:
        for method, kwargs in METHODS.items():
            data = calib if kwargs.get("init") == "data" or kwargs.get("recalibrate_bn") else None
            model, report = dsd.convert_model(teacher, torch.randn(1, 1, 32, 32), target_flops=budget,
                                              target_flops_of="convs",
                                              calibration_data=data, **kwargs)
            no_ft = accuracy(model, *val.tensors)
            ft = None
            if epochs:
                overrides = [f"student.convert.target_flops={budget}", f"student.convert.init={kwargs['init']}",
                             f"student.convert.recalibrate_bn={str(kwargs.get('recalibrate_bn', False)).lower()}",
                             f"schedule.epochs={epochs}", "tensorboard=false", "bn_recalibration_batches=0"]
                with tempfile.TemporaryDirectory() as run_dir:
                    ft = finetune(load_recipe("digits", [*overrides, f"output_dir={run_dir}"]),
                                  progress=False).student_acc_after
            rows.append({"budget": budget, "method": method, "reached": report.budget.reached,
                         "accuracy_no_finetune": no_ft, "accuracy_finetuned": ft, "finetune_epochs": epochs,
                         "original_accuracy": original, "share_of_original": no_ft / original,
                         "ranks": {r.name: r.rank for r in report.converted}})
            print(f"{budget:7.2f} {method:8} {report.budget.reached:8.3f} {no_ft:8.2%} "
                  f"{'' if ft is None else format(ft, '8.2%')}", flush=True)
    return rows


def latency_rows(models, target):
    settings = BenchmarkSettings(iters=20, warmup=5)
    rows = []
    for name in models:
        model = timm.create_model(name).eval()
        x = torch.randn(1, 3, 224, 224)
        original = model_latency(model, (3, 224, 224), settings).median_ms
        for label, kwargs in (("target_latency", dict(target_latency=target)),
                              ("only_if_faster", dict(rank=1, only_if_faster=True))):
            try:
                converted, report = dsd.convert_model(model, x, benchmark=settings, **kwargs)
            except DsdError as error:  # an unreachable budget is a result too
                rows.append({"model": name, "mode": label, "target": target, "infeasible": str(error)})
                print(f"{name:14} {label:15} infeasible: {error}", flush=True)
                continue
            after = model_latency(converted, (3, 224, 224), settings).median_ms
            row = {"model": name, "mode": label, "target": target if label == "target_latency" else None,
                   "reached": report.budget.reached if report.budget else None,
                   "latency_before_ms": original, "latency_after_ms": after, "speedup": original / after,
                   "converted": {r.name: r.rank for r in report.converted},
                   "kept_dense": {r.name: r.reason for r in report.skipped if r.category in ("budget", "not faster")}}
            rows.append(row)
            print(f"{name:14} {label:15} {original:8.2f} ms -> {after:8.2f} ms ({row['speedup']:.2f}x), "
                  f"{len(report.converted)} converted, {len(row['kept_dense'])} kept dense by the rule", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.3, 0.25, 0.2])
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--latency-models", nargs="*", default=["resnet50", "convnext_tiny"])
    parser.add_argument("--target-latency", type=float, default=0.85)
    args = parser.parse_args()
    if args.budgets:  # accuracy: any machine load
        if not zoo.cached_weights("digits_cnn").is_file():
            train_builtin("digits_cnn", DistEnv(), progress=False)
        rows = digits_rows(args.budgets, args.finetune_epochs)
        print(f"wrote {write('budgets_digits', rows, calibration='8 batches of 64 training images')}")
    if args.latency_models:  # timings: run on a quiet machine
        rows = latency_rows(args.latency_models, args.target_latency)
        print(f"wrote {write('budgets_latency', rows, input_size=[3, 224, 224], batch_size=1)}")


if __name__ == "__main__":
    main()
