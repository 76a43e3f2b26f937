"""``convert_model`` (analyse, select, build, swap, verify) and ``apply_plan`` (rebuild from a plan)."""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..batchnorm import recalibrate_batchnorm
from ..errors import DsdError
from ..modes import eval_mode, record_shapes
from .budget import DENSE
from .calibrate import whitening as whiten
from .calibration_run import data_aware_layers, patch_statistics, take_batches
from .choose import Candidate, candidate_errors, choose_ranks, is_faster
from .factory import Rank, SkipLayer, build_layer
from .match import ConvSite, ModelAnalysis, analyze, as_args
from .plan import ConversionPlan, LayerSpec
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
        energy: Optional[float] = None,
        target_flops: Optional[float] = None,
        target_params: Optional[float] = None,
        target_latency: Optional[float] = None,
        device: str = "cpu",
        only_if_faster: bool = False,
        calibration_data: Optional[Iterable] = None,
        calibration_batches: int = 8,
        sequential: bool = False,
        recalibrate_bn: bool = False,
        inplace: bool = False,
        progress: bool = False,
) -> Tuple[nn.Module, ConversionReport]:
    """Replace the model's dense ``nn.Conv2d`` layers by depthwise-separable ones, initialised from its weights.

    ``example_inputs`` (a tensor or a tuple of forward arguments) gives each conv's shapes, finds the
    convs that never run, and checks afterwards that every converted layer keeps its output shape.
    The model is copied unless ``inplace=True``; it keeps its class. Returns ``(model, report)``;
    ``report.plan`` rebuilds the architecture with :func:`apply_plan`.

    Rank per layer: ``rank`` for all, or ``energy`` (smallest rank keeping that share of each layer's
    energy), or the least total error under ``target_flops`` / ``target_params`` / ``target_latency``
    (a share of the original's total; latency measured on ``device``). ``only_if_faster`` keeps layers
    dense that measure slower separable on ``device``. ``init="data"`` decouples on
    ``calibration_data`` (an iterable of input batches; ``sequential`` feeds each layer the converted
    upstream outputs); ``recalibrate_bn`` re-estimates BatchNorm statistics on it afterwards.
    """
    budget = {k: v for k, v in dict(energy=energy, target_flops=target_flops, target_params=target_params,
                                      target_latency=target_latency).items() if v is not None}
    _check_budget_args(budget, example_inputs, init, calibration_data, recalibrate_bn, rank)
    options = ConversionOptions(1 if budget else rank, dilation, keep_receptive_field, init, include, exclude,
                                min_channels, skip, only_if_cheaper)
    reference = model
    if inplace and init == "data" and sequential:
        reference = copy.deepcopy(model)  # the original activations are the refit targets
    target = model if inplace else copy.deepcopy(model)
    analysis = analyze(target, example_inputs)
    batches = take_batches(calibration_data, calibration_batches) if calibration_data is not None else None

    records: Dict[str, LayerRecord] = {}
    eligible: List[Tuple[ConvSite, LayerSpec]] = []
    for site in analysis.sites:
        if site.calls == 0:
            records[site.name] = LayerRecord.skipped(site, "not called", "not called on the example input")
            continue
        try:
            eligible.append((site, select(site.name, site.module, options)))
        except SkipLayer as skip_layer:
            records[site.name] = LayerRecord.skipped(site, skip_layer.category, skip_layer.detail)

    outcome, stats = None, None
    if budget:
        whitening = {}
        if init == "data":
            stats = patch_statistics(target, [spec for _, spec in eligible], batches)
            whitening = {name: whiten(s.second_moment()) for name, s in stats.items()}
        candidates = [Candidate(site, spec, candidate_errors(site, spec, whitening.get(spec.name)))
                      for site, spec in eligible]
        (name, value), = budget.items()
        kind = name.removeprefix("target_")
        ranks, outcome = choose_ranks(candidates, analysis.sites, energy=energy, kind=kind, target=value,
                                      model=target, device=device)
        chosen = []
        for site, spec in eligible:
            if ranks[spec.name] == DENSE:
                records[site.name] = LayerRecord.skipped(site, "budget", f"kept dense by the {kind} budget")
            else:
                chosen.append((site, replace(spec, rank=ranks[spec.name])))
        eligible = chosen
    timings: Dict[str, Tuple[float, float]] = {}
    if only_if_faster:
        kept = []
        for site, spec in eligible:
            faster, dense_ms, separable_ms = is_faster(site, spec, device)
            timings[spec.name] = (dense_ms, separable_ms)
            if faster:
                kept.append((site, spec))
            else:
                records[site.name] = LayerRecord.skipped(
                    site, "not faster", f"{separable_ms:.3f} ms separable vs {dense_ms:.3f} ms dense on {device}")
        eligible = kept

    replacements: Dict[str, nn.Module] = {}
    specs: List[LayerSpec] = []
    output_errors: Dict[str, float] = {}
    if init == "data":
        built = data_aware_layers(reference, target, {site.name: site.module for site, _ in eligible},
                                  [spec for _, spec in eligible], batches, sequential, stats)
        for _, spec in eligible:
            layer, weight_error, output_errors[spec.name] = built[spec.name]
            replacements[spec.name] = layer
            specs.append(spec.with_error(weight_error))
    else:
        for site, spec in tqdm(eligible, desc="converting", unit="conv", disable=not progress):
            replacements[site.name], spec = build_layer(site.module, spec)
            specs.append(spec)
    for (site, _), spec in zip(eligible, specs):
        record = LayerRecord.converted(site, spec)
        record.output_error = output_errors.get(spec.name)
        record.latency_before_ms, record.latency_after_ms = timings.get(spec.name, (None, None))
        records[site.name] = record
    swap_modules(target, replacements)
    if recalibrate_bn:
        recalibrate_batchnorm(target, batches, len(batches), next(target.parameters()).device)

    plan = ConversionPlan(specs, {**options.to_dict(), "rank": rank, **budget, "only_if_faster": only_if_faster,
                                  "sequential": sequential, "recalibrate_bn": recalibrate_bn})
    report = ConversionReport([records[site.name] for site in analysis.sites], plan, analysis.traced,
                              analysis.trace_error, other_convs=analysis.other_convs, budget=outcome)
    if analysis.ran:
        report.shapes_verified = _verify_shapes(target, example_inputs, analysis, replacements)
    return target, report


def _check_budget_args(budget: Dict[str, float], example_inputs: Any, init: str, calibration_data: Any,
                       recalibrate_bn: bool, rank: Rank) -> None:
    if len(budget) > 1:
        raise DsdError(f"choose one of energy, target_flops, target_params, target_latency (got {sorted(budget)})")
    for key, value in budget.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise DsdError(f"{key} must be a fraction in (0, 1], got {value!r}")
    if budget and rank != 1:
        raise DsdError("rank and a budget both set the ranks: choose one")
    if ("target_flops" in budget or "target_latency" in budget) and example_inputs is None:
        raise DsdError("target_flops and target_latency need example_inputs (the layer shapes)")
    if (init == "data" or recalibrate_bn) and calibration_data is None:
        raise DsdError("init='data' and recalibrate_bn need calibration_data (an iterable of input batches)")


@torch.no_grad()
def _verify_shapes(model: nn.Module, example_inputs: Any, analysis: ModelAnalysis,
                   replacements: Dict[str, nn.Module]) -> bool:
    """Run the converted model; raise if a converted layer maps an input shape to another output shape.

    Compared per input shape, batch size aside: behind data-dependent ops (detection heads on however
    many boxes survive) a converted model may call a layer on other batch sizes, or not at all.
    """
    expected = {site.name: {inp[1:]: out[1:] for inp, out in site.call_shapes}
                for site in analysis.sites if site.name in replacements}
    with eval_mode(model), record_shapes(replacements) as calls:
        model(*as_args(example_inputs))
    wrong = {}
    for name, shapes in expected.items():
        for inp, out in calls.get(name, []):
            want = shapes.get(inp[1:])
            if out[0] != inp[0] or (want is not None and out[1:] != want):
                wrong[name] = (inp, want, out)
    if wrong:
        raise RuntimeError(f"dsd bug: converted layers changed output shape (input, expected, got): {wrong}")
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
