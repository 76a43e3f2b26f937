"""Find the convs of a model, where they run and with which shapes: the matching half of the pass.

The FX graph says which convs the forward calls; running it on the example input (on meta tensors where
it can: shapes without arithmetic) proves the graph works and, through forward hooks, gives every conv's
shapes and call count. Convs the graph cannot see
(inside timm leaf modules, or in models that do not trace) are found by walking ``named_modules()``.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import short_error
from ..layers.separable import DepthwiseSeparableConv2d
from ..modes import CallShapes, as_args, call_shapes, eval_mode, example_inputs_error
from .trace import GraphRunner, trace_graph

__all__ = ["ConvSite", "ModelAnalysis", "analyze", "FOUND_BY_GRAPH", "FOUND_BY_MODULES"]

FOUND_BY_GRAPH = "graph"
FOUND_BY_MODULES = "module-tree"
Shape = Tuple[int, ...]


@dataclass
class ConvSite:
    name: str
    module: nn.Conv2d
    aliases: List[str]  # every name the module is registered under (first is ``name``)
    found_by: str = FOUND_BY_MODULES
    calls: Optional[int] = None  # None: not known (no example input)
    call_shapes: List[Tuple[Shape, Shape]] = field(default_factory=list)  # (input, output) per call
    separable_part: bool = False  # the depthwise or pointwise conv of a converted (dsd) layer

    @property
    def input_shape(self) -> Optional[Shape]:
        return self.call_shapes[0][0] if self.call_shapes else None

    @property
    def output_shape(self) -> Optional[Shape]:
        return self.call_shapes[0][1] if self.call_shapes else None


@dataclass
class ModelAnalysis:
    sites: List[ConvSite]
    traced: bool
    trace_error: Optional[str] = None
    ran: bool = False  # the example input went through the model
    other_convs: List[Tuple[str, str]] = field(default_factory=list)  # conv-like modules that are not Conv2d


def _module_sites(model: nn.Module) -> Tuple[List[ConvSite], List[Tuple[str, str]]]:
    names: Dict[int, List[str]] = defaultdict(list)
    modules: Dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names[id(module)].append(name)
        modules[id(module)] = module
    parts = {id(part) for module in modules.values() if isinstance(module, DepthwiseSeparableConv2d)
             for part in (module.depthwise, module.pointwise)}
    sites, others = [], []
    for key, module in modules.items():
        if isinstance(module, nn.Conv2d):
            sites.append(ConvSite(names[key][0], module, names[key], separable_part=key in parts))
        elif isinstance(module, nn.modules.conv._ConvNd) or type(module).__name__.endswith("Conv2d"):
            others.append((names[key][0], type(module).__name__))
    return sites, others


@torch.no_grad()
def analyze(model: nn.Module, example_inputs: Any = None) -> ModelAnalysis:
    """Every Conv2d of ``model`` with how it was found, call count and shapes (given an example input).

    The traced graph is run on the example input (a graph that does not run counts as a failed
    trace); forward hooks on the convs record their shapes and calls, inside leaf modules too.
    """
    sites, others = _module_sites(model)
    by_id = {id(site.module): site for site in sites}
    analysis = ModelAnalysis(sites, traced=False, other_convs=others)
    modules = {site.name: site.module for site in sites}
    with eval_mode(model):
        try:
            graph = trace_graph(model)
            if example_inputs is not None:
                _set_calls(sites, call_shapes(GraphRunner(model, graph), as_args(example_inputs), modules))
                analysis.ran = True
            analysis.traced = True
        except Exception as error:  # any tracing or graph-execution failure means: use the module tree
            analysis.trace_error = short_error(error)
        if analysis.traced:
            called = [node.target for node in graph.nodes if node.op == "call_module"]
            for target in called:
                site = by_id.get(id(model.get_submodule(target)))
                if site is not None:
                    site.found_by = FOUND_BY_GRAPH
                    if not analysis.ran:
                        site.calls = (site.calls or 0) + 1
            if not analysis.ran:  # a conv neither in the graph nor inside a leaf module never runs
                leaves = tuple(target + "." for target in called)
                for site in sites:
                    if site.calls is None and not any(a.startswith(leaves) for a in site.aliases):
                        site.calls = 0
        elif example_inputs is not None:
            try:
                _set_calls(sites, call_shapes(model, as_args(example_inputs), modules))
            except Exception as error:
                raise example_inputs_error(example_inputs, error) from error
            analysis.ran = True
    return analysis


def _set_calls(sites: List[ConvSite], calls: CallShapes) -> None:
    """Shapes and call counts from the hooks; sites re-ordered by execution (never-called ones last)."""
    for site in sites:
        site.call_shapes = calls.get(site.name, [])
        site.calls = len(site.call_shapes)
    order = {name: i for i, name in enumerate(calls)}
    sites.sort(key=lambda site: order.get(site.name, len(order)))
