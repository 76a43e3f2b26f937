"""Which convs to convert: the user's options and the per-layer selection rules."""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Pattern, Sequence, Union

import torch.nn as nn

from ..errors import DsdError
from .cost import dense_macs_per_pixel, separable_macs_per_pixel
from .factory import Rank, SkipLayer, check_layer_args, layer_spec
from .plan import LayerSpec

__all__ = ["ConversionOptions", "select", "SKIP_PREDICATES", "name_matches"]

NamePattern = Union[str, Pattern]
SkipPredicate = Callable[[str, nn.Conv2d], bool]

SKIP_PREDICATES: Dict[str, SkipPredicate] = {
    # The stem sees raw image channels; decoupling it saves little and costs accuracy.
    "stem": lambda name, conv: conv.in_channels <= 4,
}


def name_matches(name: str, pattern: NamePattern) -> bool:
    """Glob match on a module name; a compiled regex or a string starting with ``re:`` is a regex search."""
    if isinstance(pattern, str) and pattern.startswith("re:"):
        pattern = re.compile(pattern[3:])
    if isinstance(pattern, re.Pattern):
        return pattern.search(name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, (str, re.Pattern)) or callable(value) else list(value)


@dataclass
class ConversionOptions:
    rank: Rank = 1
    dilation: Optional[int] = None
    keep_receptive_field: Union[bool, int] = False
    init: str = "svd"
    include: Sequence[NamePattern] = field(default_factory=list)
    exclude: Sequence[NamePattern] = field(default_factory=list)
    min_channels: int = 0
    skip: Sequence[Union[str, SkipPredicate]] = field(default_factory=list)
    only_if_cheaper: bool = True

    def __post_init__(self):
        check_layer_args(self.rank, self.dilation, self.keep_receptive_field, self.init)
        self.include, self.exclude, self.skip = _as_list(self.include), _as_list(self.exclude), _as_list(self.skip)
        if isinstance(self.min_channels, bool) or not isinstance(self.min_channels, int) or self.min_channels < 0:
            raise DsdError(f"min_channels must be an integer >= 0, got {self.min_channels!r}")
        for rule in self.skip:
            if isinstance(rule, str) and rule not in SKIP_PREDICATES:
                raise DsdError(f"unknown skip rule {rule!r}: choose from {sorted(SKIP_PREDICATES)} or pass a callable")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready record of the options (callables and regexes by their repr)."""
        def plain(v):
            return v.pattern if isinstance(v, re.Pattern) else (v if isinstance(v, str) else repr(v))
        return {"rank": self.rank, "dilation": self.dilation, "keep_receptive_field": self.keep_receptive_field,
                "init": self.init, "include": [plain(p) for p in self.include],
                "exclude": [plain(p) for p in self.exclude], "min_channels": self.min_channels,
                "skip": [plain(s) for s in self.skip], "only_if_cheaper": self.only_if_cheaper}


def select(name: str, conv: nn.Module, options: ConversionOptions) -> LayerSpec:
    """The spec to convert ``conv`` with, or :class:`SkipLayer` saying why it stays dense."""
    spec = layer_spec(conv, options.rank, options.dilation, options.keep_receptive_field, options.init, name)
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
    if options.only_if_cheaper:
        dense = dense_macs_per_pixel(spec.in_channels, spec.out_channels, spec.kernel_size, spec.groups)
        separable = separable_macs_per_pixel(
            spec.in_channels, spec.out_channels, spec.new_kernel_size, spec.rank, spec.groups)
        if separable >= dense:
            raise SkipLayer("not cheaper", f"rank {spec.rank} costs {separable} MACs/pixel vs {dense} dense")
    return spec
