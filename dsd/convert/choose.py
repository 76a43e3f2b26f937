"""Per-layer rank choice: Network Decoupling's energy rule, or the least error under a FLOP, parameter or
latency budget (:mod:`dsd.convert.budget`), and the only-if-faster check."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import DsdError
from ..layers.cost import dense_conv_macs, output_pixels
from ..layers.create import effective_weight
from ..layers.decouple import energy_rank, rank_errors
from ..layers.spec import LayerSpec
from ..timing import BenchmarkSettings, layer_latency
from .budget import DENSE, Option, solve_budget
from .match import ConvSite
from .options import ConvertOptions

__all__ = ["Candidate", "BudgetOutcome", "candidate_errors", "choose_ranks", "is_faster", "site_latency"]

_UNITS = {"flops": "conv FLOPs", "params": "parameters", "latency": "summed conv latency"}


@dataclass
class Candidate:
    site: ConvSite
    spec: LayerSpec  # at rank 1; the chosen rank replaces it
    errors: torch.Tensor  # relative squared error at ranks 0..full (weight space, or output space with data)


@dataclass
class BudgetOutcome:
    kind: str  # energy | flops | params | latency
    target: float
    reached: Optional[float]  # the converted model's share of the original's total (None for energy)


def candidate_errors(site: ConvSite, spec: LayerSpec, whitening: Optional[torch.Tensor] = None) -> torch.Tensor:
    return rank_errors(effective_weight(site.module, spec), spec.groups, whitening)


def site_latency(site: ConvSite, module: nn.Module, settings: BenchmarkSettings) -> float:
    """Milliseconds ``module`` takes for all of the site's calls, each timed alone on its real input shape."""
    return sum(layer_latency(module, shape_in, settings).median_ms for shape_in, _ in site.call_shapes)


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
    return {DENSE: site_latency(c.site, c.site.module, settings),
            **{r: site_latency(c.site, replace(c.spec, rank=r).build(), settings) for r in ranks}}


def _fixed_cost(kind: str, others: Sequence[ConvSite], model: nn.Module, candidate_total: float,
                settings: BenchmarkSettings) -> Tuple[float, float]:
    """(cost that no conversion changes, the original's total) in the budget's unit."""
    if kind == "flops":
        fixed = sum(dense_conv_macs(s.module, s.call_shapes) for s in others)
    elif kind == "params":
        total = float(sum(p.numel() for p in model.parameters()))
        return total - candidate_total, total
    else:
        fixed = sum(site_latency(s, s.module, settings) for s in others if s.calls)
    return fixed, fixed + candidate_total


def choose_ranks(candidates: Sequence[Candidate], all_sites: Sequence[ConvSite], options: ConvertOptions,
                 model: nn.Module) -> Tuple[Dict[str, int], BudgetOutcome]:
    """``name -> rank`` (0 = keep dense) for each candidate under the options' budget, and what it reached."""
    (name, target), = options.budget.items()
    if name == "energy":
        return {c.spec.name: max(1, energy_rank(c.errors, target)) for c in candidates}, BudgetOutcome(name, target, None)
    kind = name.removeprefix("target_")
    layers: List[List[Option]] = []
    for c in candidates:
        full = c.errors.numel() - 1
        ranks = _latency_ranks(full) if kind == "latency" else list(range(1, full + 1))
        cost = _costs(c, kind, ranks, options.benchmark)
        layers.append([Option(DENSE, cost[DENSE], 0.0)]
                      + [Option(r, cost[r], float(c.errors[r])) for r in ranks if cost[r] < cost[DENSE]])
    names = {c.spec.name for c in candidates}
    others = [s for s in all_sites if s.name not in names]
    fixed, total = _fixed_cost(kind, others, model, sum(o[0].cost for o in layers), options.benchmark)
    if fixed > target * total:
        raise DsdError(f"{name}={target:g} cannot be met: what no conversion changes (1x1, depthwise and skipped "
                       f"convs{', other layers' if kind == 'params' else ''}) is already {fixed / total:.3f} of the "
                       f"original's {_UNITS[kind]}; choose a target above {fixed / total:.3f}")
    chosen = solve_budget(layers, target * total - fixed)
    reached = (fixed + sum(o.cost for o in chosen)) / total
    return {c.spec.name: o.rank for c, o in zip(candidates, chosen)}, BudgetOutcome(kind, target, reached)


def is_faster(site: ConvSite, spec: LayerSpec, settings: BenchmarkSettings) -> Tuple[bool, float, float]:
    """(separable faster?, dense ms, separable ms), measured with ``settings`` on the layer's real inputs."""
    dense, separable = site_latency(site, site.module, settings), site_latency(site, spec.build(), settings)
    return separable < dense, dense, separable
