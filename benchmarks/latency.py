"""Latency of original vs converted models in every runtime this machine has, measured side by side.

    python benchmarks/latency.py [--models timm:resnet18 ...] [--batch-size 8] [--runtimes eager onnxruntime ...]
                                 [--variants rank1 flops-0.5] [--iters 10]

Variants: rank 1 wherever it is cheaper, and ``target_flops=0.5`` (svd init: weights do not change
latency). Runtimes (``dsd.BenchmarkSettings``): on a CPU eager NCHW, eager channels_last, torch.compile
channels_last and onnxruntime; on a GPU (``--device cuda``) also bf16 channels_last eager, CUDA-graph
replay and torch.compile (default and reduce-overhead), and onnxruntime where its CUDA provider is present;
``--runtimes`` also offers torch.compile with Inductor's freezing (``compile-frozen-*``). In each runtime the
original and its variants are timed interleaved in one run; the speedup carries its bootstrap p10-p90
interval. A variant a budget cannot reach is listed with the reason.
"""
from __future__ import annotations

import argparse
from collections import Counter
from typing import Any, Dict, List

import torch

import dsd
from dsd.errors import DsdError
from dsd.io import build_arch
from dsd.savings import count_flops
from dsd.timing import BenchmarkSettings, Speedup, chosen_forms, measure
from _results import write

MODELS = ["timm:resnet18", "timm:resnet50", "timm:vgg16", "timm:efficientnet_b0"]
INPUT_SIZE = (3, 224, 224)
RUNTIMES = {  # name: BenchmarkSettings fields
    "eager": dict(runtime="eager"),
    "eager-cl": dict(runtime="eager", channels_last=True),
    "compile-cl": dict(runtime="compile", channels_last=True),
    "compile-frozen-cl": dict(runtime="compile", freezing=True, channels_last=True),
    "onnxruntime": dict(runtime="onnxruntime"),
    "eager-bf16-cl": dict(runtime="eager", dtype="bfloat16", channels_last=True),
    "cudagraph-bf16-cl": dict(runtime="cudagraph", dtype="bfloat16", channels_last=True),
    "compile-bf16-cl": dict(runtime="compile", dtype="bfloat16", channels_last=True),
    "compile-graphs-bf16-cl": dict(runtime="compile", compile_mode="reduce-overhead", dtype="bfloat16",
                                   channels_last=True),
    "compile-frozen-bf16-cl": dict(runtime="compile", freezing=True, dtype="bfloat16", channels_last=True),
    "compile-graphs-frozen-bf16-cl": dict(runtime="compile", compile_mode="reduce-overhead", freezing=True,
                                          dtype="bfloat16", channels_last=True),
}
DEFAULT_RUNTIMES = {"cpu": ["eager", "eager-cl", "compile-cl", "onnxruntime"],
                    "cuda": ["eager-bf16-cl", "cudagraph-bf16-cl", "compile-bf16-cl", "compile-graphs-bf16-cl", "eager",
                             "onnxruntime"]}
VARIANTS = {"rank1": dict(rank=1), "flops-0.5": dict(target_flops=0.5, target_flops_of="convs")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="timm:NAME or torchvision:NAME")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, help="default: 8 on a CPU, 64 on a GPU")
    parser.add_argument("--runtimes", nargs="+", choices=list(RUNTIMES), help="default: all this device has")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--result-name", help="results/<name>.json; default: latency, or latency_gpu on a GPU")
    args = parser.parse_args()
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    batch = args.batch_size or (64 if kind == "cuda" else 8)
    example = torch.randn(1, *INPUT_SIZE)

    rows: List[Dict[str, Any]] = []
    print(f"{'model':22} {'variant':10} {'runtime':18} {'ms':>9} {'speedup (p10-p90)':>26} {'FLOP reduction':>15}",
          flush=True)
    for spec in args.models:
        original = build_arch(spec).eval()
        models, unreachable = {"original": original}, {}
        for variant in args.variants:
            try:
                models[variant], _ = dsd.convert_model(original, example, **VARIANTS[variant])
            except DsdError as error:
                unreachable[variant] = str(error)
        flops = {name: count_flops(model, example).total for name, model in models.items()}
        for runtime in args.runtimes or DEFAULT_RUNTIMES[kind]:
            try:
                settings = BenchmarkSettings(device=args.device, batch_size=batch, warmup=args.warmup,
                                             iters=args.iters, **RUNTIMES[runtime])
            except DsdError as error:
                print(f"{spec:22} {'-':10} {runtime:18} skipped: {error}", flush=True)
                continue
            times = dict(zip(models, measure(list(models.values()), (batch, *INPUT_SIZE), settings)))
            forms = {name: dict(Counter(chosen_forms(model, (batch, *INPUT_SIZE), settings).values()))
                     for name, model in models.items()}
            for name, stats in times.items():
                speedup = Speedup.of(times["original"], stats)
                row = {"model": spec, "variant": name, "runtime": runtime, "batch_size": batch, "device": args.device,
                       **{k: v for k, v in stats.to_dict().items() if k != "samples_ms"},
                       "speedup": speedup.median, "speedup_p10": speedup.p10, "speedup_p90": speedup.p90,
                       "flop_reduction": flops["original"] / flops[name], "forms": forms[name]}
                rows.append(row)
                print(f"{spec:22} {name:10} {runtime:18} {stats.median_ms:9.2f} {str(speedup):>26} "
                      f"{row['flop_reduction']:14.2f}x  {_forms(row)}", flush=True)
        for name, reason in unreachable.items():
            rows.append({"model": spec, "variant": name, "runtime": "-", "batch_size": batch, "device": args.device,
                         "unreachable": reason})
            print(f"{spec:22} {name:10} unreachable: {reason}", flush=True)
    name = args.result_name or ("latency_gpu" if kind == "cuda" else "latency")
    path = write(name, rows, input_size=list(INPUT_SIZE), markdown=markdown(rows))
    print(f"wrote {path}")


def markdown(rows: List[Dict[str, Any]]) -> str:
    lines = ["Speedup: the original's median over the variant's, all timed interleaved in one run in that runtime, "
             "with the bootstrap p10-p90 interval. FLOP reduction: fvcore whole-model MACs, original / variant. "
             "`-cl`: channels_last. Variants use svd init (weights do not change latency). Forms: how many "
             "separable layers computed in each form (`dsd.timing.chosen_forms`).", "",
             "| model | variant | runtime | batch | median ms | speedup (p10-p90) | FLOP reduction | forms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "unreachable" in r:
            lines.append(f"| {r['model']} | {r['variant']} | {r['runtime']} | {r['batch_size']} | - | "
                         f"unreachable: {r['unreachable'].split(';')[0]} | - | - |")
            continue
        lines.append(f"| {r['model']} | {r['variant']} | {r['runtime']} | {r['batch_size']} | {r['median_ms']:.2f} "
                     f"| {r['speedup']:.2f}x ({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f}) "
                     f"| {r['flop_reduction']:.2f}x | {_forms(r)} |")
    return "\n".join(lines) + "\n"


def _forms(row: Dict[str, Any]) -> str:
    return ", ".join(f"{form} {count}" for form, count in sorted(row.get("forms", {}).items())) or "-"


if __name__ == "__main__":
    main()
