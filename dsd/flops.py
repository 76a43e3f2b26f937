"""fvcore FLOP and parameter counts, per module and in total, without fvcore's warnings on the console.

fvcore counts one fused multiply-add as one FLOP, so its "FLOPs" are MACs; dsd keeps that convention.
"""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict

import torch
import torch.nn as nn

from .modes import eval_mode

__all__ = ["FlopCount", "count_flops", "FLOP_CONVENTION", "POOLING_OPS"]

FLOP_CONVENTION = "fvcore: one fused multiply-add counts as one FLOP (these FLOPs are MACs)"

# Pooling is as common as adaptive pooling in CNNs, which fvcore counts as one op per input element.
POOLING_OPS = ("aten::max_pool2d", "aten::avg_pool2d", "aten::mean")


def _baddbmm_flop_jit(inputs, outputs) -> int:
    """``baddbmm(input, batch1 (n, c, t), batch2 (n, t, d))``: n*c*t*d multiply-adds, as fvcore counts bmm."""
    from fvcore.nn.jit_handles import get_shape
    (n, c, t), d = get_shape(inputs[1]), get_shape(inputs[2])[-1]
    return n * c * t * d


def _gemm_handles() -> Dict[str, Any]:
    """The GEMMs fvcore has no handler for that rank-r separable layers accumulate their slices with."""
    from fvcore.nn.jit_handles import addmm_flop_jit
    return {"aten::addmm_": addmm_flop_jit, "aten::baddbmm": _baddbmm_flop_jit, "aten::baddbmm_": _baddbmm_flop_jit}


@dataclass
class FlopCount:
    total: int
    by_module: Dict[str, int]
    params: Dict[str, int]  # parameters per module ("" is the whole model)
    unsupported_ops: Counter = field(default_factory=Counter)  # ops fvcore has no handler for, not counted
    analysis: Any = field(default=None, repr=False)  # fvcore's FlopCountAnalysis, for its module table

    def table(self, max_depth: int = 3) -> str:
        """fvcore's per-module table (``flop_count_table``): FLOPs and parameters down to ``max_depth``."""
        from fvcore.nn import flop_count_table
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flop_count_table(self.analysis, max_depth=max_depth)


@torch.no_grad()
def count_flops(model: nn.Module, inputs: torch.Tensor) -> FlopCount:
    """Trace ``model`` on ``inputs`` with fvcore; element-wise ops it cannot count are collected, not printed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # importing fvcore.nn calls the deprecated torch.jit.script
        from fvcore.nn import FlopCountAnalysis, parameter_count
        from fvcore.nn.jit_handles import elementwise_flop_counter
    analysis = FlopCountAnalysis(model, inputs).set_op_handle(
        **{op: elementwise_flop_counter(1, 0) for op in POOLING_OPS}, **_gemm_handles())
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    fvcore_logger = logging.getLogger("fvcore")
    level = fvcore_logger.level
    fvcore_logger.setLevel(logging.ERROR)
    try:
        with eval_mode(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit tracer deprecation and tracer warnings
            by_module = dict(analysis.by_module())
            unsupported = Counter(analysis.unsupported_ops())
    finally:
        fvcore_logger.setLevel(level)
    return FlopCount(by_module.get("", 0), by_module, dict(parameter_count(model)), unsupported, analysis)
