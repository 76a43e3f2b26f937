"""``load_model``: any input the CLI accepts, original or converted, by one call."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch.nn as nn

from .converted import PLAN_SUFFIX, load_converted
from .sources import ModelSource, load_source_model

__all__ = ["load_model"]


def load_model(source: str, arch: Optional[str] = None, arch_kwargs: Optional[Dict[str, Any]] = None,
               pretrained: bool = False, trust_pickle: bool = False) -> Tuple[nn.Module, ModelSource]:
    """A model spec or file (see :mod:`dsd.io.sources`), or a dsd ``.plan.json``; and where it came from."""
    if source.endswith(PLAN_SUFFIX):
        return load_converted(source), ModelSource(weights=source)
    return load_source_model(source, arch, arch_kwargs, pretrained, trust_pickle)
