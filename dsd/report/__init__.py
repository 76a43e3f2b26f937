"""Savings report: fvcore parameters and FLOPs, measured latency, before vs after."""
from .compare import compare, conv_input_shapes, converted_layer_names
from .flops import FLOP_CONVENTION, FlopCount, count_flops
from ..timing import BenchmarkSettings, LatencyStats, environment, layer_latency, model_latency, time_module
from .savings import SCHEMA, SCHEMA_VERSION, LayerSavings, SavingsReport
