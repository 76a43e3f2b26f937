"""torch.fx tracing with timm's leaf modules and autowrapped functions, and every Conv2d kept as a leaf."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
from timm.layers import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import LeafModuleAwareTracer

from ..layers.separable import DepthwiseSeparableConv2d
from ..modes import attributes_kept

__all__ = ["create_tracer", "trace"]


def create_tracer() -> fx.Tracer:
    """timm's FX tracer set-up (as ``timm.layers.create_feature_extractor`` uses), plus conv leaves.

    Conv2d subclasses (StdConv2d...) must stay leaves: traced through, they would appear as
    ``get_attr`` + ``F.conv2d`` instead of the module call the pass matches.
    """
    leaves = [*get_notrace_modules(), nn.Conv2d, DepthwiseSeparableConv2d]
    return LeafModuleAwareTracer(leaf_modules=leaves, autowrap_functions=tuple(get_notrace_functions()))


def trace(model: nn.Module) -> fx.GraphModule:
    """The model's FX graph; the model keeps its attributes (a forward that caches on itself keeps no proxy)."""
    tracer = create_tracer()
    with attributes_kept(model):
        graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
