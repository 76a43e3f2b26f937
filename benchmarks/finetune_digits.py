"""Accuracy recovery on real digits: original vs converted (no fine-tune) vs fine-tuned, svd vs random init.

    python benchmarks/finetune_digits.py [--epochs 15] [--seeds 0 1 2] [--configs rank1 rank2 rank1-dil2]

Targets (issue 5): the svd-initialised rank-1 student recovers to within 0.5 points of the original
with at least 4x fewer conv FLOPs, and beats random init at the same budget. Mean and spread over seeds.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from dsd import convert_model, zoo
from dsd.finetune import finetune, load_recipe
from dsd.finetune.distributed import DistEnv
from dsd.finetune.models import train_builtin
from _results import write

CONFIGS = {"rank1": ["student.convert.rank=1"], "rank2": ["student.convert.rank=2"],
           "rank1-dil2": ["student.convert.rank=1", "student.convert.dilation=2"]}


def conv_flop_reduction(overrides) -> float:
    recipe = load_recipe("digits", overrides)
    c = recipe.student.convert
    teacher = zoo.build("digits_cnn", pretrained=True)
    _, report = convert_model(teacher, torch.randn(1, 1, 32, 32), rank=c.rank, dilation=c.dilation)
    before, after = report.conv_macs()
    return before / after


def spread(values):
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    if not zoo.cached_weights("digits_cnn").is_file():
        train_builtin("digits_cnn", DistEnv(), progress=False)

    rows = []
    print(f"{'config':12} {'init':7} {'original':>9} {'before FT':>16} {'after FT':>16} {'gap (pts)':>10} {'conv FLOPs':>10}")
    for name in args.configs:
        reduction = conv_flop_reduction(CONFIGS[name])
        for init in ("svd", "random"):
            runs = []
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as run_dir:
                    recipe = load_recipe("digits", [*CONFIGS[name], f"student.convert.init={init}", f"seed={seed}",
                                                    f"schedule.epochs={args.epochs}", f"output_dir={run_dir}",
                                                    "tensorboard=false"])
                    runs.append(finetune(recipe, progress=False))
            original = runs[0].teacher_acc
            before = spread([r.student_acc_before for r in runs])
            after = spread([r.student_acc_after for r in runs])
            row = {"config": name, "init": init, "epochs": args.epochs, "seeds": args.seeds,
                   "original_acc": original, "before_finetune_acc": before, "after_finetune_acc": after,
                   "gap_points": 100 * (original - after["mean"]), "conv_flop_reduction": reduction,
                   "flops_before": runs[0].teacher_flops, "flops_after": runs[0].student_flops}
            rows.append(row)
            print(f"{name:12} {init:7} {original:9.2%} {before['mean']:9.2%} ±{before['std']:.2%} "
                  f"{after['mean']:9.2%} ±{after['std']:.2%} {row['gap_points']:10.2f} {reduction:9.1f}x", flush=True)
    path = write("finetune_digits", rows, dataset="sklearn load_digits, fixed stratified 80/20 split, 360 val images",
                 recipe="recipes/digits.yaml")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
