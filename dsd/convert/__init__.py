"""The conversion pass over a whole model (torch.fx): options, trace and match, rank choice, rewrite, plans.

The layer mathematics it builds on lives in :mod:`dsd.layers`; its names are re-exported here, where
earlier releases had them.
"""
from ..layers import (FULL_RANK, TF_SAME, ConvAdapter, DepthwiseSeparableConv2d, LayerSpec, SkipLayer, decouple,
                      from_conv, full_rank, get_conv_adapter, get_initializer, layer_spec, list_initializers,
                      register_conv_adapter, register_initializer)
from .conversion_report import ConversionReport, LayerRecord
from .fold_bn import FoldPlan, apply_folding, find_foldable, fold_batchnorm
from .options import SKIP_PREDICATES, ConvertOptions
from .pipeline import PlanMismatch, apply_plan, convert_model
from .plan import ConversionPlan
from .trace import create_tracer, trace

__all__ = ["ConvertOptions", "fold_batchnorm", "find_foldable", "apply_folding", "FoldPlan", "convert_model", "apply_plan", "PlanMismatch", "ConversionPlan", "ConversionReport",
           "LayerRecord", "SKIP_PREDICATES", "create_tracer", "trace", "FULL_RANK", "TF_SAME", "ConvAdapter",
           "DepthwiseSeparableConv2d", "LayerSpec", "SkipLayer", "decouple", "from_conv", "full_rank",
           "get_conv_adapter", "get_initializer", "layer_spec", "list_initializers", "register_conv_adapter",
           "register_initializer"]
