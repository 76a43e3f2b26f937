"""On-disk cache of per-layer timings, so that a second conversion of the same model measures nothing again.

A timing is kept under a key made of everything that decides it: the layer (its class and ``repr``: the
geometry, rank and bias), the input shape with the batch, the benchmark settings, the device's name and
the versions of torch, dsd and the runtime, a digest of dsd's own source (a development checkout keeps one
version number while the layers it times change), and whether dsd's fused kernel and its timed forms are
switched on. The folder is ``$DSD_LATENCY_CACHE`` (``off`` switches the cache off), else ``latency/`` in dsd's cache
folder (``$DSD_CACHE`` or ``~/.cache/dsd``). One JSON file per timing, written atomically: concurrent runs are
safe.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..fileio import atomic_write_text, dsd_cache_dir
from ..kernels.separable_op import fused_kernel_enabled
from ..layers.forms import forms_autotuned
from .settings import BenchmarkSettings
from .stats import LatencyStats

__all__ = ["cache_dir", "layer_key", "load", "store", "device_name", "versions", "source_digest"]


OFF = ("off", "0", "")


def cache_dir() -> Optional[Path]:
    """The folder of cached layer timings, or None when the cache is switched off."""
    chosen = os.environ.get("DSD_LATENCY_CACHE")
    if chosen is None:
        return dsd_cache_dir() / "latency"
    return None if chosen.strip().lower() in OFF else Path(chosen)


def device_name(settings: BenchmarkSettings) -> str:
    if settings.is_cuda:
        return torch.cuda.get_device_name(settings.device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)"


@functools.lru_cache(maxsize=None)  # read from the installed metadata once, not once per layer timing
def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def source_digest(package: Path) -> str:
    """A digest of every Python file under ``package`` (paths and contents): the same code, the same digest."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)  # 2 ms: once per process
def _dsd_source_digest() -> str:
    return source_digest(Path(__file__).resolve().parents[1])


def versions(settings: BenchmarkSettings) -> Dict[str, Any]:
    found = {"torch": torch.__version__, "dsd": _version("dsd"), "dsd_source": _dsd_source_digest()}
    if settings.runtime == "onnxruntime":
        found["onnxruntime"] = _version("onnxruntime") or _version("onnxruntime-gpu")
    return found


def layer_key(layer: nn.Module, input_shape: Sequence[int], settings: BenchmarkSettings) -> str:
    described = {"layer": f"{type(layer).__module__}.{type(layer).__qualname__}: {layer!r}",
                 "input_shape": list(input_shape), "settings": settings.to_dict(),
                 "device_name": device_name(settings), "threads": settings.thread_count,
                 "versions": versions(settings), "fused_kernel": fused_kernel_enabled(),
                 "forms_autotuned": forms_autotuned()}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def load(key: str) -> Optional[LatencyStats]:
    folder = cache_dir()
    if folder is None:
        return None
    try:
        return LatencyStats(**json.loads((folder / f"{key}.json").read_text()))
    except (OSError, ValueError, TypeError):  # absent, or unreadable: measure again
        return None


def store(key: str, stats: LatencyStats) -> None:
    folder = cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / f"{key}.json", json.dumps(stats.to_dict()))
    except OSError:
        pass  # a read-only or full cache folder costs a re-measurement, never the conversion
