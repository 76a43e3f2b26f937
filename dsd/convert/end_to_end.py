"""The whole model as the deciding measurement: ``target_latency`` is a share of its latency, and with
``only_if_faster`` the converted model is never slower than the original end to end.

Per-layer timings choose; a stand-in of the converted model (the chosen layers built with their
geometry, weights not yet fitted: latency does not depend on their values) is timed against the
original, interleaved, in the settings' runtime, and the choice is corrected where that says so.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers.spec import LayerSpec
from ..module_tree import deepcopy_module, swap_modules
from ..timing import BenchmarkSettings, LatencyStats, Speedup, measure

__all__ = ["EndToEnd", "WholeModel", "model_timings", "whole_model_input"]


@dataclass
class EndToEnd:
    """What the final whole-model measurement said (kept in the conversion report)."""
    runtime: str
    batch_size: int
    original_ms: float
    converted_ms: float
    speedup: Speedup
    measured_in: str  # BenchmarkSettings.describe(): runtime, device, dtype, memory format, batch
    reverted: List[str] = field(default_factory=list)  # layers made dense again: the model measured slower
    rounds: int = 1  # whole-model measurements taken

    @property
    def share(self) -> float:
        return self.converted_ms / self.original_ms

    def describe(self) -> str:
        text = (f"end to end ({self.measured_in}): {self.original_ms:.2f} -> {self.converted_ms:.2f} ms, "
                f"speedup {self.speedup}")
        if self.reverted:
            text += f"; {len(self.reverted)} layers kept dense because the converted model measured slower"
        if self.speedup.uncertain:
            text += "; the interval includes 1.0: this machine cannot tell whether it is faster"
        return text

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup.to_dict()}


def whole_model_input(example_inputs: Any) -> Optional[Tuple[int, ...]]:
    """The per-sample input shape when the model takes one tensor (else None: no whole-model timing)."""
    return tuple(example_inputs.shape[1:]) if isinstance(example_inputs, torch.Tensor) else None


def model_timings(original: nn.Module, candidate: nn.Module, input_shape: Sequence[int],
                  settings: BenchmarkSettings, progress: bool = False) -> Tuple[LatencyStats, LatencyStats]:
    """The two whole models timed interleaved (the point where tests inject timings)."""
    before, after = measure([original, candidate], input_shape, settings, progress, desc="timing the whole model")
    return before, after


class WholeModel:
    """Times the original against a stand-in with some layers replaced, in the settings' runtime."""

    def __init__(self, model: nn.Module, sample_shape: Sequence[int], settings: BenchmarkSettings,
                 progress: bool = False):
        self.model, self.settings, self.progress = model, settings, progress
        self.input_shape = (settings.batch_size, *sample_shape)
        self.rounds = 0
        self._original_ms: Optional[float] = None

    def stand_in(self, specs: Sequence[LayerSpec]) -> nn.Module:
        model = deepcopy_module(self.model)
        swap_modules(model, {spec.name: spec.build() for spec in specs})
        return model

    def compare(self, specs: Sequence[LayerSpec]) -> Tuple[LatencyStats, LatencyStats]:
        """The original and the stand-in with ``specs``, timed interleaved: one round of measurement."""
        self.rounds += 1
        return self._timings(specs)

    def original_ms(self) -> float:
        if self._original_ms is None:
            self._timings([])
        return self._original_ms

    def _timings(self, specs: Sequence[LayerSpec]) -> Tuple[LatencyStats, LatencyStats]:
        before, after = model_timings(self.model, self.stand_in(specs), self.input_shape, self.settings,
                                      self.progress)
        self._original_ms = before.median_ms
        return before, after

    def outcome(self, before: LatencyStats, after: LatencyStats, reverted: Sequence[str] = ()) -> EndToEnd:
        return EndToEnd(self.settings.runtime, self.settings.batch_size, before.median_ms, after.median_ms,
                        Speedup.of(before, after), self.settings.describe(), list(reverted), self.rounds)


def revert_until_not_slower(whole: WholeModel, specs: Sequence[LayerSpec], gains: Dict[str, float]
                            ) -> Tuple[List[LayerSpec], EndToEnd]:
    """Drop the layers with the smallest measured per-layer gain, one at a time, until the stand-in is not
    slower than the original end to end (at worst every layer: the original itself)."""
    kept = sorted(specs, key=lambda spec: gains.get(spec.name, 0.0), reverse=True)
    reverted: List[str] = []
    while True:
        before, after = whole.compare(kept)
        if after.median_ms <= before.median_ms or not kept:
            order = {spec.name: i for i, spec in enumerate(specs)}
            return sorted(kept, key=lambda spec: order[spec.name]), whole.outcome(before, after, reverted)
        reverted.append(kept.pop().name)
