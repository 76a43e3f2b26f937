"""dsd against channel pruning (Torch-Pruning) at the same conv FLOPs, in every CPU runtime this machine has.

    pip install -e '.[bench]'   # torch-pruning
    python benchmarks/vs_pruning.py [--model resnet18] [--batch-size 8] [--iters 10] [--rounds 3]

dsd converts at rank 1; Torch-Pruning's MagnitudePruner (L2 magnitude, the classifier kept) prunes every conv
by one ratio, found by bisection so that its conv multiply-adds match dsd's within 2%. BatchNorm is folded in
all three models. Timed side by side (alternating rounds): eager NCHW, eager channels_last, torch.compile
(inductor, channels_last), ONNX Runtime (CPU provider, as many threads as torch). In eager PyTorch each model's
operator time is also split (torch.profiler, one forward): the share in convolutions and in max pooling. Accuracy is not compared here: both start from the
same weights and both need fine-tuning at this compression.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from copy import deepcopy
from pathlib import Path
from typing import Dict

import timm
import torch
import torch.nn as nn

import dsd
from _results import write
from dsd.savings import count_flops
from dsd.timing import BenchmarkSettings, time_module


def conv_macs(model: nn.Module, example: torch.Tensor) -> int:
    counts = count_flops(model, example).by_module
    return sum(counts.get(name, 0) for name, m in model.named_modules() if isinstance(m, nn.Conv2d))


def pruned_to(model: nn.Module, example: torch.Tensor, target: int) -> nn.Module:
    """Torch-Pruning's magnitude pruner at the ratio whose conv MACs match ``target`` (bisection)."""
    import torch_pruning as tp

    def prune(ratio: float) -> nn.Module:
        copy = deepcopy(model).eval()
        pruner = tp.pruner.MagnitudePruner(copy, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=[copy.get_classifier()])
        pruner.step()
        return copy.eval()
    low, high = 0.0, 0.99
    for _ in range(12):
        middle = (low + high) / 2
        if conv_macs(prune(middle), example) > target:
            low = middle
        else:
            high = middle
    return prune(high)


OP_KINDS = {"conv": ("convolution",), "max pool": ("max_pool",)}  # aten op names containing these


def op_shares(model: nn.Module, shape, channels_last: bool) -> Dict[str, float]:
    """Shares of one eager forward's operator time (torch.profiler, self CPU time) spent in each of
    :data:`OP_KINDS`, after two warm-up calls."""
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(*shape)
    if channels_last:
        model = deepcopy(model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            model(x)
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return {f"{kind} share": sum(e.self_cpu_time_total for e in events if any(k in e.key for k in keys)) / total
            for kind, keys in OP_KINDS.items()}


def ort_latency_ms(model: nn.Module, batch: torch.Tensor, iters: int, folder: Path, name: str) -> float:
    import onnxruntime
    path = folder / f"{name}.onnx"
    dsd.export_onnx(model, batch, path, fold_bn=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: batch.numpy()}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--result-name", default="vs_pruning", help="results/<name>.json (e.g. another machine's run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    original = timm.create_model(args.model).eval()
    example = torch.randn(1, 3, 224, 224)
    converted, _ = dsd.convert_model(original, example, rank=1)
    target = conv_macs(converted, example)
    pruned = pruned_to(original, example, target)
    models = {name: dsd.fold_batchnorm(m) for name, m in
              (("original", original), ("dsd rank 1", converted), ("Torch-Pruning", pruned))}
    macs = {name: conv_macs(m, example) for name, m in models.items()}
    shape = (args.batch_size, 3, 224, 224)
    rows = []
    for runtime in ("eager NCHW", "eager channels_last", "compile channels_last", "onnxruntime"):
        per_round: Dict[str, list] = {name: [] for name in models}
        with tempfile.TemporaryDirectory() as folder:
            for _ in range(args.rounds):
                for name, model in models.items():
                    if runtime == "onnxruntime":
                        ms = ort_latency_ms(model, torch.randn(*shape), args.iters, Path(folder), name.replace(" ", "_"))
                    else:
                        settings = BenchmarkSettings(batch_size=args.batch_size, warmup=2, iters=args.iters,
                                                     channels_last=runtime.endswith("channels_last"),
                                                     runtime=runtime.split()[0])
                        ms = time_module(model, shape, settings).median_ms
                    per_round[name].append(ms)
        base = statistics.median(per_round["original"])
        for name, times in per_round.items():
            ms = statistics.median(times)
            eager = runtime.startswith("eager")
            shares = op_shares(models[name], shape, runtime.endswith("last")) if eager else {}
            rows.append({"model": args.model, "variant": name, "runtime": runtime, "batch": args.batch_size,
                         "conv_macs_share": macs[name] / macs["original"], "median_ms": ms, "speedup": base / ms,
                         **shares})
            print(f"{runtime:20} {name:14} conv MACs {macs[name] / macs['original']:6.3f}  {ms:8.2f} ms  "
                  f"{base / ms:5.2f}x", flush=True)
    path = write(args.result_name, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
