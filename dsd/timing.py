"""Measured latency of a model or a single layer, following timm's ``benchmark.py`` conventions.

GPU: eval mode, ``torch.inference_mode``, ``cudnn.benchmark``, warm-up, then CUDA events around each
iteration. CPU: ``time.perf_counter`` around each iteration, with the thread count recorded. Both report
the median and the 10th/90th percentiles. Half precision runs under AMP autocast, as timm's ``--amp``.
"""
from __future__ import annotations

import contextlib
import copy
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from .errors import DsdError

__all__ = ["BenchmarkSettings", "LatencyStats", "time_module", "model_latency", "layer_latency", "environment"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _help(text: str) -> Dict[str, Any]:
    return {"help": text}


@dataclass(frozen=True)
class BenchmarkSettings:
    """How every latency in dsd is measured: the savings report, ``only_if_faster``, ``target_latency``,
    and the benchmarks. The CLI's measurement flags are derived from these fields."""
    device: str = field(default="cpu", metadata=_help("device to time on: cpu, cuda, cuda:1"))
    dtype: str = field(default="float32", metadata={
        **_help("precision; float16/bfloat16 run under AMP autocast"), "cli": {"choices": tuple(DTYPES)}})
    batch_size: int = field(default=1, metadata=_help("batch size of the timed inputs"))
    channels_last: bool = field(default=False, metadata=_help("time in the channels_last memory format"))
    compile: bool = field(default=False, metadata=_help("time torch.compile'd models"))
    warmup: int = field(default=10, metadata=_help("untimed iterations first"))  # timm benchmark.py: 10 and 40
    iters: int = field(default=40, metadata=_help("timed iterations"))

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise DsdError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise DsdError(f"device {self.device!r} is not a torch device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DsdError(f"device {self.device!r} asked for, but this machine has no CUDA GPU; use --device cpu")
        for name in ("batch_size", "iters", "warmup"):
            value, least = getattr(self, name), 0 if name == "warmup" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DsdError(f"{name} must be an integer >= {least}, got {value!r}")
        for name in ("channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise DsdError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def is_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "BenchmarkSettings":
        if not isinstance(data, dict):
            raise DsdError(f"benchmark settings must be a mapping, got {data!r}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise DsdError(f"unknown benchmark setting {unknown[0]!r}; valid: {', '.join(f.name for f in fields(cls))}")
        return cls(**data)


@dataclass
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    images_per_s: float
    iters: int

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def environment(settings: BenchmarkSettings) -> Dict[str, Any]:
    """Where the figures came from: always printed and stored with them."""
    return {
        "device": settings.device,
        "device_name": torch.cuda.get_device_name(settings.device) if settings.is_cuda else platform.processor()
        or platform.machine(),
        "dtype": settings.dtype, "batch_size": settings.batch_size, "channels_last": settings.channels_last,
        "compile": settings.compile, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "warmup": settings.warmup, "iters": settings.iters,
    }


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _timings_ms(step: Callable[[], Any], settings: BenchmarkSettings) -> list:
    for _ in range(settings.warmup):
        step()
    if settings.is_cuda:
        torch.cuda.synchronize(settings.device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(settings.iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(settings.device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(settings.iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _prepare(module: nn.Module, settings: BenchmarkSettings) -> nn.Module:
    """A copy on the target device and memory format: the caller's module is never moved or changed."""
    module = copy.deepcopy(module).eval().to(settings.device)
    if settings.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return torch.compile(module) if settings.compile else module


def time_module(module: nn.Module, input_shape: Sequence[int], settings: BenchmarkSettings) -> LatencyStats:
    """Latency of ``module`` on a random input of ``input_shape`` (batch dimension included)."""
    module = _prepare(module, settings)
    x = torch.randn(*input_shape, device=settings.device)
    if settings.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = (torch.autocast(torch.device(settings.device).type, dtype=DTYPES[settings.dtype])
                if settings.dtype != "float32" else contextlib.nullcontext())
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with torch.inference_mode(), autocast:
            times = _timings_ms(lambda: module(x), settings)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    median = statistics.median(times)
    return LatencyStats(median, _percentile(times, 0.1), _percentile(times, 0.9),
                        input_shape[0] * 1e3 / median, len(times))


def model_latency(model: nn.Module, input_size: Sequence[int], settings: BenchmarkSettings) -> LatencyStats:
    return time_module(model, (settings.batch_size, *input_size), settings)


def layer_latency(layer: nn.Module, input_shape: Sequence[int], settings: BenchmarkSettings,
                  batch_size: Optional[int] = None) -> LatencyStats:
    """One layer timed in isolation with its real input shape (batch replaced by the settings' batch size)."""
    return time_module(layer, (batch_size or settings.batch_size, *input_shape[1:]), settings)
