"""The conversion report: every Conv2d the pass saw, converted or skipped and why."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..layers.cost import dense_conv_macs
from ..layers.spec import LayerSpec
from .end_to_end import EndToEnd
from .fidelity import Fidelity
from .match import ConvSite
from .plan import ConversionPlan

__all__ = ["LayerRecord", "ConversionReport", "CONVERTED", "SKIPPED", "PENDING"]

CONVERTED, SKIPPED, PENDING = "converted", "skipped", "pending"
SHOWN_NAMES = 4  # layer names listed per skip category in the summary; all are in to_dict / --json


@dataclass
class LayerRecord:
    name: str
    conv_class: str
    status: str
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    found_by: str
    calls: Optional[int] = None
    input_shape: Optional[Tuple[int, ...]] = None
    output_shape: Optional[Tuple[int, ...]] = None
    category: Optional[str] = None  # skip reason, grouped
    reason: Optional[str] = None
    rank: Optional[int] = None
    new_kernel_size: Optional[Tuple[int, int]] = None
    new_dilation: Optional[Tuple[int, int]] = None
    init_error: Optional[float] = None  # relative weight error ||W' - W|| / ||W|| of the initial weights
    output_error: Optional[float] = None  # relative output error ||y' - y|| / ||y|| on calibration data (init="data")
    latency_before_ms: Optional[float] = None  # measured with only_if_faster
    latency_after_ms: Optional[float] = None
    macs_before: Optional[int] = None  # per image, all calls (fvcore convention: one MAC = one FLOP)
    macs_after: Optional[int] = None
    params_before: Optional[int] = None
    params_after: Optional[int] = None

    @classmethod
    def describe(cls, site: ConvSite) -> "LayerRecord":
        """The one record of a conv, before any decision (status ``pending``)."""
        conv = site.module
        record = cls(site.name, type(conv).__name__, PENDING, conv.in_channels, conv.out_channels,
                     tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation), conv.groups,
                     site.found_by, site.calls, site.input_shape, site.output_shape)
        if site.calls is not None and len(site.call_shapes) == site.calls:
            record.macs_before = dense_conv_macs(conv, site.call_shapes)
        record.params_before = sum(p.numel() for p in conv.parameters(recurse=False))
        return record

    @property
    def error(self) -> Optional[float]:
        """The layer's one error figure: relative output error on calibration data where there was some,
        else relative weight error (``error_kind`` says which). Both are norms of differences, not squared."""
        return self.output_error if self.output_error is not None else self.init_error

    @property
    def error_kind(self) -> Optional[str]:
        if self.error is None:
            return None
        return "output" if self.output_error is not None else "weight"

    def error_text(self) -> str:
        return f"{self.error:.4f} ({self.error_kind})" if self.error is not None else "-"

    @property
    def action(self) -> str:
        if self.status == CONVERTED:
            kernel = f", {self.new_kernel_size[0]}x{self.new_kernel_size[1]} d{self.new_dilation[0]}" if (
                self.new_kernel_size and tuple(self.new_kernel_size) != tuple(self.kernel_size)) else ""
            return f"convert, rank {self.rank}{kernel}"
        if self.status == SKIPPED:
            return f"keep dense: {self.category} ({self.reason})"
        return self.status

    def skip(self, category: str, reason: str) -> None:
        self.status, self.category, self.reason = SKIPPED, category, reason

    def convert(self, spec: LayerSpec) -> None:
        self.status = CONVERTED
        self.rank, self.new_kernel_size, self.new_dilation = spec.rank, spec.new_kernel_size, spec.new_dilation
        self.init_error = spec.init_error
        if self.macs_before is not None:
            self.macs_after = self.macs_before // spec.dense_macs_per_pixel() * spec.macs_per_pixel()
        self.params_after = spec.params()

    def geometry(self) -> str:
        kh, kw = self.kernel_size
        text = f"{self.in_channels}->{self.out_channels} {kh}x{kw}"
        if self.stride != (1, 1):
            text += f" s{self.stride[0]}" if self.stride[0] == self.stride[1] else f" s{self.stride}"
        if self.dilation != (1, 1):
            text += f" d{self.dilation[0]}" if self.dilation[0] == self.dilation[1] else f" d{self.dilation}"
        if self.groups > 1:
            text += f" g{self.groups}"
        return text


@dataclass
class ConversionReport:
    layers: List[LayerRecord]
    plan: ConversionPlan
    traced: bool
    trace_error: Optional[str] = None
    shapes_verified: Optional[bool] = None  # None: no example input to check with
    other_convs: List[Tuple[str, str]] = field(default_factory=list)
    budget: Optional[Any] = None  # choose.BudgetOutcome when ranks came from a budget
    end_to_end: Optional[EndToEnd] = None  # the whole-model measurement a latency decision ended on
    notes: List[str] = field(default_factory=list)  # what the options did that a user would not guess
    fidelity: Optional[Fidelity] = None  # outputs vs the original's on the calibration data

    @property
    def converted(self) -> List[LayerRecord]:
        return [r for r in self.layers if r.status == CONVERTED]

    @property
    def skipped(self) -> List[LayerRecord]:
        return [r for r in self.layers if r.status == SKIPPED]

    def skip_counts(self) -> Dict[str, int]:
        return dict(Counter(r.category for r in self.skipped).most_common())

    def skipped_by_category(self) -> Dict[str, List[str]]:
        grouped: Dict[str, List[str]] = {}
        for record in self.skipped:
            grouped.setdefault(record.category, []).append(record.name)
        return grouped

    def _reason(self, category: str) -> str:
        """The reason of a category's first layer (the reasons within a category differ only in figures)."""
        return next(r.reason for r in self.skipped if r.category == category)

    def to_rich(self):
        """Every conv with its action, multiply-adds and parameters before and after, and its weight error."""
        from rich.table import Table
        table = Table(title="dsd conversion", caption=self.summary(), caption_justify="left")
        for i, header in enumerate(("layer", "geometry", "action", "MACs before", "MACs after", "params before",
                                    "params after", "error (relative)")):
            table.add_column(header, justify="left" if i < 3 else "right", overflow="fold")

        def count(value: Optional[int]) -> str:
            return f"{value:,}" if value is not None else "-"
        for r in self.layers:
            converted = r.status == CONVERTED
            table.add_row(r.name, r.geometry(), r.action, count(r.macs_before),
                          count(r.macs_after if converted else r.macs_before), count(r.params_before),
                          count(r.params_after if converted else r.params_before),
                          r.error_text(),
                          style=None if converted else "dim")
        before, after = self.conv_macs()
        params_before = sum(r.params_before or 0 for r in self.layers)
        params_after = sum((r.params_after if r.status == CONVERTED else r.params_before) or 0 for r in self.layers)
        table.add_row("total", "", f"{len(self.converted)} of {len(self.layers)} converted", count(before),
                      count(after), count(params_before), count(params_after), "", style="bold")
        return table

    def conv_macs(self) -> Tuple[Optional[int], Optional[int]]:
        """Per-image multiply-adds of all Conv2d layers before and after, or (None, None) without shapes."""
        if any(r.macs_before is None for r in self.layers):
            return None, None
        before = sum(r.macs_before for r in self.layers)
        after = sum(r.macs_after if r.status == CONVERTED else r.macs_before for r in self.layers)
        return before, after

    def summary(self) -> str:
        lines = [f"{len(self.converted)} of {len(self.layers)} Conv2d layers converted"
                 f" ({'traced with torch.fx' if self.traced else 'module-tree fallback: ' + str(self.trace_error)})"]
        if self.skipped:
            lines.append("kept dense: " + ", ".join(f"{n} {c}" for c, n in self.skip_counts().items()))
            for category, names in self.skipped_by_category().items():
                shown = ", ".join(names[:SHOWN_NAMES]) + (f" and {len(names) - SHOWN_NAMES} more"
                                                           if len(names) > SHOWN_NAMES else "")
                lines.append(f"  {category}: {shown} ({self._reason(category)})")
        if self.budget is not None:
            lines.append(self.budget.describe())
        if self.end_to_end is not None:
            lines.append(self.end_to_end.describe())
        before, after = self.conv_macs()
        if before:
            lines.append(f"conv MACs per image: {before / 1e6:.1f}M -> {after / 1e6:.1f}M ({after / before:.1%})")
        if self.fidelity is not None:
            lines.append(self.fidelity.describe())
        lines += [f"note: {note}" for note in self.notes]
        if self.shapes_verified is not None:
            lines.append(f"output shapes verified on the example input: {'yes' if self.shapes_verified else 'NO'}")
        if self.other_convs:
            lines.append("left alone (not nn.Conv2d): " + ", ".join(f"{n} ({c})" for n, c in self.other_convs[:5])
                         + (f" and {len(self.other_convs) - 5} more" if len(self.other_convs) > 5 else ""))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        rows = ["| layer | geometry | status | rank | new kernel | error (relative) | ms before | ms after "
                "| reason |", "|---|---|---|---|---|---|---|---|---|"]

        def number(value, digits=3):
            return f"{value:.{digits}f}" if value is not None else ""
        for r in self.layers:
            new_kernel = (f"{r.new_kernel_size[0]}x{r.new_kernel_size[1]} d{r.new_dilation[0]}"
                          if r.new_kernel_size else "")
            rows.append(f"| `{r.name}` | {r.geometry()} | {r.status} | {r.rank or ''} | {new_kernel} "
                        f"| {r.error_text()} | {number(r.latency_before_ms)} "
                        f"| {number(r.latency_after_ms)} | {r.category + ': ' + r.reason if r.reason else ''} |")
        return self.summary().replace("\n", "  \n") + "\n\n" + "\n".join(rows) + "\n"

    def to_dict(self) -> Dict[str, Any]:
        return {"traced": self.traced, "trace_error": self.trace_error, "shapes_verified": self.shapes_verified,
                "budget": asdict(self.budget) if self.budget is not None else None,
                "end_to_end": self.end_to_end.to_dict() if self.end_to_end is not None else None,
                "fidelity": self.fidelity.to_dict() if self.fidelity is not None else None, "notes": self.notes,
                "other_convs": self.other_convs, "layers": [asdict(r) for r in self.layers],
                "plan": self.plan.to_dict()}

    def __str__(self) -> str:
        return self.summary()
