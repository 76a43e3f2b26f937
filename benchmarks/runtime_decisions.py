"""Decisions made in onnxruntime, checked by an ONNX Runtime timing that does not go through dsd.

    python benchmarks/runtime_decisions.py [--model timm:resnet18] [--batch-size 8] [--iters 40]
                                           [--checks compare only-if-faster target-latency]

- ``compare``: ``dsd.compare(original, rank 1, benchmark=BenchmarkSettings(runtime="onnxruntime"))``,
  its speedup beside the independent timing's;
- ``only-if-faster``: ``convert_model(only_if_faster=True)`` decided in onnxruntime: how many of the
  spatial convs it converts, and whether the result is slower, timed independently;
- ``target-latency``: ``convert_model(target_latency=0.5)`` decided in onnxruntime: the converted model's
  independently timed share of the original's latency.

The independent timing exports both models as a user would (``dsd.export_onnx``: each rank-r layer in its
fastest form there, BatchNorm left unfolded as in dsd's timing), opens one ``InferenceSession`` each
(CPU provider, onnxruntime's default options, as many threads as torch uses) and times ``session.run``
with ``time.perf_counter`` in blocks, the models taking turns. Conversion wall time is printed too (layer timings come from
dsd's on-disk cache on a second run).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import onnxruntime
import torch

import dsd
from dsd.io import build_arch
from dsd.timing import BenchmarkSettings
from _results import write

INPUT_SIZE = (3, 224, 224)
TARGET = 0.5


def independent_ort_ms(models: List[torch.nn.Module], batch_size: int, iters: int, rounds: int = 3) -> List[float]:
    """Median ``session.run`` milliseconds of each model, without dsd's timing code: each session with
    onnxruntime's defaults, timed for ``iters`` runs in a block, the models taking turns over ``rounds``."""
    x = torch.randn(batch_size, *INPUT_SIZE)
    sessions = []
    with tempfile.TemporaryDirectory() as folder:
        for i, model in enumerate(models):
            path = Path(folder) / f"m{i}.onnx"
            dsd.export_onnx(model.eval(), x, path, fold_bn=False)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            sessions.append(onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
    feed = x.numpy()
    times: List[List[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for session, taken in zip(sessions, times):
            inputs = {session.get_inputs()[0].name: feed}
            for i in range(iters // rounds + 2):
                start = time.perf_counter()
                session.run(None, inputs)
                if i >= 2:  # warm-up
                    taken.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def spatial_convs(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) and m.groups == 1 for m in model.modules())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:resnet18")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=40, help="timed iterations of dsd's and the independent timing")
    parser.add_argument("--checks", nargs="+", default=["compare", "only-if-faster", "target-latency"],
                        choices=["compare", "only-if-faster", "target-latency"])
    args = parser.parse_args()
    settings = BenchmarkSettings(runtime="onnxruntime", batch_size=args.batch_size, warmup=3, iters=args.iters)
    original = build_arch(args.model).eval()
    example = torch.randn(1, *INPUT_SIZE)
    rows: List[Dict[str, Any]] = []

    if "compare" in args.checks:
        rank1, _ = dsd.convert_model(original, example, rank=1)
        report = dsd.compare(original, rank1, INPUT_SIZE, settings, per_layer=False)
        before, after = independent_ort_ms([original, rank1], args.batch_size, args.iters)
        independent = before / after
        rows.append({"check": "compare rank 1", "dsd_speedup": report.total.speedup,
                     "dsd_p10": report.total.speedup_p10, "dsd_p90": report.total.speedup_p90,
                     "independent_speedup": independent, "independent_ms": [before, after],
                     "difference": report.total.speedup / independent - 1})
    for check, options in (("only-if-faster", dict(only_if_faster=True)),
                           ("target-latency", dict(target_latency=TARGET))):
        if check not in args.checks:
            continue
        start = time.perf_counter()
        converted, report = dsd.convert_model(original, example, benchmark=settings, progress=True, **options)
        seconds = time.perf_counter() - start
        before, after = independent_ort_ms([original, converted], args.batch_size, args.iters)
        row = {"check": check, "converted": len(report.converted), "spatial_convs": spatial_convs(original),
               "dsd_share": report.end_to_end.share if report.end_to_end else report.budget.reached,
               "independent_share": after / before, "independent_ms": [before, after],
               "conversion_seconds": seconds}
        if report.budget is not None:
            row["rounds"] = report.budget.end_to_end.rounds
        rows.append(row)
    for row in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    path = write("runtime_decisions", rows, model=args.model, batch_size=args.batch_size,
                 markdown=markdown(rows, args))
    print(f"wrote {path}")


def markdown(rows: List[Dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"{args.model}, batch {args.batch_size}, decided with `BenchmarkSettings(runtime=\"onnxruntime\", "
             f"batch_size={args.batch_size})`; the independent timing exports with `dsd.export_onnx` and times "
             "`InferenceSession.run` (onnxruntime's default options) in blocks, the models taking turns, outside dsd.", "",
             "| check | dsd says | independent ORT timing | converted | conversion time |", "|---|---|---|---|---|"]
    for r in rows:
        if r["check"] == "compare rank 1":
            lines.append(f"| {r['check']} | {r['dsd_speedup']:.2f}x ({r['dsd_p10']:.2f}-{r['dsd_p90']:.2f}) "
                         f"| {r['independent_speedup']:.2f}x ({r['difference']:+.0%}) | all | - |")
        else:
            lines.append(f"| {r['check']} | {r['dsd_share']:.3f} of the original's latency | {r['independent_share']:.3f} "
                         f"| {r['converted']} of {r['spatial_convs']} spatial convs | {r['conversion_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
