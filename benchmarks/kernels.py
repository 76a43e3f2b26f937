"""Separable layers against the dense conv, per layer and end to end, timed side by side in one run.

    python benchmarks/kernels.py [--batch-sizes 8 64] [--models resnet18 resnet50 vgg16] [--iters 20]
                                 [--devices cpu cuda]

Per layer (3x3, stride 1; C=64/56x56, 128/28, 256/14, 512/7), channels_last: the dense conv; rank 1;
rank 2 in three fixed forms (one depthwise conv with a depth multiplier, as dsd before 0.2 computed it, r
rank-1 slices, and their concatenation under one pointwise conv) and as dsd computes it now (the form it
measures fastest); on a GPU also the fused Triton kernel at ranks 1 and 2 and the pointwise conv alone (a
1x1 conv on the same input: the bound a fused kernel can reach, as it reads the input and writes the output
once), timed as CUDA-graph replays. End to end:
timm models at rank 1 and at ``target_flops=0.5`` (of the conv FLOPs): alone, alone with the static forms
(no timing of forms), with ``only_if_faster``, and with ``target_latency=0.7`` as well (both decided in the
layout they are timed in, batch 8), BatchNorm folded in both original and converted model (as deployed), eager
NCHW and eager channels_last. CPU rows are float32; the GPU rows float32 and bfloat16.
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
from dsd.layers.forms import FORMS, static_forms
from dsd.timing import BenchmarkSettings, LatencyStats, time_module

LAYERS = [(64, 56), (128, 28), (256, 14), (512, 7)]
MODELS = ["resnet18", "resnet50", "vgg16"]
MODEL_COLUMNS = {"rank1": "rank 1", "flops0.5": "target_flops 0.5", "flops0.5 static forms": "same, static forms",
                 "flops0.5 faster": "+ only_if_faster", "flops0.5 latency0.7": "+ target_latency 0.7"}


class FixedForm(nn.Module):
    """A separable layer in one form of :mod:`dsd.layers.forms`, not the one it would measure fastest."""

    def __init__(self, layer: DepthwiseSeparableConv2d, form: str):
        super().__init__()
        self.layer, self.form = layer, form

    def forward(self, x):
        return FORMS[self.form](self.layer, self.layer._pad(x))


def layer_variants(channels: int, on_gpu: bool) -> Dict[str, nn.Module]:
    dense = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    rank1, rank2 = dsd.from_conv(dense, rank=1), dsd.from_conv(dense, rank=2)
    variants = {"dense": dense, "rank1": rank1, "rank2 multiplier": FixedForm(rank2, "multiplier"),
                "rank2 slices": FixedForm(rank2, "slices"), "rank2 concat": FixedForm(rank2, "concat"),
                "rank2": rank2}
    if on_gpu:
        variants.update({"rank1 fused": FixedForm(rank1, "fused"), "rank2 fused": FixedForm(rank2, "fused"),
                         "pointwise alone": nn.Conv2d(channels, channels, 1, bias=False)})
    return variants


def interleaved(modules: Dict[str, nn.Module], shape, settings: BenchmarkSettings, rounds: int) -> Dict[str, LatencyStats]:
    """Each module timed ``rounds`` times in alternation; the median of the per-round medians. A module that fails
    to run (the fused kernel on a GPU whose shared memory its blocks outgrow) is left out with its error."""
    per_round: Dict[str, List[LatencyStats]] = {name: [] for name in modules}
    failed: Dict[str, str] = {}
    for _ in range(rounds):
        for name, module in modules.items():
            if name in failed:
                continue
            try:
                per_round[name].append(time_module(module, shape, settings))
            except Exception as error:  # any failure of one variant: the others' figures still stand
                failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                print(f"  {name} failed: {failed[name]}", flush=True)
    return {name: sorted(stats, key=lambda s: s.median_ms)[len(stats) // 2]
            for name, stats in per_round.items() if name not in failed}


def layer_rows(args, device: str, dtypes: List[str]) -> List[Dict[str, Any]]:
    rows = []
    for dtype in dtypes:
        for batch in args.batch_sizes:
            runtime = "cudagraph" if device == "cuda" else "eager"
            settings = BenchmarkSettings(device, dtype, batch, runtime=runtime, channels_last=True, warmup=3,
                                         iters=args.iters)
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


class StaticForms(nn.Module):
    """A converted model run with every separable layer in its static form: the measured choice of forms,
    A/B in the same run."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        with static_forms():
            return self.model(x)


def model_rows(args, device: str) -> List[Dict[str, Any]]:
    """Each model in each layout, with the measured decisions (``only_if_faster``, ``target_latency``) made in
    the layout it is timed in, as a user deploying that layout would make them."""
    rows = []
    settings = BenchmarkSettings(device, "float32", args.model_batch, warmup=2, iters=args.iters)
    for name in args.models:
        original = timm.create_model(name).eval()
        x = torch.randn(1, 3, 224, 224)

        def convert(variant: str, layout: str, **kwargs) -> Dict[str, nn.Module]:
            try:
                return {variant: dsd.fold_batchnorm(dsd.convert_model(original, x, **kwargs)[0])}
            except dsd.DsdError as error:  # an unreachable budget is a result too
                rows.append({"table": "model", "device": device, "model": name, "variant": variant,
                             "layout": layout, "infeasible": str(error)})
                print(f"{device} {name:10} {variant:19} infeasible: {error}", flush=True)
                return {}
        budget = dict(target_flops=0.5, target_flops_of="convs")
        shared = {"original": dsd.fold_batchnorm(original), **convert("rank1", "any", rank=1),
                  **convert("flops0.5", "any", **budget)}
        if "flops0.5" in shared:
            shared["flops0.5 static forms"] = StaticForms(shared["flops0.5"])
        for channels_last in (False, True):
            layout = "channels_last" if channels_last else "NCHW"
            timing = replace(settings, channels_last=channels_last)
            decide = replace(timing, iters=5)
            variants = {**shared,
                        **convert("flops0.5 faster", layout, only_if_faster=True, benchmark=decide, **budget),
                        **convert("flops0.5 latency0.7", layout, target_latency=0.7, benchmark=decide, **budget)}
            times = interleaved(variants, (args.model_batch, 3, 224, 224), timing, args.rounds)
            for variant, stats in times.items():
                speedup = times["original"].median_ms / stats.median_ms
                rows.append({"table": "model", "device": device, "model": name, "variant": variant,
                             "batch": args.model_batch, "channels_last": channels_last, "median_ms": stats.median_ms,
                             "p10_ms": stats.p10_ms, "p90_ms": stats.p90_ms, "speedup": speedup})
                print(f"{device} {name:10} {layout:13} {variant:21} {stats.median_ms:9.2f} ms  {speedup:5.2f}x",
                      flush=True)
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
              "| device | model | batch | layout | " + " | ".join(MODEL_COLUMNS.values()) + " |",
              "|---|---|---|---|" + "---|" * len(MODEL_COLUMNS)]
    timed = [r for r in rows if r["table"] == "model" and "median_ms" in r]
    for device, model, batch, cl in dict.fromkeys((r["device"], r["model"], r["batch"], r["channels_last"]) for r in timed):
        cells = {r["variant"]: r for r in timed if (r["device"], r["model"], r["batch"], r["channels_last"])
                 == (device, model, batch, cl)}
        lines.append(f"| {device} | {model} | {batch} | {'channels_last' if cl else 'NCHW'} | " + " | ".join(
            f"{cells[v]['speedup']:.2f}x ({cells[v]['median_ms']:.1f})" if v in cells else "infeasible"
            for v in MODEL_COLUMNS) + " |")
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
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"],
                        help="default: the CPU, and CUDA where present")
    parser.add_argument("--result-name", default="kernels",
                        help="results/<name>.json (e.g. a second run under another allocator setting)")
    args = parser.parse_args()
    torch.manual_seed(0)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    if "cpu" in devices:
        rows += layer_rows(args, "cpu", ["float32"]) + model_rows(args, "cpu")
    if "cuda" in devices:
        rows += layer_rows(args, "cuda", ["float32", "bfloat16"]) + model_rows(args, "cuda")
    path = write(args.result_name, rows, markdown=markdown(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
