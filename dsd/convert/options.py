"""``ConvertOptions``: everything a conversion can be asked, defined once.

``convert_model`` reads it, the CLI derives its conversion flags from its fields (help text included),
a recipe's ``student.convert`` section is one, and every plan records one (``to_dict``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Dict, Optional, Pattern, Tuple, Union

import torch.nn as nn

from ..errors import DsdError
from ..layers.create import DATA_INIT, FULL_RANK, Rank, check_layer_args
from ..timing import BenchmarkSettings

__all__ = ["ConvertOptions", "SKIP_PREDICATES", "BUDGETS", "FLOPS_SCOPES", "ALLOCATIONS", "DECISION_TIMING", "NamePattern", "SkipRule"]

NamePattern = Union[str, Pattern]
SkipPredicate = Callable[[str, nn.Conv2d], bool]
SkipRule = Union[str, SkipPredicate]

SKIP_PREDICATES: Dict[str, SkipPredicate] = {
    # The stem sees raw image channels; decoupling it saves little and costs accuracy.
    "stem": lambda name, conv: conv.in_channels <= 4,
}
BUDGETS = ("energy", "target_flops", "target_params", "target_latency")
FLOPS_SCOPES = ("model", "convs")  # what target_flops is a share of
ALLOCATIONS = ("layer", "sensitivity")  # what a budget minimises
# Per candidate layer when only_if_faster or target_latency decide: enough to order the options, cheap on a CPU.
DECISION_TIMING = BenchmarkSettings(warmup=3, iters=15)


def _meta(help: str, **cli: Any) -> Dict[str, Any]:
    """Field metadata: the help text, and argparse hints where the type alone does not say (``cli``)."""
    return {"help": help, "cli": cli}


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    return (value,) if isinstance(value, (str, re.Pattern)) or callable(value) else tuple(value)


def _plain(value: Any) -> Any:
    """JSON-ready form of a pattern or skip rule (callables by their repr)."""
    return value.pattern if isinstance(value, re.Pattern) else (value if isinstance(value, str) else repr(value))


@dataclass(frozen=True)
class ConvertOptions:
    """What to convert, at which rank, from which initialisation. Validated on construction."""
    rank: Rank = field(default=1, metadata=_meta(
        f"depth multiplier of every converted layer, or {FULL_RANK!r} (exact decoupling)", type="rank"))
    dilation: Optional[int] = field(default=None, metadata=_meta("dilation of the depthwise kernels"))
    keep_receptive_field: Union[bool, int] = field(default=False, metadata=_meta(
        "large kernels become smaller dilated ones of the same extent (K: that kernel size)",
        nargs="?", const=True, type=int, metavar="K"))
    init: str = field(default="svd", metadata=_meta(
        f"initialisation: svd (from the trained weights), random (baseline), {DATA_INIT} (on calibration data), "
        "or a name given to dsd.layers.register_initializer"))
    include: Tuple[NamePattern, ...] = field(default=(), metadata=_meta(
        "only layers whose name matches (glob, or re:REGEX; repeatable)", metavar="GLOB"))
    exclude: Tuple[NamePattern, ...] = field(default=(), metadata=_meta(
        "never layers whose name matches (glob, or re:REGEX; repeatable)", metavar="GLOB"))
    min_channels: int = field(default=0, metadata=_meta("leave layers with fewer in or out channels dense"))
    skip: Tuple[SkipRule, ...] = field(default=(), metadata=_meta(
        f"named skip rule ({', '.join(SKIP_PREDICATES)}; repeatable), or a callable (name, conv) -> bool in Python",
        metavar="RULE"))
    only_if_cheaper: bool = field(default=True, metadata=_meta(
        "also convert layers whose separable form costs more multiply-adds", flag="--allow-costlier"))
    energy: Optional[float] = field(default=None, metadata=_meta(
        "budget: per layer, the smallest rank keeping this share of the weight energy"))
    target_flops: Optional[float] = field(default=None, metadata=_meta(
        "budget: FLOPs at most this share of the original's (of the whole model's, or the convs': target_flops_of)"))
    target_flops_of: str = field(default="model", metadata=_meta(
        "what target_flops is a share of: model (every FLOP fvcore counts) or convs (the Conv2d layers' only; "
        "what plans and recipes that do not say mean)", choices=FLOPS_SCOPES))
    target_params: Optional[float] = field(default=None, metadata=_meta(
        "budget: the model's parameters at most this share of the original's"))
    target_latency: Optional[float] = field(default=None, metadata=_meta(
        "budget: the whole model's latency, measured in the benchmark settings' runtime, at most this share "
        "(with target_flops or target_params: both hold)"))
    allocation: str = field(default="layer", metadata=_meta(
        "what a FLOP, parameter or latency budget minimises: layer (the sum of each layer's own relative error: "
        "in output space with init=data) or sensitivity (each layer's output error weighted by how far it moves "
        "the model's outputs, estimated on the calibration data)", choices=ALLOCATIONS))
    only_if_faster: bool = field(default=False, metadata=_meta(
        "keep layers dense that measure slower separable, and never let the model be slower end to end "
        "(measured in the benchmark settings' runtime)"))
    benchmark: BenchmarkSettings = field(default=DECISION_TIMING, metadata=_meta(
        "how only_if_faster and target_latency measure (the CLI's measurement flags)"))
    calibration_batches: int = field(default=8, metadata=_meta(
        "calibration batches used for init=data and recalibrate_bn (up to as many more, where given, are held out "
        "for the fidelity figure)", flag="--calib-batches", metavar="N"))
    sequential: bool = field(default=True, metadata=_meta(
        "init=data: calibrate layer by layer, each fed by the converted layers upstream (off: all at once from "
        "the original's activations, faster)", flag="--no-sequential"))
    recalibrate_bn: bool = field(default=False, metadata=_meta(
        "re-estimate BatchNorm statistics on the calibration batches"))

    def __post_init__(self):
        for name in ("include", "exclude", "skip"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        check_layer_args(self.rank, self.dilation, self.keep_receptive_field, self.init)
        for name in ("only_if_cheaper", "only_if_faster", "sequential", "recalibrate_bn"):
            if not isinstance(getattr(self, name), bool):
                raise DsdError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, least in (("min_channels", 0), ("calibration_batches", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DsdError(f"{name} must be an integer >= {least}, got {value!r}")
        for rule in self.skip:
            if isinstance(rule, str) and rule not in SKIP_PREDICATES:
                raise DsdError(f"unknown skip rule {rule!r}: choose from {sorted(SKIP_PREDICATES)} or pass a callable")
        for pattern in (*self.include, *self.exclude):
            if isinstance(pattern, str) and pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as error:
                    raise DsdError(f"name pattern {pattern!r} is not a valid regular expression: {error}") from None
        for name, allowed in (("target_flops_of", FLOPS_SCOPES), ("allocation", ALLOCATIONS)):
            if getattr(self, name) not in allowed:
                raise DsdError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.benchmark, BenchmarkSettings):
            raise DsdError(f"benchmark must be a dsd.timing.BenchmarkSettings, got {type(self.benchmark).__name__}")
        self._check_budget()

    def _check_budget(self) -> None:
        chosen = self.budget
        if len(chosen) > 1 and not (len(chosen) == 2 and "target_latency" in chosen and "energy" not in chosen):
            raise DsdError(f"choose one of {', '.join(BUDGETS)}, or target_latency with target_flops or "
                           f"target_params (got {', '.join(sorted(chosen))})")
        for key, value in chosen.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise DsdError(f"{key} must be a fraction in (0, 1], got {value!r}")
        if chosen and self.rank != 1:
            raise DsdError("rank and a budget both set the ranks: choose one")

    @property
    def budget(self) -> Dict[str, float]:
        """The budget asked for, as ``{name: value}`` (empty: every layer at ``rank``)."""
        return {name: getattr(self, name) for name in BUDGETS if getattr(self, name) is not None}

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready record (patterns and callables by their text): what a plan stores."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("include", "exclude", "skip"):
            data[name] = [_plain(v) for v in data[name]]
        data["benchmark"] = self.benchmark.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ConvertOptions":
        """Options from a mapping (a recipe section, a plan's record, CLI values); unknown keys are refused."""
        if not isinstance(data, dict):
            raise DsdError(f"conversion options must be a mapping, got {data!r}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise DsdError(f"unknown conversion option {unknown[0]!r}; valid: {', '.join(names)}")
        data = dict(data)
        data.setdefault("target_flops_of", "convs")  # plans and recipes of dsd 0.1 meant the convs' FLOPs
        if isinstance(data.get("benchmark"), dict):
            data["benchmark"] = BenchmarkSettings.from_dict(data["benchmark"])
        return cls(**data)

    def with_overrides(self, **overrides: Any) -> "ConvertOptions":
        """A copy with some fields changed; ``device=`` (the keyword of earlier releases) sets the benchmark's."""
        if "device" in overrides:
            overrides["benchmark"] = replace(overrides.get("benchmark", self.benchmark), device=overrides.pop("device"))
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise DsdError(f"unknown conversion option {unknown[0]!r}; valid: {', '.join(sorted(names))}")
        return replace(self, **overrides)
