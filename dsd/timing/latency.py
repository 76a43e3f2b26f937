"""Measured latency, following timm's ``benchmark.py`` conventions, in the runtime the settings name.

Eval mode, ``torch.inference_mode``, ``cudnn.benchmark``, warm-up, then one timing per iteration: CUDA
events for PyTorch on a GPU, ``time.perf_counter`` otherwise (onnxruntime included). Models compared
are timed interleaved (A, B, A, B, ...) so that a slow spell of a shared machine hits all of them
alike, and a ratio carries a bootstrap interval. Half precision runs under AMP autocast, as timm's ``--amp``.
"""
from __future__ import annotations

import contextlib
import platform
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import cache
from .runtimes import prepare_step
from .settings import DTYPES, BenchmarkSettings
from .stats import LatencyStats

__all__ = ["measure", "measure_layer", "time_module", "model_latency", "layer_latency",
           "environment"]


@contextlib.contextmanager
def _measuring(settings: BenchmarkSettings) -> Iterator[None]:
    """Inference mode, autocast, cudnn.benchmark and the thread count for the whole measurement."""
    autocast = contextlib.nullcontext()
    if settings.dtype != "float32" and settings.runtime != "onnxruntime":
        # a captured CUDA graph must not hold autocast's cached weight casts
        autocast = torch.autocast(torch.device(settings.device).type, dtype=DTYPES[settings.dtype],
                                  cache_enabled=settings.runtime != "cudagraph")
    cudnn_benchmark, threads = torch.backends.cudnn.benchmark, torch.get_num_threads()
    torch.backends.cudnn.benchmark = True
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        with torch.inference_mode(), autocast:
            yield
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.set_num_threads(threads)


def _input(shape: Sequence[int], settings: BenchmarkSettings) -> torch.Tensor:
    x = torch.randn(*shape, device=settings.device)
    return x.contiguous(memory_format=torch.channels_last) if settings.channels_last and x.dim() == 4 else x


def measure(modules: Sequence[nn.Module], input_shape: Sequence[int], settings: BenchmarkSettings,
            progress: bool = False, desc: str = "timing") -> List[LatencyStats]:
    """Latency of each module on one random input of ``input_shape`` (batch included), timed interleaved."""
    events = settings.is_cuda and settings.runtime != "onnxruntime"
    with _measuring(settings):
        x = _input(input_shape, settings)
        steps = [prepare_step(module, x, settings) for module in modules]
        for _ in range(settings.warmup):
            for step in steps:
                step()
        samples: List[List[Any]] = [[] for _ in steps]
        if events:
            torch.cuda.synchronize(settings.device)
        for _ in tqdm(range(settings.iters), desc=desc, unit="iter", disable=not progress, leave=False):
            for step, taken in zip(steps, samples):
                if events:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    step()
                    end.record()
                    taken.append((start, end))
                else:
                    begin = time.perf_counter()
                    step()
                    taken.append((time.perf_counter() - begin) * 1e3)
        if events:
            torch.cuda.synchronize(settings.device)
            samples = [[start.elapsed_time(end) for start, end in taken] for taken in samples]
    return [LatencyStats.of(taken, input_shape[0]) for taken in samples]


def measure_layer(variants: Sequence[nn.Module], input_shape: Sequence[int], settings: BenchmarkSettings
                  ) -> List[LatencyStats]:
    """Latency of interchangeable layers on their real input shape (the batch replaced by the settings'),
    from the on-disk cache where a timing with the same geometry, settings, device and versions is kept;
    the rest are measured interleaved and stored."""
    shape = (settings.batch_size, *input_shape[1:])
    keys = [cache.layer_key(variant, shape, settings) for variant in variants]
    found = [cache.load(key) for key in keys]
    missing = [i for i, stats in enumerate(found) if stats is None]
    if missing:
        for i, stats in zip(missing, measure([variants[i] for i in missing], shape, settings)):
            cache.store(keys[i], stats)
            found[i] = stats
    return found


def time_module(module: nn.Module, input_shape: Sequence[int], settings: BenchmarkSettings) -> LatencyStats:
    """Latency of ``module`` on a random input of ``input_shape`` (batch dimension included)."""
    return measure([module], input_shape, settings)[0]


def model_latency(model: nn.Module, input_size: Sequence[int], settings: BenchmarkSettings) -> LatencyStats:
    return time_module(model, (settings.batch_size, *input_size), settings)


def layer_latency(layer: nn.Module, input_shape: Sequence[int], settings: BenchmarkSettings,
                  batch_size: Optional[int] = None) -> LatencyStats:
    """One layer timed in isolation with its real input shape (batch replaced by the settings' batch size)."""
    return time_module(layer, (batch_size or settings.batch_size, *input_shape[1:]), settings)


def environment(settings: BenchmarkSettings) -> Dict[str, Any]:
    """Where the figures came from: always printed and stored with them."""
    return {
        **settings.to_dict(),
        "device_name": cache.device_name(settings),
        "threads": settings.thread_count,
        "processor": platform.processor() or platform.machine(),
        **cache.versions(settings),
    }
