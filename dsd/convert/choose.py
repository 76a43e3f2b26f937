"""Per-layer rank choice: Network Decoupling's energy rule, or the least error under a FLOP, parameter or
latency budget (:mod:`dsd.convert.budget`), and the only-if-faster check."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..calibration import PatchStats, output_rank_errors
from ..errors import DsdError
from ..layers.cost import dense_conv_macs, output_pixels
from ..layers.create import effective_weight
from ..layers.decouple import energy_rank, rank_errors
from ..layers.spec import LayerSpec
from ..timing import BenchmarkSettings, LatencyStats, Speedup, measure_layer
from .budget import DENSE, Option, solve_budget
from .end_to_end import EndToEnd, WholeModel
from .match import ConvSite
from .options import ConvertOptions

__all__ = ["Candidate", "BudgetOutcome", "candidate_errors", "choose_ranks", "layer_speedup", "site_timings"]

_UNITS = {"flops": "conv FLOPs", "model flops": "FLOPs", "params": "parameters", "latency": "latency"}
LATENCY_ROUNDS = 3  # whole-model measurements a latency budget may take to settle


@dataclass
class Candidate:
    site: ConvSite
    spec: LayerSpec  # at rank 1; the chosen rank replaces it
    errors: torch.Tensor  # at ranks 0..full: what the budget minimises (see candidate_errors)


@dataclass
class BudgetOutcome:
    kind: str  # energy | flops | params | latency
    target: float
    reached: Optional[float]  # the converted model's share of the original's total (None for energy)
    end_to_end: Optional[EndToEnd] = None  # latency: the whole-model measurement ``reached`` comes from
    unit: str = ""  # what the shares are of: "FLOPs" (the whole model's), "conv FLOPs", "parameters", "latency"
    allocation: str = "layer"  # what the ranks minimised: "sensitivity" or "layer" errors
    cap: Optional["BudgetOutcome"] = None  # the FLOP or parameter budget a latency budget was given as well

    def describe(self) -> str:
        text = f"budget: {self._reached_text()}"
        if self.cap is not None:
            text += f"; and {self.cap._reached_text()}"
        if self.allocation == "sensitivity":
            text += "; ranks chosen by how far each layer moves the outputs on the calibration data"
        return text

    def _reached_text(self) -> str:
        text = f"{self.kind} {self.target:g}"
        if self.reached is not None:
            text += f", reached {self.reached:.3f} of the original's {self.unit or self.kind}"
            if self.end_to_end is not None:
                text += " measured end to end"
            if self.end_to_end is not None and self.reached > self.target:
                text += f" (target {self.target:g} not met: the closest of {self.end_to_end.rounds} measured choices)"
        return text


def candidate_errors(site: ConvSite, spec: LayerSpec, stats: Optional[PatchStats] = None, whitened: bool = False,
                     sensitivity: Optional[float] = None) -> torch.Tensor:
    """What a budget minimises for this layer, at ranks 0..full.

    With ``sensitivity`` (and the layer's input ``stats``): the predicted relative squared change of the
    model's outputs, the layer's output error weighted by how far its output moves the model's outputs.
    Otherwise the layer's own relative squared error: in output space for whitened (data-aware) factors
    with ``stats``, else in weight space.
    """
    weight = effective_weight(site.module, spec)
    if stats is None or not stats.count or (sensitivity is None and not whitened):  # no data reached it: weights
        return rank_errors(weight, spec.groups)
    errors = output_rank_errors(weight, spec.groups, stats.second_moment(), whitened)
    if sensitivity is not None:
        return errors * sensitivity * stats.positions_per_sample
    return errors / errors[0] if errors[0] > 0 else torch.zeros_like(errors)


def site_timings(site: ConvSite, variants: Sequence[nn.Module], settings: BenchmarkSettings) -> List[LatencyStats]:
    """Each variant's time for all of the site's calls, each call timed on its real input shape in the
    settings' runtime (interleaved, and kept in the on-disk cache)."""
    per_call = [measure_layer(variants, shape_in, settings) for shape_in, _ in site.call_shapes]
    return [LatencyStats.summed([call[i] for call in per_call], settings.batch_size) for i in range(len(variants))]


def _latency_ranks(full: int) -> List[int]:
    ranks, r = [], 1
    while r < full:
        ranks.append(r)
        r *= 2
    return ranks + [full]


def _costs(c: Candidate, kind: str, ranks: Sequence[int], settings: BenchmarkSettings) -> Dict[int, float]:
    """Cost of keeping the layer dense (rank 0) and of each rank, in the budget's unit."""
    if kind == "flops":
        pixels = output_pixels(c.site.call_shapes)
        return {DENSE: float(pixels * c.spec.dense_macs_per_pixel()),
                **{r: float(pixels * c.spec.macs_per_pixel(r)) for r in ranks}}
    if kind == "params":
        return {DENSE: float(c.spec.dense_params()), **{r: float(c.spec.params(r)) for r in ranks}}
    timings = site_timings(c.site, [c.site.module, *(replace(c.spec, rank=r).build() for r in ranks)], settings)
    return {rank: stats.median_ms for rank, stats in zip([DENSE, *ranks], timings)}


def _ranks_to_try(c: Candidate, kind: str, only_if_cheaper: bool) -> List[int]:
    full = c.errors.numel() - 1
    if kind != "latency":
        return list(range(1, full + 1))
    ranks = _latency_ranks(full)
    if only_if_cheaper:  # a latency budget never buys a layer with more multiply-adds than the dense conv
        ranks = [r for r in ranks if c.spec.macs_per_pixel(r) < c.spec.dense_macs_per_pixel()] or ranks[:1]
    return ranks


def _not_slower_ranks(c: Candidate, ranks: Sequence[int], settings: BenchmarkSettings) -> List[int]:
    """With ``only_if_faster``, a FLOP or parameter budget chooses among the ranks that do not measure
    clearly slower than the dense conv (so the budget it reports is the one the faster layers meet).
    A layer's time grows with its rank: ranks are timed one at a time, up to the first clearly slower one
    (a 7x7 4096-channel conv has 49 ranks, together gigabytes of weights)."""
    kept: List[int] = []
    for r in ranks:
        dense, separable = site_timings(c.site, [c.site.module, replace(c.spec, rank=r).build()], settings)
        if Speedup.of(dense, separable).clearly_slower:
            break
        kept.append(r)
    return kept


def _fixed_cost(kind: str, others: Sequence[ConvSite], model: nn.Module, candidate_total: float,
                whole: Optional[WholeModel], settings: BenchmarkSettings, model_flops: Optional[float] = None
                ) -> Tuple[float, float]:
    """(cost that no conversion changes, the original's total) in the budget's unit."""
    if kind == "flops" and model_flops is not None:
        return model_flops - candidate_total, model_flops
    if kind == "flops":
        fixed = sum(dense_conv_macs(s.module, s.call_shapes) for s in others)
    elif kind == "params":
        total = float(sum(p.numel() for p in model.parameters()))
        return total - candidate_total, total
    elif whole is None:  # a model of several inputs: the convs' summed latency, each timed alone
        fixed = sum(site_timings(s, [s.module], settings)[0].median_ms for s in others if s.calls)
    else:  # the whole model's measured latency; the candidates' share of it from their own timings
        total = whole.original_ms()
        return max(0.0, total - candidate_total), total
    return fixed, fixed + candidate_total


def choose_ranks(candidates: Sequence[Candidate], all_sites: Sequence[ConvSite], options: ConvertOptions,
                 model: nn.Module, whole: Optional[WholeModel] = None, progress: bool = False,
                 model_flops: Optional[float] = None, allocation: str = "layer"
                 ) -> Tuple[Dict[str, int], BudgetOutcome]:
    """``name -> rank`` (0 = keep dense) for each candidate under the options' budget, and what it reached.

    ``model_flops`` (per sample, fvcore's count) makes a FLOP budget a share of the whole model's FLOPs
    rather than of its convs'; ``allocation`` names what the candidates' errors are (for the report).

    A latency budget (``whole`` given) is a share of the whole model's latency in the settings' runtime;
    the choice is measured end to end and, where it misses the target, chosen again on a budget
    tightened by the miss (at most ``LATENCY_ROUNDS`` measurements). A FLOP or parameter budget given with
    it caps the choice in that unit too."""
    budget = dict(options.budget)
    if budget.keys() == {"energy"}:
        target = budget["energy"]
        return {c.spec.name: max(1, energy_rank(c.errors, target)) for c in candidates}, BudgetOutcome("energy", target, None)
    cap_name = next(n for n in budget if n != "target_latency") if len(budget) > 1 else None
    cap_target = budget.pop(cap_name) if cap_name else None
    (name, target), = budget.items()
    kind, cap_kind = name.removeprefix("target_"), cap_name and cap_name.removeprefix("target_")
    layers: List[List[Option]] = []
    timed = kind == "latency" or options.only_if_faster
    for c in tqdm(candidates, desc="timing layers", unit="conv", disable=not (progress and timed)):
        ranks = _ranks_to_try(c, kind, options.only_if_cheaper)
        if options.only_if_faster and kind != "latency":
            ranks = _not_slower_ranks(c, ranks, options.benchmark)
        cost = _costs(c, kind, ranks, options.benchmark)
        cap_cost = _costs(c, cap_kind, ranks, options.benchmark) if cap_kind else dict.fromkeys(cost, 0.0)
        layers.append([Option(DENSE, cost[DENSE], 0.0, cap_cost[DENSE])]
                      + [Option(r, v, float(c.errors[r]), cap_cost[r]) for r, v in cost.items()
                         if r != DENSE and v < cost[DENSE]])
    names = {c.spec.name for c in candidates}
    others = [s for s in all_sites if s.name not in names]
    unit, fixed, total = _reachable(name, kind, target, others, model, [[o.cost for o in l] for l in layers], whole,
                                    options.benchmark, model_flops)
    cap = None
    if cap_kind:
        cap_unit, cap_fixed, cap_total = _reachable(cap_name, cap_kind, cap_target, others, model,
                                                    [[o.cap_cost for o in l] for l in layers], None,
                                                    options.benchmark, model_flops)
        cap = cap_target * cap_total - cap_fixed
    chosen = solve_budget(layers, target * total - fixed, cap=cap)
    if kind == "latency" and whole is not None:
        chosen, outcome = _settle_latency(candidates, layers, chosen, target, fixed, whole, cap)
    else:
        outcome = BudgetOutcome(kind, target, (fixed + sum(o.cost for o in chosen)) / total)
    ranks = {c.spec.name: o.rank for c, o in zip(candidates, chosen)}
    if cap_kind:
        outcome = replace(outcome, cap=BudgetOutcome(cap_kind, cap_target, (cap_fixed + sum(o.cap_cost for o in chosen))
                                                     / cap_total, unit=cap_unit))
    return ranks, replace(outcome, unit=unit, allocation=allocation)


def _reachable(name: str, kind: str, target: float, others: Sequence[ConvSite], model: nn.Module,
               candidate_costs: Sequence[Sequence[float]], whole: Optional[WholeModel], settings: BenchmarkSettings,
               model_flops: Optional[float]) -> Tuple[str, float, float]:
    """(the budget's unit, what no conversion changes, the original's total); an error where the target is out
    of reach: what stays as it is, or that plus every candidate at its cheapest (``candidate_costs``: each
    candidate's cost per option, dense first), is already over it."""
    unit = _UNITS["model flops" if kind == "flops" and model_flops is not None else kind]
    fixed, total = _fixed_cost(kind, others, model, sum(costs[0] for costs in candidate_costs), whole, settings,
                               model_flops)
    if fixed > target * total:
        raise DsdError(f"{name}={target:g} cannot be met: what no conversion changes (1x1, depthwise and skipped "
                       f"convs{'' if unit == 'conv FLOPs' else ', other layers'}) is already "
                       f"{fixed / total:.3f} of the original's {unit}; choose a target above {fixed / total:.3f}")
    least = (fixed + sum(min(costs) for costs in candidate_costs)) / total
    if least > target:
        measured = " (as the layers measured alone add up)" if kind == "latency" else ""
        raise DsdError(f"{name}={target:g} cannot be met: with every convertible layer at its cheapest rank, the "
                       f"model still comes to {least:.3f} of the original's {unit}{measured}; choose a target above "
                       f"{least:.3f}")
    return unit, fixed, total


def _settle_latency(candidates: Sequence[Candidate], layers: List[List[Option]], chosen: List[Option],
                    target: float, fixed: float, whole: WholeModel, cap: Optional[float] = None
                    ) -> Tuple[List[Option], BudgetOutcome]:
    budget = target * whole.original_ms() - fixed
    tried = []  # (meets the target, summed error, share, chosen options, end to end)
    for _ in range(LATENCY_ROUNDS):
        before, after = whole.compare([replace(c.spec, rank=o.rank) for c, o in zip(candidates, chosen)
                                       if o.rank != DENSE])
        share = after.median_ms / before.median_ms
        tried.append((share <= target, sum(o.error for o in chosen), share, chosen, whole.outcome(before, after)))
        if share <= target:
            break
        # The miss, in the whole model's milliseconds, taken off the budget; or, where the chosen layers cost
        # more in the model than alone, the budget scaled down by that ratio: whichever is tighter.
        predicted, measured = sum(o.cost for o in chosen), after.median_ms - fixed
        budget = budget - (share - target) * before.median_ms
        if predicted > 0 and measured > predicted:
            budget = min(budget, (target * before.median_ms - fixed) * predicted / measured)
        try:
            chosen = solve_budget(layers, budget, cap=cap)
        except DsdError:
            break  # nothing cheaper is left to try
    met = [t for t in tried if t[0]]
    _, _, share, chosen, end_to_end = min(met, key=lambda t: t[1]) if met else min(tried, key=lambda t: t[2])
    end_to_end.rounds = whole.rounds
    return chosen, BudgetOutcome("latency", target, share, end_to_end)


def layer_speedup(site: ConvSite, spec: LayerSpec, settings: BenchmarkSettings
                  ) -> Tuple[Speedup, LatencyStats, LatencyStats]:
    """(separable's speedup over dense with its interval, dense timing, separable timing) on the layer's
    real inputs in the settings' runtime."""
    dense, separable = site_timings(site, [site.module, spec.build()], settings)
    return Speedup.of(dense, separable), dense, separable
