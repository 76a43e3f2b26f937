"""Host time per call of a separable layer against the nn.Conv2d it replaced, on an input too small to cost
anything else: the Python work a layer adds to every eager call.

    python benchmarks/call_overhead.py [--devices cpu cuda] [--calls 5000] [--result-name call_overhead]

Where a model runs eager and its kernels are short (a GPU at small layers, a CPU at batch 1), this work, not
the arithmetic, sets the speed: on an H100 in bf16 at batch 64, eager resnet18 at rank 1 ran 0.82x of its
original with 16 of its 17 layers in the dense form, the original's own kernel. Each row: one conv (16
channels, 3x3, a 1x4x4 input), its rank-1 and rank-2 layers in each form (pinned) and as chosen by timing, in
float32 and under bfloat16 autocast; the fastest of 5 repeats of ``--calls`` calls each (on CUDA, calls
launched back to back, one synchronisation at the end), side by side in one run.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn

import dsd
from _results import write
from dsd.layers.forms import candidate_forms, choose_form


def per_call_us(call: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    for _ in range(200):
        call()
    sync()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        sync()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def rows_for(device: str, calls: int) -> List[Dict[str, object]]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1).eval().to(device)
    layers = {rank: dsd.convert_model(nn.Sequential(conv), rank=rank)[0][0] for rank in (1, 2)}
    x = torch.randn(1, 16, 4, 4, device=device)
    rows = []
    for dtype in ("float32", "bfloat16"):
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
        with torch.inference_mode(), autocast:
            conv_us = per_call_us(lambda: conv(x), calls, sync)
            for rank, layer in layers.items():
                for form in (None, *candidate_forms(layer, x)):
                    layer.pin_form(form)
                    layer(x)
                    chosen = choose_form(layer, x)  # the pinned form, or the one timed fastest for this input
                    us = per_call_us(lambda: layer(x), calls, sync)
                    rows.append({"device": device, "dtype": dtype, "rank": rank,
                                 "form": form or f"timed ({chosen})", "conv_us": conv_us, "layer_us": us,
                                 "overhead_us": us - conv_us})
                    print(f"{device:5} {dtype:9} rank {rank} {rows[-1]['form']:20} conv {conv_us:7.1f} us  "
                          f"layer {us:7.1f} us  +{us - conv_us:6.1f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (one: no thread hand-off per op)")
    parser.add_argument("--result-name", default="call_overhead", help="results/<name>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for device in args.devices for row in rows_for(device, args.calls)]
    print(f"wrote {write(args.result_name, rows, calls=args.calls)}")


if __name__ == "__main__":
    main()
