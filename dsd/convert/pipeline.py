"""``convert_model`` (analyse, select, build, swap, verify) and ``apply_plan`` (rebuild from a plan)."""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import DsdError
from ..modes import eval_mode, record_shapes
from .factory import Rank, SkipLayer, build_layer
from .match import ModelAnalysis, analyze, as_args
from .plan import ConversionPlan
from .report import ConversionReport, LayerRecord
from .rewrite import swap_modules
from .rules import ConversionOptions, NamePattern, SkipPredicate, select

__all__ = ["convert_model", "apply_plan", "PlanMismatch"]


class PlanMismatch(DsdError):
    """A conversion plan names layers the model does not have, or has with another geometry."""


def convert_model(
        model: nn.Module,
        example_inputs: Any = None,
        *,
        rank: Rank = 1,
        dilation: Optional[int] = None,
        keep_receptive_field: Union[bool, int] = False,
        init: str = "svd",
        include: Sequence[NamePattern] = (),
        exclude: Sequence[NamePattern] = (),
        min_channels: int = 0,
        skip: Sequence[Union[str, SkipPredicate]] = (),
        only_if_cheaper: bool = True,
        inplace: bool = False,
        progress: bool = False,
) -> Tuple[nn.Module, ConversionReport]:
    """Replace the model's dense ``nn.Conv2d`` layers by depthwise-separable ones, initialised from its weights.

    ``example_inputs`` (a tensor or a tuple of forward arguments) gives each conv's shapes, finds the
    convs that never run, and checks afterwards that every converted layer keeps its output shape.
    The model is copied unless ``inplace=True``; it keeps its class. Returns ``(model, report)``;
    ``report.plan`` rebuilds the architecture with :func:`apply_plan`.
    """
    options = ConversionOptions(rank, dilation, keep_receptive_field, init, include, exclude, min_channels,
                                skip, only_if_cheaper)
    target = model if inplace else copy.deepcopy(model)
    analysis = analyze(target, example_inputs)
    records, specs, replacements = [], [], {}
    for site in tqdm(analysis.sites, desc="converting", unit="conv", disable=not progress):
        if site.calls == 0:
            records.append(LayerRecord.skipped(site, "not called", "not called on the example input"))
            continue
        try:
            spec = select(site.name, site.module, options)
        except SkipLayer as skip:
            records.append(LayerRecord.skipped(site, skip.category, skip.detail))
            continue
        replacements[site.name], spec = build_layer(site.module, spec)
        specs.append(spec)
        records.append(LayerRecord.converted(site, spec))
    swap_modules(target, replacements)
    plan = ConversionPlan(specs, options.to_dict())
    report = ConversionReport(records, plan, analysis.traced, analysis.trace_error, other_convs=analysis.other_convs)
    if analysis.ran:
        report.shapes_verified = _verify_shapes(target, example_inputs, analysis, replacements)
    return target, report


@torch.no_grad()
def _verify_shapes(model: nn.Module, example_inputs: Any, analysis: ModelAnalysis,
                   replacements: Dict[str, nn.Module]) -> bool:
    """Run the converted model; raise if any converted layer's output shapes differ from the original's."""
    expected = {site.name: [out for _, out in site.call_shapes] for site in analysis.sites if site.name in replacements}
    with eval_mode(model), record_shapes(replacements) as calls:
        model(*as_args(example_inputs))
    seen = {name: [out for _, out in shapes] for name, shapes in calls.items()}
    wrong = {name: (shapes, seen[name]) for name, shapes in expected.items() if seen[name] != shapes}
    if wrong:
        raise RuntimeError(f"dsd bug: converted layers changed output shape (expected, got): {wrong}")
    return True


def apply_plan(model: nn.Module, plan: ConversionPlan) -> nn.Module:
    """Swap in (uninitialised) separable layers as ``plan`` says, in place; then load the converted weights."""
    replacements = {}
    for spec in plan.layers:
        try:
            conv = model.get_submodule(spec.name)
        except AttributeError:
            raise PlanMismatch(f"the plan converts layer {spec.name!r}, which this model does not have") from None
        problem = spec.fits(conv)
        if problem:
            raise PlanMismatch(f"layer {spec.name!r} {problem}: the plan was made for another model")
        replacements[spec.name] = spec.build(device=conv.weight.device, dtype=conv.weight.dtype)
    return swap_modules(model, replacements)
