"""``convert_model`` as a sequence of stages, and ``apply_plan`` (rebuild from a plan).

1. :func:`analyze` (trace and match): every Conv2d, how it was found, its call shapes;
2. :func:`describe_layers`: one :class:`LayerRecord` per conv, and the convertible ones with their spec;
3. :func:`choose_layer_ranks` (a budget) and :func:`keep_faster_layers` (``only_if_faster``), both settled
   by timing the whole model in the benchmark settings' runtime (:mod:`dsd.convert.end_to_end`);
4. :func:`initialise_layers`: build each separable layer from the trained (or calibrated) weights;
5. :func:`rewrite`: swap the layers into the model, re-estimate BatchNorm if asked;
6. :func:`verify_shapes`: every converted layer keeps its output shape at each input shape it was called with.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..calibration import (PatchStats, calibration_and_held_out, data_aware_layers, output_sensitivity,
                           patch_statistics, recalibrate_batchnorm)
from ..calibration.batches import is_batch, samples_in
from ..errors import DsdError
from ..flops import count_flops
from ..layers.create import DATA_INIT, SkipLayer, build_layers
from ..layers.separable import DepthwiseSeparableConv2d
from ..layers.spec import LayerSpec
from ..modes import as_args, check_runs, full_precision, output_shape
from ..module_tree import (copy_sharing_convs, deepcopy_module, own_parameters, refresh_recomputed_weights,
                           swap_modules, unwrap)
from .budget import DENSE
from .choose import BudgetOutcome, Candidate, candidate_errors, choose_ranks, layer_speedup
from .conversion_report import ConversionReport, LayerRecord
from .end_to_end import EndToEnd, WholeModel, revert_until_not_slower, whole_model_input
from .fidelity import measure_fidelity
from .fold_bn import apply_folding
from .match import ConvSite, ModelAnalysis, analyze
from .options import ConvertOptions
from .plan import ConversionPlan
from .rules import select

__all__ = ["convert_model", "apply_plan", "PlanMismatch", "describe_layers", "choose_layer_ranks",
           "keep_faster_layers", "initialise_layers", "rewrite", "verify_shapes"]

Eligible = List[Tuple[ConvSite, LayerSpec]]
SENSITIVITY = "sensitivity"


class PlanMismatch(DsdError):
    """A conversion plan names layers the model does not have, or has with another geometry."""


@torch.inference_mode(False)
@full_precision()
def convert_model(
        model: nn.Module,
        example_inputs: Any = None,
        options: Optional[ConvertOptions] = None,
        *,
        calibration_data: Optional[Iterable] = None,
        inplace: bool = False,
        progress: bool = False,
        **overrides: Any,
) -> Tuple[nn.Module, ConversionReport]:
    """Replace the model's dense ``nn.Conv2d`` layers by depthwise-separable ones, initialised from its weights.

    ``options`` (a :class:`ConvertOptions`) says what to convert and how; any of its fields may also be
    given as a keyword (``rank=2``, ``target_flops=0.5``), which overrides it. ``example_inputs`` (a tensor
    or a tuple of forward arguments) gives each conv's shapes, finds the convs that never run, and
    checks afterwards that every converted layer keeps its output shape. ``calibration_data`` (an
    iterable of input batches, or one batch tensor) feeds ``init="data"`` and ``recalibrate_bn``. The model is
    copied unless ``inplace=True``; it keeps its class. A model inside a ``torch.compile``, DDP or DataParallel
    wrapper is converted unwrapped and returned so (wrap it again). Returns ``(model, report)``; ``report.plan``
    rebuilds the architecture with :func:`apply_plan`.
    """
    options = (options or ConvertOptions()).with_overrides(**overrides)
    _check_inputs(options, example_inputs, calibration_data)
    model, wrapper = unwrap(model)
    _check_weights_exist(model, options)
    reference = model
    if inplace and options.init == DATA_INIT and options.sequential:
        reference = deepcopy_module(model)  # the original activations are the refit targets
    # the copy's convs hold the original's parameters (read, never written) until the replaced ones are gone
    working, shared = (model, {}) if inplace else copy_sharing_convs(model)
    analysis = analyze(working, example_inputs)
    refresh_recomputed_weights(working)
    batches, held_out = (calibration_and_held_out(calibration_data, options.calibration_batches)
                         if calibration_data is not None else (None, []))
    if batches:
        check_runs(working, batches[0][:1], inputs="calibration_data (its first input)")
    notes = _calibration_notes(options, calibration_data, working, held_out)
    if wrapper:
        notes.append(f"converted the model inside its {wrapper} wrapper and returned it unwrapped: wrap (compile) the "
                     "converted model again")

    records, eligible = describe_layers(analysis, options)
    allocation = _allocation(options)
    stats = sensitivity = None
    if options.budget and (options.init == DATA_INIT or allocation == SENSITIVITY):
        stats = patch_statistics(working, [spec for _, spec in eligible], batches,
                                 {site.name: site.calls for site, _ in eligible})
    if allocation == SENSITIVITY:
        sensitivity = output_sensitivity(working, [spec.name for _, spec in eligible], batches)
        if sensitivity is None:
            allocation = "layer"
            notes.append("allocation: the model's outputs are not differentiable floating-point tensors, so the "
                         "budget minimised each layer's own error instead of the change of the outputs")
    whole = _whole_model(working, example_inputs, options, progress)
    outcome = end_to_end = None
    if options.budget:
        eligible, outcome = choose_layer_ranks(eligible, records, analysis, options, working, stats, whole, progress,
                                               sensitivity, _model_flops(working, example_inputs, options))
        end_to_end = outcome.end_to_end
    if options.only_if_faster:
        eligible, end_to_end = keep_faster_layers(eligible, records, options, whole, progress)
    layers, specs = initialise_layers(eligible, records, options, reference, working, batches, stats, progress)
    notes += _unreached_note(options, [records[site.name] for site, _ in eligible])
    rewrite(working, layers, options, batches)
    own_parameters(working, shared)

    plan = ConversionPlan(specs, options.to_dict())
    report = ConversionReport(list(records.values()), plan, analysis.traced, analysis.trace_error,
                              other_convs=analysis.other_convs, budget=outcome, end_to_end=end_to_end,
                              notes=notes + _costlier_note(options, records) + _untimed_budget_note(options, specs))
    if analysis.ran:
        report.shapes_verified = verify_shapes(analysis, layers)
    if batches and reference is not working:
        report.fidelity = measure_fidelity(reference, working, held_out or batches, held_out=bool(held_out))
    return working, report


def _calibration_notes(options: ConvertOptions, calibration_data: Any, model: nn.Module,
                       held_out: Sequence[torch.Tensor]) -> List[str]:
    """What the calibration settings do that a user would not guess."""
    notes = []
    if held_out:
        given = (len(calibration_data) if hasattr(calibration_data, "__len__")
                 and not isinstance(calibration_data, torch.Tensor) else None)
        notes.append(f"calibration used the first {options.calibration_batches} of the "
                     f"{given if given is not None else 'more'} batches given (calibration_batches), and the fidelity "
                     f"figure the next {len(held_out)}, held out; raise calibration_batches to calibrate on more")
    if options.recalibrate_bn and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        notes.append("recalibrate_bn: the model has no BatchNorm layers, so nothing was re-estimated")
    return notes


def _unreached_note(options: ConvertOptions, converted: Sequence[LayerRecord]) -> List[str]:
    """The data-aware layers with no output error: nothing to fit them to."""
    if options.init != DATA_INIT:
        return []
    unreached = [r.name for r in converted if r.output_error is None]
    if not unreached:
        return []
    shown = ", ".join(unreached[:4]) + (" ..." if len(unreached) > 4 else "")
    return [f"{len(unreached)} converted layers were not fitted to the calibration data ({shown}): no input reached "
            "them, or the original's and the converted model's calls differed in shape there (a detector's heads, on "
            "the boxes each model found); they keep their weights' decoupling, and their error is a weight error"]


def _costlier_note(options: ConvertOptions, records: Dict[str, LayerRecord]) -> List[str]:
    costlier = [r for r in records.values() if r.category == "not cheaper"]
    if not costlier or not options.only_if_cheaper:
        return []
    what = "rank 'full' (the exact conversion)" if options.rank == "full" else f"rank {options.rank}"
    return [f"{what} costs more multiply-adds than the dense conv in {len(costlier)} layers, kept dense; "
            "only_if_cheaper=False (--allow-costlier) converts them anyway"]


def _untimed_budget_note(options: ConvertOptions, specs: Sequence[LayerSpec]) -> List[str]:
    """A FLOP or parameter budget decided without a clock: say that its high ranks need not be faster."""
    high = max((spec.rank for spec in specs), default=0)
    if not ({"target_flops", "target_params"} & set(options.budget)) or "target_latency" in options.budget \
            or options.only_if_faster or high < 3:
        return []
    return [f"the budget chose ranks up to {high} by FLOPs or parameters alone; a rank-r layer runs r depthwise and "
            "pointwise passes, and at rank 3 and up it can be as slow as the dense conv (on CPUs it is): add "
            "target_latency (--target-latency) or only_if_faster to decide on measured time in your runtime"]


def _allocation(options: ConvertOptions) -> str:
    """What the budget minimises: each layer's own error, or its output sensitivity (the energy rule: neither)."""
    return options.allocation if set(options.budget) - {"energy"} else "layer"


def _model_flops(model: nn.Module, example_inputs: Any, options: ConvertOptions) -> Optional[float]:
    """The whole model's FLOPs per sample (fvcore), where a FLOP budget is a share of them."""
    if options.target_flops is None or options.target_flops_of != "model":
        return None
    args = as_args(example_inputs)
    try:
        total = count_flops(model, args).total
    except Exception as error:  # fvcore's jit trace fails on some models: say what to use instead
        raise DsdError(f"target_flops_of='model' counts the model's FLOPs with fvcore, which failed on this model "
                       f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                       "use target_flops_of='convs' (--target-flops-of convs)") from None
    batch = next((samples_in(a) for a in args if is_batch(a)), 1)
    return total / batch


def _check_inputs(options: ConvertOptions, example_inputs: Any, calibration_data: Any) -> None:
    if ("target_flops" in options.budget or "target_latency" in options.budget) and example_inputs is None:
        raise DsdError("target_flops and target_latency need example_inputs (the layer shapes)")
    if (options.init == DATA_INIT or options.recalibrate_bn or options.allocation == SENSITIVITY) \
            and calibration_data is None:
        raise DsdError("init='data', recalibrate_bn and allocation='sensitivity' need calibration_data "
                       "(an iterable of input batches)")


def _check_weights_exist(model: nn.Module, options: ConvertOptions) -> None:
    if options.init != "random" and any(p.device.type == "meta" for m in model.modules()
                                        if isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False)):
        raise DsdError(f"the model's conv weights are on the meta device (no values to decouple with init="
                       f"{options.init!r}): load its weights first, convert with init='random', or give the layout "
                       "only with dsd.apply_plan")


def _whole_model(model: nn.Module, example_inputs: Any, options: ConvertOptions, progress: bool
                 ) -> Optional[WholeModel]:
    """The whole-model timer, where a decision is made on latency and the model takes one tensor."""
    sample = whole_model_input(example_inputs)
    if sample is None or not (options.only_if_faster or "target_latency" in options.budget):
        return None
    return WholeModel(model, sample, options.benchmark, progress)


def describe_layers(analysis: ModelAnalysis, options: ConvertOptions) -> Tuple[Dict[str, LayerRecord], Eligible]:
    """One record per conv (in execution order), and the convs the rules let through, with their spec."""
    records: Dict[str, LayerRecord] = {}
    eligible: Eligible = []
    for site in analysis.sites:
        record = records[site.name] = LayerRecord.describe(site)
        if site.separable_part:
            record.skip("already separable", "part of a layer dsd converted (DepthwiseSeparableConv2d)")
            continue
        if site.calls == 0:
            record.skip("not called", "not called on the example input")
            continue
        try:
            eligible.append((site, select(site.name, site.module, options)))
        except SkipLayer as skip:
            record.skip(skip.category, skip.detail)
    return records, eligible


def choose_layer_ranks(eligible: Eligible, records: Dict[str, LayerRecord], analysis: ModelAnalysis,
                       options: ConvertOptions, model: nn.Module, stats: Optional[Dict[str, PatchStats]] = None,
                       whole: Optional[WholeModel] = None, progress: bool = False,
                       sensitivity: Optional[Dict[str, float]] = None, model_flops: Optional[float] = None
                       ) -> Tuple[Eligible, BudgetOutcome]:
    """The options' budget decides each layer's rank; layers it keeps dense are marked so.

    With ``sensitivity`` (:func:`dsd.calibration.output_sensitivity`) the ranks minimise the predicted change
    of the model's outputs; otherwise the summed relative errors of the layers."""
    stats, sensitivity = stats or {}, sensitivity or {}
    whitened = options.init == DATA_INIT
    candidates = [Candidate(site, spec, candidate_errors(site, spec, stats.get(spec.name), whitened,
                                                         sensitivity.get(spec.name)))
                  for site, spec in eligible]
    ranks, outcome = choose_ranks(candidates, analysis.sites, options, model, whole, progress, model_flops,
                                  SENSITIVITY if sensitivity else "layer")
    chosen = []
    for site, spec in eligible:
        if ranks[spec.name] == DENSE:
            records[site.name].skip("budget", f"kept dense by the {outcome.kind} budget")
        else:
            chosen.append((site, replace(spec, rank=ranks[spec.name])))
    return chosen, outcome


def keep_faster_layers(eligible: Eligible, records: Dict[str, LayerRecord], options: ConvertOptions,
                       whole: Optional[WholeModel] = None, progress: bool = False
                       ) -> Tuple[Eligible, Optional[EndToEnd]]:
    """The layers whose separable form is not clearly slower than dense (the bootstrap interval of the
    speedup lies below 1.0) in the options' benchmark settings; then, with ``whole``, the model end to
    end: while it measures slower than the original, the layer with the smallest gain goes back to dense."""
    settings, kept = options.benchmark, []
    for site, spec in tqdm(eligible, desc="timing layers", unit="conv", disable=not progress):
        speedup, dense, separable = layer_speedup(site, spec, settings)
        record = records[site.name]
        record.latency_before_ms, record.latency_after_ms = dense.median_ms, separable.median_ms
        if speedup.clearly_slower:
            record.skip("not faster", f"{separable.median_ms:.3f} ms separable vs {dense.median_ms:.3f} ms dense, "
                                      f"speedup {speedup} ({settings.runtime} on {settings.device})")
        else:
            kept.append((site, spec))
    if whole is None or not kept:
        return kept, None
    gains = {spec.name: records[site.name].latency_before_ms - records[site.name].latency_after_ms
             for site, spec in kept}
    specs, end_to_end = revert_until_not_slower(whole, [spec for _, spec in kept], gains)
    for name in end_to_end.reverted:
        records[name].skip("not faster", f"made dense again: the converted model measured slower end to end "
                                         f"({settings.runtime}) and this layer gained least")
    still = {spec.name for spec in specs}
    return [(site, spec) for site, spec in kept if spec.name in still], end_to_end


def initialise_layers(eligible: Eligible, records: Dict[str, LayerRecord], options: ConvertOptions,
                      reference: nn.Module, working: nn.Module, batches: Optional[List[torch.Tensor]],
                      stats: Optional[Dict[str, PatchStats]], progress: bool = False
                      ) -> Tuple[Dict[str, nn.Module], List[LayerSpec]]:
    """Build every chosen layer from the trained weights (``init="data"``: on the calibration batches)."""
    layers: Dict[str, nn.Module] = {}
    specs: List[LayerSpec] = []
    if options.init == DATA_INIT:
        built = data_aware_layers(reference, working, {site.name: site.module for site, _ in eligible},
                                  [spec for _, spec in eligible], batches, options.sequential, stats, progress,
                                  {site.name: site.calls for site, _ in eligible})
        for site, spec in eligible:
            layers[spec.name], weight_error, output_error = built[spec.name]
            specs.append(spec.with_error(weight_error))
            if output_error is not None:  # None: no calibration data reached the layer
                records[site.name].output_error = output_error ** 0.5  # relative, on the weight error's scale
    else:
        for (site, _), (layer, spec) in zip(eligible, build_layers([(site.module, spec) for site, spec in eligible])):
            layers[site.name] = layer
            specs.append(spec)
    for (site, _), spec in zip(eligible, specs):
        records[site.name].convert(spec)
        _keep_trainability(site.module, layers[site.name])
    return layers, specs


def _keep_trainability(conv: nn.Module, layer: nn.Module) -> None:
    """A frozen conv (``requires_grad=False``) gives a frozen separable layer; likewise its bias."""
    for weight in (layer.depthwise.weight, layer.pointwise.weight):
        weight.requires_grad_(conv.weight.requires_grad)
    if layer.pointwise.bias is not None:
        layer.pointwise.bias.requires_grad_(conv.bias.requires_grad if conv.bias is not None
                                            else conv.weight.requires_grad)


def rewrite(model: nn.Module, layers: Dict[str, nn.Module], options: ConvertOptions,
            batches: Optional[Sequence[torch.Tensor]] = None) -> nn.Module:
    """Swap the new layers in under every name their originals have; re-estimate BatchNorm if asked."""
    swap_modules(model, layers)
    if options.recalibrate_bn:
        # already the model's inputs: as 1-tuples, a detector's list of images is not read as an (inputs, labels) pair
        recalibrate_batchnorm(model, [(b,) for b in batches], len(batches), next(model.parameters()).device)
    return model


def verify_shapes(analysis: ModelAnalysis, replacements: Dict[str, nn.Module]) -> bool:
    """Raise if a converted layer maps an input shape it was called with on the example input to another
    output shape than the conv it replaced; each layer alone, on meta tensors (no arithmetic).

    The rest of the model is unchanged, so its shapes are the same wherever each converted layer's are.
    """
    wrong, shapes = {}, {}
    for site in analysis.sites:
        if site.name not in replacements:
            continue
        layer = replacements[site.name]
        # dsd's layers of one configuration map an input shape alike: resnet18's 17 layers have 9 configurations
        kind = layer.extra_repr() if isinstance(layer, DepthwiseSeparableConv2d) else id(layer)
        for inp, out in dict(site.call_shapes).items():
            if (kind, inp) not in shapes:
                shapes[kind, inp] = output_shape(layer, inp)
            got = shapes[kind, inp]
            if got != out:
                wrong[site.name] = (inp, out, got)
    if wrong:
        raise RuntimeError(f"dsd bug: converted layers changed output shape (input, expected, got): {wrong}")
    return True


def apply_plan(model: nn.Module, plan: ConversionPlan) -> nn.Module:
    """Swap in (uninitialised) separable layers as ``plan`` says, in place, and reshape the BatchNorm layers it
    folded; then load the converted weights."""
    replacements = {}
    refresh_recomputed_weights(model)
    for spec in plan.layers:
        try:
            conv = model.get_submodule(spec.name)
        except AttributeError:
            raise PlanMismatch(f"the plan converts layer {spec.name!r}, which this model does not have") from None
        problem = spec.fits(conv)
        if problem:
            raise PlanMismatch(f"layer {spec.name!r} {problem}: the plan was made for another model")
        with torch.inference_mode(False):  # as build_layers: weights whose changes a layer can see
            replacements[spec.name] = spec.build(device=conv.weight.device, dtype=conv.weight.dtype)
    swap_modules(model, replacements)
    try:
        return apply_folding(model, plan.folded_batchnorm, with_statistics=False)
    except AttributeError as error:
        raise PlanMismatch(f"the plan folds BatchNorm layers this model does not have ({error})") from None
