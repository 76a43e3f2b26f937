"""Knowledge distillation: labels, the teacher's softened outputs, and optionally its features."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .recipe import LossConfig

__all__ = ["distillation_loss", "FeatureTaps", "LossTerms"]


@dataclass
class LossTerms:
    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    feature: torch.Tensor


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, cfg: LossConfig,
                      teacher_logits: Optional[torch.Tensor] = None,
                      student_features: Optional[List[torch.Tensor]] = None,
                      teacher_features: Optional[List[torch.Tensor]] = None) -> LossTerms:
    """(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T) + feature_weight * mean MSE."""
    ce = F.cross_entropy(student_logits, labels)
    zero = student_logits.new_zeros(())
    kd = feature = zero
    alpha = cfg.alpha if teacher_logits is not None else 0.0
    if teacher_logits is not None and alpha > 0:
        t = cfg.temperature
        kd = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                      reduction="batchmean", log_target=True) * t * t
    if student_features and teacher_features and cfg.feature_weight > 0:
        feature = torch.stack([F.mse_loss(s, t) for s, t in zip(student_features, teacher_features)]).mean()
    total = (1 - alpha) * ce + alpha * kd + cfg.feature_weight * feature
    return LossTerms(total, ce.detach(), kd.detach(), feature.detach())


class FeatureTaps:
    """Forward hooks that keep the outputs of named layers during one forward pass."""

    def __init__(self, model: nn.Module, names: List[str]):
        self.model, self.names = model, list(names)
        self.outputs: Dict[str, torch.Tensor] = {}

    @contextmanager
    def capture(self) -> Iterator[List[torch.Tensor]]:
        self.outputs.clear()
        captured: List[torch.Tensor] = []

        def keep(name):
            def hook(module, args, output):
                self.outputs[name] = output
            return hook
        handles = [self.model.get_submodule(n).register_forward_hook(keep(n)) for n in self.names]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()
            captured.extend(self.outputs[n] for n in self.names if n in self.outputs)
