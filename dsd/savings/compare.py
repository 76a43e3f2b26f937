"""``compare(original, converted)``: count and measure both models, line their layers up by name."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import DsdError
from ..layers.separable import DepthwiseSeparableConv2d
from ..modes import check_runs, eval_mode, record_shapes
from ..timing import BenchmarkSettings, LatencyStats, environment, measure, measure_layer
from ..flops import count_flops
from .savings_report import LayerSavings, SavingsReport

__all__ = ["compare", "converted_layer_names", "conv_input_shapes"]


def converted_layer_names(converted: nn.Module) -> list:
    return [name for name, m in converted.named_modules() if isinstance(m, DepthwiseSeparableConv2d)]


@torch.no_grad()
def conv_input_shapes(model: nn.Module, names: Sequence[str], example: torch.Tensor
                      ) -> Dict[str, List[Tuple[int, ...]]]:
    """The input shape of each call of each named layer on ``example`` (a detector's head runs once per level)."""
    with eval_mode(model), record_shapes({name: model.get_submodule(name) for name in names}) as calls:
        model(example)
    return {name: [inp for inp, _ in shapes] for name, shapes in calls.items()}


def compare(
        original: nn.Module,
        converted: nn.Module,
        input_size: Sequence[int] = (3, 224, 224),
        benchmark: Optional[BenchmarkSettings] = None,
        *,
        latency: bool = True,
        per_layer: bool = True,
        progress: bool = False,
        **settings: Any,
) -> SavingsReport:
    """Parameters and FLOPs (fvcore, per image) and, with ``latency``, measured latency before vs after.

    ``benchmark`` says how latency is measured (runtime, device, dtype, batch, memory format, threads);
    its fields may also be given as keywords (``device="cuda"``, ``runtime="onnxruntime"``), which override
    it. The two models are timed interleaved and the speedup carries a bootstrap interval. Per-layer rows
    are the converted layers, lined up by name with the original's layer; with ``per_layer`` each pair is
    also timed in isolation on the input shape of each of its calls (summed), in the same runtime (cached on
    disk).
    """
    if isinstance(benchmark, str):  # compare(a, b, size, "cuda", ...): the positional device of earlier releases
        settings["device"] = benchmark
        benchmark = None
    settings = (benchmark or BenchmarkSettings()).updated(**settings)
    weight = next((p for p in original.parameters() if p.is_floating_point()), None)
    dtype, device = (weight.dtype, weight.device) if weight is not None else (torch.float32, torch.device("cpu"))
    if latency and dtype != torch.float32 and settings.dtype == "float32" and settings.runtime != "onnxruntime":
        raise DsdError(f"the original model's weights are {str(dtype).replace('torch.', '')}: time it in that dtype "
                       f"(BenchmarkSettings(dtype=...), --dtype), or compare a float32 copy")
    example = torch.randn(1, *input_size, dtype=dtype, device=device)  # counted and checked as the model computes
    check_runs(original, example, "the original model")
    check_runs(converted, example, "the converted model")  # e.g. the conversion of another architecture
    names = converted_layer_names(converted)
    before, after = count_flops(original, example), count_flops(converted, example)
    layers = [LayerSavings(name, before.params.get(name, 0), after.params.get(name, 0),
                           before.by_module.get(name, 0), after.by_module.get(name, 0)) for name in names]
    total = LayerSavings("total", before.params.get("", 0), after.params.get("", 0), before.total, after.total)
    env: Optional[dict] = None
    if latency:
        env = environment(settings)
        total.timed(*measure([original, converted], (settings.batch_size, *input_size), settings, progress,
                             desc="timing both models"))
        if per_layer:
            shapes = conv_input_shapes(original, names, example)
            for layer in tqdm(layers, desc="timing layers", unit="conv", disable=not progress):
                if layer.name in shapes:  # every call, as the FLOPs count them
                    pair = [original.get_submodule(layer.name), converted.get_submodule(layer.name)]
                    calls = [measure_layer(pair, shape, settings) for shape in shapes[layer.name]]
                    layer.timed(*(LatencyStats.summed(stats, settings.batch_size) for stats in zip(*calls)))
    unsupported = dict(before.unsupported_ops + after.unsupported_ops)
    return SavingsReport(total, layers, list(input_size), env, unsupported)
