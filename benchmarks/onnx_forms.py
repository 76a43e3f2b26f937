"""ONNX Runtime latency of dsd's export with each layer in its fastest form vs the static rule's, side by side.

    pip install -e '.[onnx]'
    python benchmarks/onnx_forms.py [--batch-size 8] [--iters 20]

An export traces one form per separable layer. ``dsd.export_onnx`` times each rank >= 2 layer's candidate
forms alone in ONNX Runtime and writes the fastest (``forms="timed"``, the default); ``forms="static"`` writes
the static rule's (r rank-1 slices from 9 input channels on). Models: dsd's digits CNN (random weights: the
weights do not change the time) at ranks 2 and 4, and timm resnet18 and vgg16 at ``target_flops=0.5`` of their
convs (svd init). The original and both exports are timed interleaved (CPU provider, as many threads as torch,
no spinning); the speedups are the original's median over each export's.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict

import timm
import torch

import dsd
from dsd.timing import BenchmarkSettings, pin_onnxruntime_forms
from dsd.zoo.models import digits_cnn
from _results import write

CASES = {  # name: (model factory, input shape without batch, conversion options)
    "digits_cnn rank 2": (digits_cnn, (1, 32, 32), dict(rank=2)),
    "digits_cnn rank 4": (digits_cnn, (1, 32, 32), dict(rank=4)),
    "resnet18 target_flops=0.5": (lambda: timm.create_model("resnet18"), (3, 224, 224),
                                  dict(target_flops=0.5, target_flops_of="convs")),
    "vgg16 target_flops=0.5": (lambda: timm.create_model("vgg16"), (3, 224, 224),
                               dict(target_flops=0.5, target_flops_of="convs")),
}


def sessions(paths: Dict[str, Path]):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return {name: onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for name, path in paths.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    rows = []
    print(f"{'case':28} {'original ms':>12} {'static':>16} {'timed':>16}  forms chosen")
    for case in args.cases:
        factory, shape, options = CASES[case]
        torch.manual_seed(0)
        original = factory().eval()
        x = torch.randn(args.batch_size, *shape)
        converted, _ = dsd.convert_model(original, x[:1], **options)
        with tempfile.TemporaryDirectory(prefix="dsd-onnx-forms-") as folder:
            paths = {name: Path(folder) / f"{name}.onnx" for name in ("original", "static", "timed")}
            dsd.export_onnx(original, x, paths["original"])
            dsd.export_onnx(converted, x, paths["static"], forms="static")
            start = time.perf_counter()  # what export_onnx(converted, x, path) does, its choice kept to report
            pinned = copy.deepcopy(converted).eval()
            chosen = pin_onnxruntime_forms(pinned, tuple(x.shape),
                                           BenchmarkSettings(runtime="onnxruntime", batch_size=args.batch_size))
            dsd.export_onnx(pinned, x, paths["timed"])
            export_s = time.perf_counter() - start
            runs = sessions(paths)
            feed = {runs["original"].get_inputs()[0].name: x.numpy()}
            times = {name: [] for name in runs}
            for session in runs.values():
                session.run(None, feed)
            for _ in range(args.iters):
                for name, session in runs.items():
                    begin = time.perf_counter()
                    session.run(None, feed)
                    times[name].append(time.perf_counter() - begin)
        median = {name: statistics.median(taken) * 1e3 for name, taken in times.items()}
        counts = {form: list(chosen.values()).count(form) for form in sorted(set(chosen.values()))}
        row = {"case": case, "batch_size": args.batch_size, "original_ms": median["original"],
               "static_ms": median["static"], "timed_ms": median["timed"],
               "static_speedup": median["original"] / median["static"],
               "timed_speedup": median["original"] / median["timed"], "forms_chosen": counts,
               "timed_export_s": export_s}
        rows.append(row)
        print(f"{case:28} {median['original']:12.2f} {median['static']:9.2f} ({row['static_speedup']:.2f}x) "
              f"{median['timed']:9.2f} ({row['timed_speedup']:.2f}x)  {counts}", flush=True)
    print(f"wrote {write('onnx_forms', rows, iters=args.iters)}")


if __name__ == "__main__":
    main()
