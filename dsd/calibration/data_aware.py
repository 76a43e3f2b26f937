"""Running calibration data through the model for data-aware conversion, in one pass or layer by layer.

Non-sequential: every layer's statistics come from the original model's activations (two passes in
all). Sequential: layers are calibrated one at a time in execution order, each fed by the
already-converted layers upstream, so approximation errors do not pile up (two passes per layer).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..layers.create import effective_weight
from ..layers.decouple import decouple, load_factors
from ..layers.forms import static_forms
from ..layers.spec import LayerSpec
from ..modes import eval_mode
from ..module_tree import swap_modules
from .batches import Batch, to_device
from .statistics import PatchStats, RefitStats, refit_pointwise, whitened_depthwise

__all__ = ["patch_statistics", "data_aware_layers"]


class _Seen(Exception):
    """Raised by a hook once every hooked module has run as often as it runs per forward: the rest of the
    forward is not needed."""


def _run(model: nn.Module, batches: Sequence[Batch], hooks: Dict[str, Any],
         calls: Optional[Dict[str, Optional[int]]] = None) -> None:
    """Forward every batch with ``hooks[name](module, args, output)`` on the named modules. With ``calls``
    (each module's calls per forward, from the analysis), a forward stops after the hooked modules' last call."""
    device = next(model.parameters()).device
    expected = {name: (calls or {}).get(name) for name in hooks}
    stop_early = all(expected.values())
    seen = dict.fromkeys(hooks, 0)

    def counted(name, hook):
        def run(module, args, output):
            hook(module, args, output)
            seen[name] += 1
            if stop_early and all(seen[n] >= expected[n] for n in seen):
                raise _Seen
        return run

    handles = [model.get_submodule(name).register_forward_hook(counted(name, hook)) for name, hook in hooks.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            for batch in batches:
                seen.update(dict.fromkeys(seen, 0))
                try:
                    model(to_device(batch, device))
                except _Seen:
                    pass
    finally:
        for handle in handles:
            handle.remove()


@static_forms()
def patch_statistics(model: nn.Module, specs: Sequence[LayerSpec], batches,
                     calls: Optional[Dict[str, Optional[int]]] = None) -> Dict[str, PatchStats]:
    layers = {spec.name: spec.build(dtype=torch.float32) for spec in specs}
    stats = {name: PatchStats(layer) for name, layer in layers.items()}
    _run(model, batches, {name: (lambda m, a, o, s=s: s.update(a[0].cpu())) for name, s in stats.items()}, calls)
    return stats


def _build_group(reference: nn.Module, working: nn.Module, convs: Dict[str, nn.Module], specs: List[LayerSpec],
                 batches, sequential: bool, stats: Optional[Dict[str, PatchStats]] = None,
                 calls: Optional[Dict[str, Optional[int]]] = None) -> Dict[str, tuple]:
    stats = stats or patch_statistics(working, specs, batches, calls)
    layers = {}
    for spec in specs:
        conv = convs[spec.name]
        layer = spec.build(device=conv.weight.device, dtype=conv.weight.dtype)
        weight = effective_weight(conv, spec)
        if stats[spec.name].count:
            depthwise, pointwise, error = whitened_depthwise(weight, spec.groups, spec.rank,
                                                             stats[spec.name].second_moment())
        else:  # no calibration data reached it (a detector's mask head on images without detections)
            depthwise, pointwise, error = decouple(weight, spec.groups, spec.rank)
        load_factors(layer, depthwise, pointwise, conv.bias)
        layers[spec.name] = (layer, error)
    refit = {name: RefitStats(layer) for name, (layer, _) in layers.items() if stats[name].count}
    if sequential:  # inputs from the converted model, targets from the original: one batch at a time
        for batch in batches:
            targets: Dict[str, Deque[torch.Tensor]] = {n: deque() for n in refit}
            _run(reference, [batch], {n: (lambda m, a, o, n=n: targets[n].append(o.cpu())) for n in refit}, calls)
            _run(working, [batch], {n: (lambda m, a, o, n=n: _refit_call(refit[n], a[0], o, targets[n]))
                                    for n in refit}, calls)
    else:
        _run(working, batches, {n: (lambda m, a, o, n=n: refit[n].update(a[0].cpu(), o.cpu())) for n in refit}, calls)
    built = {}
    for name, (layer, error) in layers.items():
        stats = refit.get(name)
        if stats is None or not stats.count:  # no output error known: the report gives the weight error
            built[name] = (layer, error, None)
            continue
        pointwise, bias = refit_pointwise(stats)
        kept = stats.output_error(layer.pointwise.weight, layer.pointwise.bias)
        refitted = stats.output_error(pointwise, bias)
        if refitted < kept:  # the ridge can make the refit slightly worse, e.g. at full rank where it is exact
            with torch.no_grad():
                layer.pointwise.weight.copy_(pointwise)
                if bias is not None:
                    layer.pointwise.bias.copy_(bias)
        built[name] = (layer, error, min(kept, refitted))
    return built


def _refit_call(stats: RefitStats, x: torch.Tensor, output: torch.Tensor, targets: Deque[torch.Tensor]) -> None:
    """One call of a layer in the converted model, paired with the original's output of the same call (a layer
    runs once per pyramid level in a detector's head); a call whose original output differs in shape (a
    detector's heads on the boxes each model found) teaches nothing and is skipped."""
    target = targets.popleft() if targets else None
    if target is not None and target.shape == output.shape:
        stats.update(x.cpu(), target)


@static_forms()
def data_aware_layers(reference: nn.Module, working: nn.Module, convs: Dict[str, nn.Module],
                      specs: List[LayerSpec], batches, sequential: bool,
                      patch_stats: Optional[Dict[str, PatchStats]] = None, progress: bool = False,
                      calls: Optional[Dict[str, Optional[int]]] = None) -> Dict[str, tuple]:
    """``name -> (layer, weight error, output error)``; sequential mode swaps each layer into ``working``.

    ``patch_stats`` already streamed from ``working`` (they do not depend on the rank) are reused in
    one-pass mode; sequential mode needs fresh ones, since each layer's inputs change upstream. ``calls``
    (each conv's calls per forward) lets a layer's passes stop once the layer has run.
    """
    if not sequential:
        return _build_group(reference, working, convs, specs, batches, False, patch_stats, calls)
    built = {}
    for spec in tqdm(specs, desc="calibrating", unit="conv", disable=not progress):  # in execution order
        built.update(_build_group(reference, working, convs, [spec], batches, True, calls=calls))
        swap_modules(working, {spec.name: built[spec.name][0]})
    return built
