"""torch.fx tracing with timm's leaf modules and autowrapped functions, and every Conv2d kept as a leaf."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
from timm.layers import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import LeafModuleAwareTracer
from torchvision.ops import FrozenBatchNorm2d

from ..layers.separable import DepthwiseSeparableConv2d
from ..modes import attributes_kept

__all__ = ["create_tracer", "trace", "trace_graph", "GraphRunner"]


def create_tracer() -> fx.Tracer:
    """timm's FX tracer set-up (as ``timm.layers.create_feature_extractor`` uses), plus conv leaves.

    Conv2d subclasses (StdConv2d...) must stay leaves: traced through, they would appear as
    ``get_attr`` + ``F.conv2d`` instead of the module call the pass matches; so must torchvision's
    ``FrozenBatchNorm2d`` (pretrained detection backbones), for BatchNorm folding to find it.
    """
    leaves = [*get_notrace_modules(), nn.Conv2d, DepthwiseSeparableConv2d, FrozenBatchNorm2d]
    return LeafModuleAwareTracer(leaf_modules=leaves, autowrap_functions=tuple(get_notrace_functions()))


def trace_graph(model: nn.Module) -> fx.Graph:
    """The model's FX graph (its ``call_module`` targets are the model's own submodules); the model keeps its
    attributes (a forward that caches on itself keeps no proxy)."""
    with attributes_kept(model):
        return create_tracer().trace(model)


def trace(model: nn.Module) -> fx.GraphModule:
    """The model's FX graph as a ``GraphModule``."""
    return fx.GraphModule(model, trace_graph(model), type(model).__name__)


class GraphRunner(nn.Module):
    """A model's traced graph run by ``fx.Interpreter`` over the model: what its ``GraphModule`` computes, without
    generating and compiling that code (3 ms of resnet18's 11 ms trace). The model is its only child."""

    def __init__(self, model: nn.Module, graph: fx.Graph):
        super().__init__()
        self.model, self._graph = model, graph

    def forward(self, *args):
        return fx.Interpreter(self.model, graph=self._graph).run(*args)
