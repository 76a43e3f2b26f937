"""Separable layers against the dense conv, per layer and end to end, timed side by side in one run.

    python benchmarks/kernels.py [--batch-sizes 8 64] [--models resnet18 resnet50 vgg16] [--iters 20]

Per layer (3x3, stride 1; C=64/56x56, 128/28, 256/14, 512/7), channels_last: the dense conv; rank 1;
rank 2 as one depthwise conv with a depth multiplier (dsd before 0.2) and as dsd computes it now (rank-1
slices); on a GPU also the fused Triton kernel (CUDA events, eager: CUDA-graph replay comes with the
runtimes of dsd.BenchmarkSettings). End to end: timm models at
rank 1 and at ``target_flops=0.5`` (of the conv FLOPs): alone, with ``only_if_faster``, and with ``target_latency=0.7``
as well (both decided in channels_last, batch 8), BatchNorm folded in both original and converted model (as deployed),
eager NCHW and eager channels_last. CPU rows are float32; the GPU rows float32 and bfloat16.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any, Dict, List

import timm
import torch
import torch.nn as nn

import dsd
from _results import write
from dsd.layers import DepthwiseSeparableConv2d
from dsd.timing import BenchmarkSettings, LatencyStats, time_module

LAYERS = [(64, 56), (128, 28), (256, 14), (512, 7)]
MODELS = ["resnet18", "resnet50", "vgg16"]


class MultiplierForm(nn.Module):
    """Rank r as one depthwise conv with depth multiplier r, then the pointwise conv: dsd before 0.2."""

    def __init__(self, layer: DepthwiseSeparableConv2d):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer.pointwise(self.layer.depthwise(x))


class Fused(nn.Module):
    def __init__(self, layer: DepthwiseSeparableConv2d):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        from dsd.kernels import separable_conv2d
        return separable_conv2d(x, self.layer.depthwise.weight, self.layer.pointwise.weight, self.layer.pointwise.bias,
                                1, 1, 1)


def layer_variants(channels: int, on_gpu: bool) -> Dict[str, nn.Module]:
    dense = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    rank1, rank2 = dsd.from_conv(dense, rank=1), dsd.from_conv(dense, rank=2)
    variants = {"dense": dense, "rank1": rank1, "rank2 multiplier": MultiplierForm(rank2), "rank2": rank2}
    if on_gpu:
        variants.update({"rank1 fused": Fused(rank1), "rank2 fused": Fused(rank2)})
    return variants


def interleaved(modules: Dict[str, nn.Module], shape, settings: BenchmarkSettings, rounds: int) -> Dict[str, LatencyStats]:
    """Each module timed ``rounds`` times in alternation; the median of the per-round medians."""
    per_round: Dict[str, List[LatencyStats]] = {name: [] for name in modules}
    for _ in range(rounds):
        for name, module in modules.items():
            per_round[name].append(time_module(module, shape, settings))
    return {name: sorted(stats, key=lambda s: s.median_ms)[len(stats) // 2] for name, stats in per_round.items()}


def layer_rows(args, device: str, dtypes: List[str]) -> List[Dict[str, Any]]:
    rows = []
    for dtype in dtypes:
        for batch in args.batch_sizes:
            settings = BenchmarkSettings(device, dtype, batch, channels_last=True, warmup=3, iters=args.iters)
            for channels, size in LAYERS:
                times = interleaved(layer_variants(channels, device == "cuda"), (batch, channels, size, size),
                                    settings, args.rounds)
                dense = times["dense"].median_ms
                for name, stats in times.items():
                    rows.append({"table": "layer", "device": device, "dtype": dtype, "batch": batch,
                                 "layer": f"{channels}/{size}x{size}", "variant": name, "median_ms": stats.median_ms,
                                 "p10_ms": stats.p10_ms, "p90_ms": stats.p90_ms, "speedup": dense / stats.median_ms})
                    print(f"{device} {dtype:8} b{batch:<3} {channels:>3}/{size:<3} {name:18} "
                          f"{stats.median_ms:9.3f} ms  {dense / stats.median_ms:5.2f}x", flush=True)
    return rows


def model_rows(args, device: str) -> List[Dict[str, Any]]:
    rows = []
    settings = BenchmarkSettings(device, "float32", args.model_batch, warmup=2, iters=args.iters)
    for name in args.models:
        original = timm.create_model(name).eval()
        x = torch.randn(1, 3, 224, 224)
        decide = BenchmarkSettings(device, "float32", args.model_batch, channels_last=True, warmup=2, iters=5)
        conversions = {"rank1": dict(rank=1), "flops0.5": dict(target_flops=0.5, target_flops_of="convs"),
                       "flops0.5 faster": dict(target_flops=0.5, target_flops_of="convs", only_if_faster=True,
                                                  benchmark=decide),
                       "flops0.5 latency0.7": dict(target_flops=0.5, target_flops_of="convs", target_latency=0.7,
                                                   benchmark=decide)}
        variants = {"original": original}
        for variant, kwargs in conversions.items():
            try:
                variants[variant] = dsd.convert_model(original, x, **kwargs)[0]
            except dsd.DsdError as error:  # an unreachable budget is a result too
                rows.append({"table": "model", "device": device, "model": name, "variant": variant,
                             "infeasible": str(error)})
                print(f"{device} {name:10} {variant:15} infeasible: {error}", flush=True)
        variants = {k: dsd.fold_batchnorm(v) for k, v in variants.items()}
        for channels_last in (False, True):
            times = interleaved(variants, (args.model_batch, 3, 224, 224),
                                replace(settings, channels_last=channels_last), args.rounds)
            for variant, stats in times.items():
                speedup = times["original"].median_ms / stats.median_ms
                rows.append({"table": "model", "device": device, "model": name, "variant": variant,
                             "batch": args.model_batch, "channels_last": channels_last, "median_ms": stats.median_ms,
                             "p10_ms": stats.p10_ms, "p90_ms": stats.p90_ms, "speedup": speedup})
                print(f"{device} {name:10} {'CL' if channels_last else 'NCHW':4} {variant:15} "
                      f"{stats.median_ms:9.2f} ms  {speedup:5.2f}x", flush=True)
    return rows


def markdown(rows: List[Dict[str, Any]]) -> str:
    lines = ["Per layer (3x3, channels_last), speedup over the dense conv (median ms):", "",
             "| device | dtype | batch | layer | " + " | ".join(_variants(rows)) + " |",
             "|---|---|---|---|" + "---|" * len(_variants(rows))]
    keys = dict.fromkeys((r["device"], r["dtype"], r["batch"], r["layer"]) for r in rows if r["table"] == "layer")
    for key in keys:
        cells = {r["variant"]: r for r in rows if r["table"] == "layer" and (r["device"], r["dtype"], r["batch"],
                                                                             r["layer"]) == key}
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(
            f"{cells[v]['speedup']:.2f}x ({cells[v]['median_ms']:.3f})" if v in cells else "" for v in _variants(rows))
            + " |")
    lines += ["", "End to end (BatchNorm folded in every model), speedup over the original (median ms):", "",
              "| device | model | batch | layout | rank 1 | target_flops 0.5 | target_flops 0.5 + only_if_faster |",
              "|---|---|---|---|---|---|---|"]
    timed = [r for r in rows if r["table"] == "model" and "median_ms" in r]
    for device, model, batch, cl in dict.fromkeys((r["device"], r["model"], r["batch"], r["channels_last"]) for r in timed):
        cells = {r["variant"]: r for r in timed if (r["device"], r["model"], r["batch"], r["channels_last"])
                 == (device, model, batch, cl)}
        lines.append(f"| {device} | {model} | {batch} | {'channels_last' if cl else 'NCHW'} | " + " | ".join(
            f"{cells[v]['speedup']:.2f}x ({cells[v]['median_ms']:.1f})" if v in cells else "infeasible"
            for v in ("rank1", "flops0.5", "flops0.5 faster")) + " |")
    return "\n".join(lines) + "\n"


def _variants(rows) -> List[str]:
    return list(dict.fromkeys(r["variant"] for r in rows if r["table"] == "layer"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--model-batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per measurement")
    parser.add_argument("--result-name", default="kernels",
                        help="results/<name>.json (e.g. a second run under another allocator setting)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = layer_rows(args, "cpu", ["float32"]) + model_rows(args, "cpu")
    if torch.cuda.is_available():
        rows += layer_rows(args, "cuda", ["float32", "bfloat16"]) + model_rows(args, "cuda")
    path = write(args.result_name, rows, markdown=markdown(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
