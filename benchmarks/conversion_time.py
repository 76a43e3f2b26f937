"""Conversion time (svd init, rank 1) as a multiple of one forward pass, batch 1, on this CPU.

    python benchmarks/conversion_time.py [--models resnet50 ...] [--size 224] [--repeats 7]

Targets: converting resnet50 costs no more than 5 forward passes (issue 2); resnet18's svd path at most 2, and
its data-aware path (with the sensitivity measurement) at most 50 forward passes over its calibration data
(issue 17). The conversion includes its own work on the example input (the analysis on meta tensors where
the model allows, the shape check of each converted layer on meta tensors) and copying the model. The forward pass and the conversions take turns, round after round, and each figure
is a median over the rounds. ``budget_ratio``: ``target_flops=0.7`` (svd; 0.5 is out of reach for resnet50), also in forward passes.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import time
from typing import Dict, Iterator

import timm
import torch

import dsd
from dsd.convert.match import analyze
from dsd.convert.options import ConvertOptions
from dsd.convert.pipeline import describe_layers, initialise_layers, rewrite, verify_shapes
from dsd.module_tree import copy_sharing_convs, own_parameters
from dsd.errors import DsdError
from _results import interleaved_median_seconds, median_seconds, write

CALIBRATION = (4, 8)  # batches, images per batch
MODELS = ["resnet50", "resnet18", "resnext50_32x4d", "regnety_016", "efficientnet_b0", "tf_efficientnet_b0",
          "mobilenetv3_large_100", "convnext_tiny", "densenet121", "vgg16"]


def data_aware(model, size: int) -> dict:
    """The data-aware path with dsd's defaults, timed once, as a multiple of one forward pass over the same
    calibration batches."""
    batches = [torch.randn(CALIBRATION[1], 3, size, size) for _ in range(CALIBRATION[0])]
    with torch.inference_mode():
        forward = median_seconds(lambda: [model(b) for b in batches], 2)
    convert = median_seconds(lambda: dsd.convert_model(model, batches[0][:1], target_flops=0.5, init="data",
                                                       calibration_data=batches, allocation="sensitivity"), 1)
    return {"data_aware_s": convert, "calibration_forward_s": forward, "data_aware_ratio": convert / forward}


DECOUPLING_PARTS = {"_gram": "Gram products", "_leading_spectra": "eigensolve", "_factors": "factor products"}


@contextlib.contextmanager
def parts_timed(times: Dict[str, float]) -> Iterator[None]:
    """Inside, the time of each of the decoupling's parts (:data:`DECOUPLING_PARTS`) adds up in ``times``."""
    module = importlib.import_module("dsd.layers.decouple")
    originals = {name: getattr(module, name) for name in DECOUPLING_PARTS}

    def timed(part, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[part] = times.get(part, 0.0) + time.perf_counter() - start
        return run
    try:
        for name, fn in originals.items():
            setattr(module, name, timed(DECOUPLING_PARTS[name], fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def stage_seconds(model, x) -> Dict[str, float]:
    """The rank-1 svd path's stages, run as ``convert_model`` runs them, each timed (seconds); the decoupling's
    parts (of its stage) too."""
    options, times, parts, start = ConvertOptions(rank=1), {}, {}, time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal start
        now = time.perf_counter()
        times[stage], start = now - start, now
    working, shared = copy_sharing_convs(model)
    lap("copy")
    analysis = analyze(working, x)
    lap("analysis (FX trace, meta run)")
    records, eligible = describe_layers(analysis, options)
    lap("rules")
    with parts_timed(parts):
        layers, _ = initialise_layers(eligible, records, options, working, working, None, None)
    lap("decoupling and building")
    rewrite(working, layers, options)
    own_parameters(working, shared)
    lap("swap, copies of the convs kept")
    verify_shapes(analysis, layers)
    lap("shape check")
    return {**times, **{f"decoupling: {part}": seconds for part, seconds in parts.items()}}


@torch.inference_mode()
def _inference(model, x) -> None:
    model(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7, help="rounds; in each the forward pass and the "
                        "conversions take turns")
    parser.add_argument("--data-aware", nargs="*", default=["resnet18"], help="models also timed on the data-aware path")
    args = parser.parse_args()

    rows = []
    print(f"{'model':24} {'forward s':>10} {'convert s':>10} {'ratio':>7} {'budget':>7} {'converted':>10}")
    for name in args.models:
        model = timm.create_model(name).eval()
        x = torch.randn(1, 3, args.size, args.size)
        try:
            dsd.convert_model(model, x, target_flops=0.7)
            budget_fn = lambda: dsd.convert_model(model, x, target_flops=0.7)  # noqa: E731
        except DsdError:  # what stays dense is already above 0.7 of the FLOPs (efficientnet: one conv converts)
            budget_fn = None
        with torch.inference_mode():
            model(x)  # warm-up
        _, report = dsd.convert_model(model, x, rank=1)
        stage_runs = []
        timed = {"forward": lambda: _inference(model, x), "convert": lambda: dsd.convert_model(model, x, rank=1),
                 "stages": lambda: stage_runs.append(stage_seconds(model, x))}
        if budget_fn:
            timed["budget"] = budget_fn
        seconds = interleaved_median_seconds(timed, args.repeats)
        forward, convert, budget = seconds["forward"], seconds["convert"], seconds.get("budget")
        stages = {stage: statistics.median(run[stage] for run in stage_runs) / forward for stage in stage_runs[0]}
        row = {"model": name, "forward_s": forward, "convert_s": convert, "ratio": convert / forward,
               "budget_ratio": budget / forward if budget else None, "converted": len(report.converted),
               "convs": len(report.layers), "stages_in_passes": stages}
        if name in args.data_aware:
            row.update(data_aware(model, args.size))
        rows.append(row)
        print(f"{name:24} {forward:10.3f} {convert:10.3f} {row['ratio']:7.2f} {row['budget_ratio'] or float('nan'):7.2f} "
              f"{row['converted']:>4}/{row['convs']:<5}"
              + (f" data-aware {row['data_aware_ratio']:.1f}" if "data_aware_ratio" in row else ""), flush=True)
        print("    rank 1 by stage, in forward passes: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    path = write("conversion_time", rows, input_size=[3, args.size, args.size], batch_size=1, rank=1, init="svd",
                 data_aware=f"target_flops=0.5, init=data, {CALIBRATION[0]} batches of {CALIBRATION[1]} "
                            "(sequential, allocation=sensitivity), in forward passes over those batches")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
