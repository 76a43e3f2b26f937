"""Which convs to convert: the per-layer selection rules over :class:`ConvertOptions`."""
from __future__ import annotations

import fnmatch
import re

import torch.nn as nn

from ..layers.create import SkipLayer, check_weight, layer_spec
from ..layers.spec import LayerSpec
from .options import SKIP_PREDICATES, ConvertOptions, NamePattern

__all__ = ["select", "name_matches"]


def name_matches(name: str, pattern: NamePattern) -> bool:
    """Glob match on a module name; a compiled regex or a string starting with ``re:`` is a regex search."""
    if isinstance(pattern, str) and pattern.startswith("re:"):
        pattern = re.compile(pattern[3:])
    if isinstance(pattern, re.Pattern):
        return pattern.search(name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select(name: str, conv: nn.Module, options: ConvertOptions) -> LayerSpec:
    """The spec to convert ``conv`` with (at rank 1 under a budget), or :class:`SkipLayer` saying why it stays dense."""
    rank = 1 if options.budget else options.rank
    spec = layer_spec(conv, rank, options.dilation, options.keep_receptive_field, options.init, name,
                      single_channel=bool(options.budget))
    if options.include and not any(name_matches(name, p) for p in options.include):
        raise SkipLayer("not included", f"matches none of include={[str(p) for p in options.include]}")
    for pattern in options.exclude:
        if name_matches(name, pattern):
            raise SkipLayer("excluded", f"matches exclude pattern {str(pattern)!r}")
    if min(conv.in_channels, conv.out_channels) < options.min_channels:
        raise SkipLayer("min_channels", f"{conv.in_channels}->{conv.out_channels} channels, "
                                        f"fewer than min_channels={options.min_channels}")
    for rule in options.skip:
        predicate = SKIP_PREDICATES[rule] if isinstance(rule, str) else rule
        if predicate(name, conv):
            raise SkipLayer("skip rule", f"skip rule {rule if isinstance(rule, str) else getattr(rule, '__name__', rule)!r}")
    if options.only_if_cheaper and spec.macs_per_pixel() >= spec.dense_macs_per_pixel():
        raise SkipLayer("not cheaper", f"rank {spec.rank} costs {spec.macs_per_pixel()} MACs/pixel "
                                       f"vs {spec.dense_macs_per_pixel()} dense")
    check_weight(conv, name)
    return spec
