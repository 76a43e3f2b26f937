"""Savings report: fvcore parameters and FLOPs, measured latency, before vs after."""
from .compare import compare, conv_input_shapes, converted_layer_names
from ..flops import FLOP_CONVENTION, FlopCount, count_flops
from .savings_report import SCHEMA, SCHEMA_VERSION, LayerSavings, SavingsReport

__all__ = ["compare", "conv_input_shapes", "converted_layer_names", "FLOP_CONVENTION", "FlopCount", "count_flops",
           "SCHEMA", "SCHEMA_VERSION", "LayerSavings", "SavingsReport"]
