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

from ..layers.forms import candidate_forms, forms_timed_as_cuda_graphs, static_form
from ..layers.separable import DepthwiseSeparableConv2d
from ..modes import call_shapes, eval_mode, full_precision
from ..module_tree import deepcopy_module
from . import cache
from .runtimes import on_device, prepare_step
from .settings import DTYPES, BenchmarkSettings
from .stats import LatencyStats

__all__ = ["measure", "measure_layer", "time_module", "model_latency", "layer_latency",
           "pin_onnxruntime_forms", "chosen_forms", "environment"]


@contextlib.contextmanager
def _measuring(settings: BenchmarkSettings) -> Iterator[None]:
    """Inference mode, autocast, cudnn.benchmark and the thread count for the whole measurement; CUDA graphs
    have their layers' forms timed as replays."""
    autocast = full_precision()  # float32 means float32 under a caller's autocast too
    if settings.dtype != "float32" and settings.runtime != "onnxruntime":
        # a captured CUDA graph must not hold autocast's cached weight casts
        autocast = torch.autocast(torch.device(settings.device).type, dtype=DTYPES[settings.dtype],
                                  cache_enabled=settings.runtime != "cudagraph")
    cudnn_benchmark, threads = torch.backends.cudnn.benchmark, torch.get_num_threads()
    torch.backends.cudnn.benchmark = True
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        replayed = forms_timed_as_cuda_graphs() if settings.runtime == "cudagraph" else contextlib.nullcontext()
        with torch.inference_mode(), autocast, replayed:
            yield
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.set_num_threads(threads)


def _input(shape: Sequence[int], settings: BenchmarkSettings) -> torch.Tensor:
    """A random input in the settings' memory format and, under autocast, its dtype: a layer inside a model
    gets its input from a layer before it, already in half precision, and casting a float32 input would be
    timed as part of the layer (at 64 channels 56x56, batch 64, on an H100 nearly what its depthwise conv takes).
    ONNX Runtime's files take float32."""
    dtype = DTYPES[settings.dtype] if settings.runtime != "onnxruntime" else torch.float32
    x = torch.randn(*shape, device=settings.device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if settings.channels_last and x.dim() == 4 else x


def measure(modules: Sequence[nn.Module], input_shape: Sequence[int], settings: BenchmarkSettings,
            progress: bool = False, desc: str = "timing") -> List[LatencyStats]:
    """Latency of each module on one random input of ``input_shape`` (batch included), timed interleaved.

    In ONNX Runtime each module is timed as :func:`dsd.export_onnx` writes it: a copy whose separable layers
    of rank >= 2 are pinned to their fastest form there (:func:`pin_onnxruntime_forms`). Under torch.compile
    each measurement starts from empty compile caches (``torch.compiler.reset()``), as a deployed model
    compiles alone: a model compiled elsewhere in the process compiles again on its next call."""
    if settings.runtime == "onnxruntime":
        modules = [_with_onnxruntime_forms(module, input_shape, settings) for module in modules]
    events = settings.is_cuda and settings.runtime != "onnxruntime"
    if settings.runtime == "compile":
        # Dynamo keeps compiled code per code object for the whole process and past its recompile limit (8)
        # runs a frame eagerly, silently: the models of earlier measurements would have the ninth timed uncompiled
        torch.compiler.reset()
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
    the rest are measured interleaved and stored. In ONNX Runtime a separable layer of rank >= 2 not pinned
    to a form counts as its fastest form there (each form timed, as the export would choose)."""
    shape = (settings.batch_size, *input_shape[1:])
    timed = [_as_exported(variant, settings) for variant in variants]
    flat = [form for forms in timed for form in forms]
    keys = [cache.layer_key(variant, shape, settings) for variant in flat]
    found = [cache.load(key) for key in keys]
    missing = [i for i, stats in enumerate(found) if stats is None]
    if missing:
        for i, stats in zip(missing, measure([flat[i] for i in missing], shape, settings)):
            cache.store(keys[i], stats)
            found[i] = stats
    results, start = [], 0
    for forms in timed:
        results.append(min(found[start:start + len(forms)], key=lambda stats: stats.median_ms))
        start += len(forms)
    return results


def _as_exported(layer: nn.Module, settings: BenchmarkSettings) -> List[nn.Module]:
    """What to time for ``layer``: itself, or in onnxruntime each form an unpinned rank-r layer may be exported in
    (a module holding such layers is pinned as a whole by :func:`measure`)."""
    return _form_variants(layer) if settings.runtime == "onnxruntime" and _unpinned(layer) else [layer]


def _unpinned(module: nn.Module) -> bool:
    """A separable layer of rank >= 2 whose form is not pinned (rank 1 runs as written: a depthwise conv on ONNX
    Runtime's depthwise kernels and a pointwise conv)."""
    return isinstance(module, DepthwiseSeparableConv2d) and module.rank > 1 and module.pinned_form is None


def _unpinned_layers(model: nn.Module) -> Dict[str, DepthwiseSeparableConv2d]:
    return {name: m for name, m in model.named_modules() if _unpinned(m)}


def _form_variants(layer: DepthwiseSeparableConv2d) -> List[DepthwiseSeparableConv2d]:
    return [deepcopy_module(layer).pin_form(form) for form in candidate_forms(layer)]


def pin_onnxruntime_forms(model: nn.Module, input_shape: Sequence[int], settings: BenchmarkSettings,
                          progress: bool = False) -> Dict[str, str]:
    """Pin each separable layer of rank >= 2 to the form (:mod:`dsd.layers.forms`) that runs fastest in ONNX
    Runtime: each candidate form of the layer exported and timed alone on the input shape the layer gets from an
    input of ``input_shape`` (the settings' batch), interleaved, through the layer-timing cache. An export
    traces one form per layer: without this, the static rule's (r rank-1 slices, which ONNX Runtime runs slower
    than the dense conv where channels are few: the digits CNN at rank 4 ran 0.62-0.66x of its original,
    ``benchmarks/onnx_forms.py``). Returns name -> form."""
    layers = _unpinned_layers(model)
    if not layers:
        return {}
    device = next(iter(layers.values())).weight.device
    with eval_mode(model):
        shapes = call_shapes(model, (torch.randn(*input_shape, device=device),), layers)
    chosen = {}
    for name, layer in tqdm(layers.items(), desc="timing forms in onnxruntime", unit="layer", disable=not progress,
                            leave=False):
        if name not in shapes:  # never called on this input: nothing to time
            continue
        variants = _form_variants(layer)
        stats = measure_layer(variants, shapes[name][0][0], settings)
        fastest, _ = min(zip(variants, stats), key=lambda pair: pair[1].median_ms)
        chosen[name] = fastest.pinned_form
        layer.pin_form(chosen[name])
    return chosen


def _with_onnxruntime_forms(module: nn.Module, input_shape: Sequence[int], settings: BenchmarkSettings
                            ) -> nn.Module:
    if not _unpinned_layers(module):
        return module
    module = deepcopy_module(module)
    pin_onnxruntime_forms(module, input_shape, settings)
    return module


def chosen_forms(model: nn.Module, input_shape: Sequence[int], settings: BenchmarkSettings) -> Dict[str, str]:
    """The form (:mod:`dsd.layers.forms`) each separable layer of ``model`` computes in when it runs as
    ``settings`` say, name -> form: in eager PyTorch and CUDA graphs the fastest measured on a copy run once on
    a random input of ``input_shape``; in ONNX Runtime the pinned forms of the export; under torch.compile the
    static rule."""
    if not any(isinstance(m, DepthwiseSeparableConv2d) for m in model.modules()):
        return {}  # nothing to copy and run
    if settings.runtime == "onnxruntime":
        model = _with_onnxruntime_forms(model, input_shape, settings)
    elif settings.runtime != "compile":
        model = on_device(model, settings)
        with _measuring(settings):
            model(_input(input_shape, settings))
    return {name: layer.pinned_form or next(iter(layer.tuned_forms().values()), None)
            or static_form(layer, settings.device)
            for name, layer in model.named_modules() if isinstance(layer, DepthwiseSeparableConv2d)}


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
