"""Latency of original vs converted models: speedup, FLOP reduction and efficiency (speedup / FLOP reduction).

    python benchmarks/latency.py [--models timm:resnet18 ...] [--batch-sizes 1 32] [--device cpu|cuda]
                                 [--settings fp32 fp16-cl ...]

Variants: the original; rank 1 everywhere it is cheaper (svd init; weights do not change latency); and
rank 1 with ``only_if_faster`` (each layer kept dense where its separable form measures slower on this
device, at batch 1: the latency-budget choice). Each batch size and setting times the original and its
variants side by side in one run (timm benchmark.py conventions: eval, inference_mode, warm-up, median
and 10th/90th percentiles; CUDA events on a GPU). CPU default: fp32. GPU default: fp32, fp16 AMP +
channels_last, and fp16 AMP + channels_last + torch.compile.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any, Dict, List

import torch

import dsd
from dsd.convert.options import DECISION_TIMING
from dsd.io import build_arch
from dsd.savings import count_flops
from dsd.timing import BenchmarkSettings, model_latency
from _results import write

MODELS = ["timm:resnet18", "timm:resnet50", "timm:convnext_tiny", "timm:regnety_016", "timm:vgg16",
          "timm:efficientnet_b0", "torchvision:resnet34"]
INPUT_SIZE = (3, 224, 224)
SETTINGS = {  # name: (dtype, channels_last, compile)
    "fp32": ("float32", False, False),
    "fp32-cl": ("float32", True, False),
    "fp16-cl": ("float16", True, False),
    "bf16-cl": ("bfloat16", True, False),
    "fp16-cl-compile": ("float16", True, True),
}
DEFAULT_SETTINGS = {"cpu": ["fp32"], "cuda": ["fp32", "fp16-cl", "fp16-cl-compile"]}
VARIANTS = {"rank1": dict(rank=1), "rank1-only-if-faster": dict(rank=1, only_if_faster=True)}


def iterations(device: str, batch_size: int) -> Dict[str, int]:
    """Fewer iterations for large CPU batches (a vgg16 batch of 32 takes seconds on two cores)."""
    if device == "cpu" and batch_size > 8:
        return {"warmup": 1, "iters": 3}
    return {"warmup": 10, "iters": 40} if device != "cpu" else {"warmup": 5, "iters": 15}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="timm:NAME or torchvision:NAME")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="precision / memory format / compile")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    settings_names = args.settings or DEFAULT_SETTINGS["cuda" if args.device.startswith("cuda") else "cpu"]
    example = torch.randn(1, *INPUT_SIZE)

    decisions = replace(DECISION_TIMING, device=args.device)  # only_if_faster's per-layer timings
    rows: List[Dict[str, Any]] = []
    print(f"{'model':24} {'variant':21} {'batch':>5} {'setting':16} {'ms (p10-p90)':>24} {'speedup':>8} "
          f"{'FLOPs':>7} {'efficiency':>10}", flush=True)
    for spec in args.models:
        original = build_arch(spec).eval()
        models = {"original": (original, None)}
        for variant in args.variants:
            converted, report = dsd.convert_model(original, example, benchmark=decisions, **VARIANTS[variant])
            models[variant] = (converted, report)
        flops = {name: count_flops(model, example).total for name, (model, _) in models.items()}
        for batch_size in args.batch_sizes:
            for setting in settings_names:
                dtype, channels_last, compile_ = SETTINGS[setting]
                bench = BenchmarkSettings(args.device, dtype, batch_size, channels_last, compile_,
                                          **iterations(args.device, batch_size))
                times = {name: model_latency(model, INPUT_SIZE, bench) for name, (model, _) in models.items()}
                for name, (_, report) in models.items():
                    stats = times[name]
                    speedup = times["original"].median_ms / stats.median_ms
                    reduction = flops["original"] / flops[name]
                    row = {"model": spec, "variant": name, "batch_size": batch_size, "setting": setting,
                           "device": args.device, **stats.to_dict(), "speedup": speedup, "flops": flops[name],
                           "flop_reduction": reduction, "efficiency": speedup / reduction,
                           "converted": len(report.converted) if report else 0,
                           "kept_dense_not_faster": report.skip_counts().get("not faster", 0) if report else 0}
                    rows.append(row)
                    print(f"{spec:24} {name:21} {batch_size:5} {setting:16} "
                          f"{stats.median_ms:9.2f} ({stats.p10_ms:.1f}-{stats.p90_ms:.1f}) {speedup:7.2f}x "
                          f"{reduction:6.2f}x {row['efficiency']:10.2f}", flush=True)
    name = "latency_gpu" if args.device.startswith("cuda") else "latency"
    path = write(name, rows, input_size=list(INPUT_SIZE), markdown=markdown(rows))
    print(f"wrote {path}")


def markdown(rows: List[Dict[str, Any]]) -> str:
    lines = ["Speedup: original median / variant median, measured side by side in one run. FLOP reduction: "
             "fvcore whole-model MACs, original / variant. Efficiency: speedup / FLOP reduction (1.0 = the "
             "FLOP saving fully shows up as time). `only-if-faster` decides per layer at batch 1 on this device.",
             "", "| model | variant | batch | setting | median ms (p10-p90) | speedup | FLOP reduction | efficiency "
             "| converted (kept dense: slower) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch_size']} | {r['setting']} "
                     f"| {r['median_ms']:.2f} ({r['p10_ms']:.2f}-{r['p90_ms']:.2f}) | {r['speedup']:.2f}x "
                     f"| {r['flop_reduction']:.2f}x | {r['efficiency']:.2f} "
                     f"| {r['converted']} ({r['kept_dense_not_faster']}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
