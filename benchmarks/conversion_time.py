"""Conversion time (svd init, rank 1) as a multiple of one forward pass, batch 1, on this CPU.

    python benchmarks/conversion_time.py [--models resnet50 ...] [--size 224] [--repeats 3]

Target (issue 2): converting resnet50 costs no more than 5 forward passes. The conversion includes
its own work on the example input (one analysis pass, one verification pass) and copying the model.
"""
from __future__ import annotations

import argparse

import timm
import torch

import dsd
from _results import median_seconds, write

MODELS = ["resnet50", "resnet18", "resnext50_32x4d", "regnety_016", "efficientnet_b0", "tf_efficientnet_b0",
          "mobilenetv3_large_100", "convnext_tiny", "densenet121", "vgg16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rows = []
    print(f"{'model':24} {'forward s':>10} {'convert s':>10} {'ratio':>7} {'converted':>10}")
    for name in args.models:
        model = timm.create_model(name).eval()
        x = torch.randn(1, 3, args.size, args.size)
        with torch.inference_mode():
            model(x)  # warm-up
            forward = median_seconds(lambda: model(x), args.repeats)
        convert = median_seconds(lambda: dsd.convert_model(model, x, rank=1), args.repeats)
        _, report = dsd.convert_model(model, x, rank=1)
        row = {"model": name, "forward_s": forward, "convert_s": convert, "ratio": convert / forward,
               "converted": len(report.converted), "convs": len(report.layers)}
        rows.append(row)
        print(f"{name:24} {forward:10.3f} {convert:10.3f} {row['ratio']:7.2f} "
              f"{row['converted']:>4}/{row['convs']:<5}", flush=True)
    path = write("conversion_time", rows, input_size=[3, args.size, args.size], batch_size=1, rank=1, init="svd")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
