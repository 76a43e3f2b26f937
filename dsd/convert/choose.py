"""Per-layer rank choice: Network Decoupling's energy rule, or the least error under a FLOP, parameter or
latency budget (:mod:`dsd.convert.budget`), and the only-if-faster check."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..timing import BenchmarkSettings, layer_latency
from .adapters import get_conv_adapter
from .budget import DENSE, Option, solve_budget
from .cost import dense_macs_per_pixel, separable_macs_per_pixel
from .decouple import energy_rank, rank_errors, resample_taps
from .match import ConvSite
from .plan import LayerSpec

__all__ = ["Candidate", "BudgetOutcome", "choose_ranks", "is_faster", "TIMING"]

TIMING = dict(warmup=3, iters=15)  # per candidate layer; enough to order the options, cheap on a CPU


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
    conv = site.module
    weight = resample_taps(get_conv_adapter(conv).effective_weight(conv), spec.tap_step)
    return rank_errors(weight, spec.groups, whitening)


def _pixels(site: ConvSite) -> int:
    return sum(out[-1] * out[-2] for _, out in site.call_shapes)


def _flops(spec: LayerSpec, rank: int, pixels: int) -> int:
    if rank == DENSE:
        return pixels * dense_macs_per_pixel(spec.in_channels, spec.out_channels, spec.kernel_size, spec.groups)
    return pixels * separable_macs_per_pixel(spec.in_channels, spec.out_channels, spec.new_kernel_size, rank,
                                             spec.groups)


def _params(spec: LayerSpec, rank: int) -> int:
    bias = spec.out_channels if spec.bias else 0
    if rank == DENSE:
        return spec.in_channels // spec.groups * spec.out_channels * spec.kernel_size[0] * spec.kernel_size[1] + bias
    kh, kw = spec.new_kernel_size
    return spec.in_channels * rank * kh * kw + spec.in_channels * rank // spec.groups * spec.out_channels + bias


def _latency(site: ConvSite, module: nn.Module, settings: BenchmarkSettings) -> float:
    return sum(layer_latency(module, shape_in, settings).median_ms for shape_in, _ in site.call_shapes)


def _latency_ranks(full: int) -> List[int]:
    ranks, r = [], 1
    while r < full:
        ranks.append(r)
        r *= 2
    return ranks + [full]


def choose_ranks(candidates: Sequence[Candidate], all_sites: Sequence[ConvSite], *, energy: Optional[float] = None,
                 kind: Optional[str] = None, target: Optional[float] = None, model: Optional[nn.Module] = None,
                 device: str = "cpu") -> Tuple[Dict[str, int], BudgetOutcome]:
    """``name -> rank`` (0 = keep dense) for each candidate, and what the budget reached."""
    if energy is not None:
        ranks = {c.spec.name: max(1, energy_rank(c.errors, energy)) for c in candidates}
        return ranks, BudgetOutcome("energy", energy, None)
    settings = BenchmarkSettings(device=device, **TIMING)
    options: List[List[Option]] = []
    for c in candidates:
        full = c.errors.numel() - 1
        ranks = _latency_ranks(full) if kind == "latency" else list(range(1, full + 1))
        if kind == "flops":
            cost = {r: float(_flops(c.spec, r, _pixels(c.site))) for r in [DENSE, *ranks]}
        elif kind == "params":
            cost = {r: float(_params(c.spec, r)) for r in [DENSE, *ranks]}
        else:
            cost = {DENSE: _latency(c.site, c.site.module, settings)}
            cost.update({r: _latency(c.site, replace(c.spec, rank=r).build(), settings) for r in ranks})
        layer = [Option(DENSE, cost[DENSE], 0.0)]
        layer += [Option(r, cost[r], float(c.errors[r])) for r in ranks if cost[r] < cost[DENSE]]
        options.append(layer)
    names = {c.spec.name for c in candidates}
    if kind == "flops":
        fixed = sum(_flops_dense_site(s) for s in all_sites if s.name not in names)
        total = fixed + sum(o[0].cost for o in options)
    elif kind == "params":
        total = float(sum(p.numel() for p in model.parameters()))
        fixed = total - sum(o[0].cost for o in options)
    else:
        fixed = sum(_latency(s, s.module, settings) for s in all_sites if s.name not in names and s.calls)
        total = fixed + sum(o[0].cost for o in options)
    chosen = solve_budget(options, target * total - fixed)
    reached = (fixed + sum(o.cost for o in chosen)) / total
    return {c.spec.name: o.rank for c, o in zip(candidates, chosen)}, BudgetOutcome(kind, target, reached)


def _flops_dense_site(site: ConvSite) -> int:
    conv = site.module
    return _pixels(site) * dense_macs_per_pixel(conv.in_channels, conv.out_channels, conv.kernel_size, conv.groups)


def is_faster(site: ConvSite, spec: LayerSpec, device: str) -> tuple:
    """(separable faster?, dense ms, separable ms), measured on ``device`` with the layer's real inputs."""
    settings = BenchmarkSettings(device=device, **TIMING)
    dense, separable = _latency(site, site.module, settings), _latency(site, spec.build(), settings)
    return separable < dense, dense, separable
