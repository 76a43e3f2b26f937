"""Latency in the runtime the user deploys on: settings, runtimes, interleaved measurement, a per-layer cache."""
from .latency import (chosen_forms, environment, layer_latency, measure, measure_layer, model_latency,
                      pin_onnxruntime_forms, time_module)
from .settings import DTYPES, RUNTIMES, BenchmarkSettings
from .stats import LatencyStats, Speedup

__all__ = ["BenchmarkSettings", "DTYPES", "RUNTIMES", "LatencyStats", "Speedup", "measure", "measure_layer",
           "time_module", "model_latency", "layer_latency", "pin_onnxruntime_forms", "chosen_forms",
           "environment"]
