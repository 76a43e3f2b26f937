"""Shared by the benchmark scripts: where results go, the context every result file records, and RESULTS.md.

Every script writes ``results/<name>.json`` through :func:`write`, which then regenerates ``RESULTS.md``
from all the result files: one section per file with its command, date, machine and torch version, and
the script's own Markdown (``markdown`` in the file) or else a table of its rows.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

# DSD_BENCHMARK_RESULTS redirects the output, RESULTS.md included (the smoke tests leave the committed ones alone).
_REDIRECT = os.environ.get("DSD_BENCHMARK_RESULTS")
RESULTS = Path(_REDIRECT) if _REDIRECT else Path(__file__).parent / "results"
RESULTS_MD = RESULTS / "RESULTS.md" if _REDIRECT else Path(__file__).parent / "RESULTS.md"

SECTIONS = {  # result file -> section title, in the order RESULTS.md shows them
    "zoo_coverage": "Zoo coverage: every timm and torchvision model",
    "recovery": "Accuracy vs cost on real digits",
    "latency": "Latency in every runtime on this CPU",
    "latency_epyc": "Latency in every runtime on a 2-core AMD EPYC (resnet18, vgg16)",
    "runtime_decisions": "Decided in onnxruntime: compare, only-if-faster and target latency, checked independently",
    "latency_gpu": "Latency on a GPU: CUDA-graph replay",
    "latency_gpu_fused": "Latency on a GPU: CUDA-graph replay, the fused kernel among the forms",
    "latency_gpu_eager": "Latency on a GPU: eager PyTorch",
    "latency_gpu_compile": "Latency on a GPU: torch.compile",
    "latency_gpu_compile_models": "Latency on a GPU: torch.compile with freezing and CUDA graphs, resnet50 and vgg16",
    "latency_compile_frozen": "torch.compile with and without Inductor's freezing on this CPU",
    "kernels": "Separable layers vs dense convs: rank-r layout, fused kernel, end to end",
    "kernels_gpu": "Separable layers vs dense convs on a GPU: fused kernel, rank-r forms",
    "fused_configs_gpu": "The fused kernel's block configurations on a GPU (microseconds, CUDA-graph replays)",
    "kernels_default_malloc": "Separable layers vs dense convs, glibc's default malloc settings",
    "kernels_epyc": "Separable layers vs dense convs on a 2-core AMD EPYC (resnet18 end to end)",
    "vs_pruning": "dsd vs Torch-Pruning channel pruning at the same conv FLOPs",
    "vs_pruning_epyc": "dsd vs Torch-Pruning at the same conv FLOPs on a 2-core AMD EPYC",
    "finetune_digits": "Fine-tune recovery on digits (15-epoch recipe)",
    "budgets_digits": "FLOP budgets on digits: svd vs data-aware initialisation",
    "real_weights": "Pretrained weights without fine-tuning: allocation and initialisation compared",
    "budgets_latency": "Latency budgets (only-if-faster, target latency) on this CPU",
    "conversion_time": "Conversion time, in forward passes",
    "call_overhead": "Host time per call: a separable layer vs the conv it replaced",
    "call_overhead_gpu": "Host time per call on a GPU: a separable layer vs the conv it replaced",
    "decouple_speed": "Decoupling speed: Gram eigendecomposition vs SVD",
    "onnx_forms": "ONNX export: each layer's form timed in ONNX Runtime vs the static rule",
}


def environment() -> Dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        # the C allocator decides whether every large intermediate page-faults on a CPU (see README)
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
        # dsd's switches (DSD_FUSED_KERNEL, DSD_AUTOTUNE_FORMS, ...) change what the timed layers run
        "dsd_env": {k: v for k, v in os.environ.items() if k.startswith("DSD_") and k != "DSD_BENCHMARK_RESULTS"},
    }


def write(name: str, rows: Any, env: Optional[Dict[str, Any]] = None, **extra: Any) -> Path:
    """Write ``results/<name>.json`` (``markdown=`` gives the section's text for RESULTS.md) and RESULTS.md.
    ``env``: the environment of the run that produced the rows, where this call only re-measures part."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": env or environment(), **extra, "rows": rows}, indent=2) + "\n")
    RESULTS_MD.write_text(render_results())
    return path


def render_results() -> str:
    files = {p.stem: p for p in RESULTS.glob("*.json")}
    names = [n for n in SECTIONS if n in files] + sorted(set(files) - set(SECTIONS))
    lines = ["# Benchmark results", "",
             "Generated from `benchmarks/results/*.json` by the scripts in `benchmarks/` (each one rewrites this "
             "file); do not edit by hand. Every figure comes with the command, date, machine and torch version "
             "that produced it. CPU timings are ratios measured side by side in one run; absolute times are only "
             "meaningful on a GPU.", ""]
    for name in names:
        data = json.loads(files[name].read_text())
        env = data.get("environment", {})
        lines += [f"## {SECTIONS.get(name, name)}", "",
                  f"`{env.get('command', '?')}` · {env.get('date', '?')} · {env.get('processor', '?')}, "
                  f"{env.get('cpu_threads', '?')} CPU threads" + (f", {env['cuda']}" if env.get("cuda") else "")
                  + f" · torch {env.get('torch', '?')} · results/{name}.json"
                  + (f" · environment {env['allocator_env']}" if env.get("allocator_env") else "")
                  + (f" · dsd switches {env['dsd_env']}" if env.get("dsd_env") else ""), ""]
        lines.append(data["markdown"] if "markdown" in data else _table(data.get("rows", [])))
    return "\n".join(lines).rstrip() + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict) and {"mean", "std"} <= set(value):
        return f"{value['mean']:.4g} ± {value['std']:.2g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"))
        return text if len(text) <= 60 else text[:57] + "..."
    return "" if value is None else str(value)


def _table(rows: List[Dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)).replace("|", "/") for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` calls (for ratios measured side by side in one run)."""
    return interleaved_median_seconds({"": fn}, repeats)[""]


def interleaved_median_seconds(fns: Dict[str, Callable[[], Any]], rounds: int) -> Dict[str, float]:
    """Median wall time of each function over ``rounds`` rounds in which they take turns (A, B, A, B, ...), so a
    change of this machine's load moves all of them alike and their ratios stay fair."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
