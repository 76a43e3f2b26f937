"""Per-layer rank choice under a global budget (FLOPs, parameters or latency), and optionally a second one.

Each convertible layer offers options: keep it dense (rank 0: no error, full cost) or a rank r (its
decoupling error, a lower cost). Choosing one option per layer to minimise the summed error with the
summed cost within the budget is a multiple-choice knapsack; it is solved exactly by dynamic programming
over costs quantised upwards, so the chosen total never exceeds the budget. A second budget (a FLOP cap on
a latency budget) enters by Lagrangian relaxation: its cost, priced at the least multiplier that meets it,
is added to the errors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ..errors import DsdError

__all__ = ["Option", "solve_budget", "DENSE"]

DENSE = 0  # the rank that means "keep this layer dense"


@dataclass(frozen=True)
class Option:
    rank: int  # DENSE or a depth multiplier
    cost: float  # MACs, parameters or milliseconds
    error: float  # relative squared error of the layer (0 when dense)
    cap_cost: float = 0.0  # its cost in the second budget's unit, where there is one


def solve_budget(layers: Sequence[Sequence[Option]], budget: float, resolution: int = 20000,
                 cap: Optional[float] = None) -> List[Option]:
    """One option per layer, minimum total error, total cost <= ``budget`` (and total ``cap_cost`` <= ``cap``).

    Exact when costs are integers whose largest possible total is at most ``resolution``; otherwise costs
    are rounded up to ``1/resolution`` of that total (the budget still holds, the error is within one
    quantum of the optimum). With ``cap``: the least-error choice found by pricing the cap cost (bisection
    on its price); both budgets hold, the error may exceed the optimum by the relaxation's gap.
    """
    chosen = _solve(layers, budget, resolution)
    if cap is None or _cap_total(chosen) <= cap:
        return chosen

    def priced(price: float) -> List[List[Option]]:
        return [[Option(o.rank, o.cost, o.error + price * o.cap_cost / cap, o.cap_cost) for o in options]
                for options in layers]
    low, high = 0.0, 1.0
    while _cap_total(_solve(priced(high), budget, resolution)) > cap:
        if high >= 1e9:
            raise DsdError(f"the two budgets cannot both be met: at the budget {budget:g}, the least the layers "
                           f"can cost in the second budget's unit is above {cap:g}; raise one of the targets")
        low, high = high, high * 10
    for _ in range(40):
        middle = (low + high) / 2
        if _cap_total(_solve(priced(middle), budget, resolution)) > cap:
            low = middle
        else:
            high = middle
    return _unpriced(_solve(priced(high), budget, resolution), layers)


def _cap_total(chosen: Sequence[Option]) -> float:
    return sum(o.cap_cost for o in chosen)


def _unpriced(chosen: Sequence[Option], layers: Sequence[Sequence[Option]]) -> List[Option]:
    """The original options (errors without the price) of a priced choice."""
    return [next(o for o in options if o.rank == c.rank) for c, options in zip(chosen, layers)]


def _solve(layers: Sequence[Sequence[Option]], budget: float, resolution: int) -> List[Option]:
    if not layers:
        return []
    least_error = [min(options, key=lambda o: (o.error, o.cost)) for options in layers]
    if sum(o.cost for o in least_error) <= budget:  # optimal, and exact where quantised costs would round up
        return least_error
    most = sum(max(o.cost for o in options) for options in layers)
    integral = all(float(o.cost).is_integer() for options in layers for o in options)
    scale = 1.0 if integral and most <= resolution else most / resolution
    capacity = int(math.floor(budget / scale + 1e-9))
    if capacity < 0:
        raise DsdError(f"the budget {budget:g} is negative: the layers that cannot be converted already exceed it")
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    choices = []
    for options in layers:
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, dtype=np.int64)
        for index, option in enumerate(options):
            q = int(math.ceil(option.cost / scale - 1e-9))
            if q > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[q:] = best[:capacity + 1 - q] + option.error
            better = candidate < new
            new[better], pick[better] = candidate[better], index
        best = new
        choices.append((pick, [int(math.ceil(o.cost / scale - 1e-9)) for o in options]))
    if not np.isfinite(best).any():
        cheapest = sum(min(o.cost for o in options) for options in layers)
        raise DsdError(f"the budget cannot be met: the convertible layers cost at least {cheapest:g} at their "
                       f"cheapest, and {budget:g} is left for them; raise the target or convert more layers")
    spent = int(np.argmin(best))
    chosen: List[Option] = []
    for (pick, quantised), options in zip(reversed(choices), reversed(layers)):
        index = int(pick[spent])
        chosen.append(options[index])
        spent -= quantised[index]
    return chosen[::-1]
