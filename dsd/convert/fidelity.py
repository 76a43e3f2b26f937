"""How far the converted model's outputs are from the original's, on the calibration data (held-out batches where
given): the one end-to-end figure that says what a conversion did to the model, before any fine-tuning."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from ..calibration.batches import Batch, samples_in
from ..layers.forms import static_forms
from ..modes import eval_mode, floating_outputs

__all__ = ["Fidelity", "measure_fidelity"]


@dataclass
class Fidelity:
    relative_error: float  # ||converted - original|| / ||original|| over every output element of the compared batches
    top1_agreement: Optional[float]  # share of samples with the same arg-max class (classifier outputs only)
    samples: int  # compared
    held_out: bool = False  # measured on calibration batches beyond those the conversion used (else on those)
    mismatched: int = 0  # samples of batches whose outputs differ in shape from the original's, not compared

    def describe(self) -> str:
        kind = "held-out calibration" if self.held_out else "calibration"
        differ = ("the outputs differ in shape from the original's (outputs whose size depends on the values, "
                  "as a detector's detections do)")
        if not self.samples:
            return f"fidelity: on all {self.mismatched} {kind} samples {differ}; no output error measured"
        text = f"fidelity on {self.samples} {kind} samples: relative output error {self.relative_error:.4f}"
        if self.top1_agreement is not None:
            text += f", top-1 agreement {self.top1_agreement:.1%}"
        if self.mismatched:
            text += f"; on {self.mismatched} more {differ}, not compared"
        return text

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@torch.no_grad()
@static_forms()
def measure_fidelity(original: nn.Module, converted: nn.Module, batches: Sequence[Batch],
                     held_out: bool = False) -> Fidelity:
    """The converted model's outputs against the original's on ``batches`` (``held_out``: batches the conversion
    did not use, as the figure says); a batch whose outputs differ in shape from the original's is counted, not
    compared."""
    difference = reference = 0.0
    same = samples = mismatched = 0
    classifier = True
    with eval_mode(original), eval_mode(converted):
        for batch in batches:
            before, after = floating_outputs(original(batch)), floating_outputs(converted(batch))
            if len(before) != len(after) or any(b.shape != a.shape for b, a in zip(before, after)):
                mismatched += samples_in(batch)
                continue
            for b, a in zip(before, after):
                difference += float((a.double() - b.double()).square().sum())
                reference += float(b.double().square().sum())
            classifier = classifier and len(before) == 1 and before[0].dim() == 2 and before[0].shape[1] > 1
            if classifier:
                same += int((before[0].argmax(1) == after[0].argmax(1)).sum())
            samples += samples_in(batch)
    error = (difference / reference) ** 0.5 if reference else float("nan")
    return Fidelity(error, same / samples if classifier and samples else None, samples, held_out, mismatched)
