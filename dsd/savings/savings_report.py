"""The savings report: parameters, FLOPs and latency before vs after, per converted layer and in total.

JSON schema (``schema: "dsd.savings"``, ``version: 2``; version 1 files, without the intervals, still load)::

    {"schema": "dsd.savings", "version": 2,
     "flop_convention": str,                      # fvcore: FLOPs are multiply-adds
     "input_size": [C, H, W],                     # FLOPs are per image of this size
     "environment": {device, dtype, batch_size, channels_last, runtime, threads, warmup, iters, device_name,
                     processor, torch, dsd, onnxruntime?} | null,   # null when latency was not measured
     "total": {"params_before", "params_after", "flops_before", "flops_after",
               "latency_before": Latency | null, "latency_after": Latency | null,
               "speedup_p10": float | null, "speedup_p90": float | null},
     "layers": [{"name", ... as in total}],
     "unsupported_ops": {op: count}}              # ops fvcore did not count (element-wise, mostly)
    Latency = {"median_ms", "p10_ms", "p90_ms", "images_per_s", "iters", "samples_ms": [float]}

The speedup is the ratio of the median latencies, the two timed interleaved; ``speedup_p10``/``p90`` are
the bounds of its bootstrap interval.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from ..errors import DsdError
from ..fileio import atomic_path, atomic_write_text
from ..flops import FLOP_CONVENTION
from ..timing import LatencyStats, Speedup

__all__ = ["LayerSavings", "SavingsReport", "SCHEMA", "SCHEMA_VERSION"]

SCHEMA, SCHEMA_VERSION = "dsd.savings", 2
READABLE_VERSIONS = (1, 2)


def _ratio(after: float, before: float) -> Optional[float]:
    return after / before if before else None


def _latency(data: Optional[Dict[str, Any]]) -> Optional[LatencyStats]:
    return LatencyStats(**data) if data else None


@dataclass
class LayerSavings:
    name: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    latency_before: Optional[LatencyStats] = None
    latency_after: Optional[LatencyStats] = None
    speedup_p10: Optional[float] = None
    speedup_p90: Optional[float] = None

    def timed(self, before: LatencyStats, after: LatencyStats) -> None:
        self.latency_before, self.latency_after = before, after
        interval = Speedup.of(before, after)
        self.speedup_p10, self.speedup_p90 = interval.p10, interval.p90

    @property
    def uncertain(self) -> bool:
        """The speedup's interval includes 1.0: this measurement cannot tell faster from slower."""
        return self.speedup_p10 is not None and self.speedup_p10 <= 1.0 <= self.speedup_p90

    def speedup_text(self) -> str:
        if self.speedup is None:
            return "-"
        if self.speedup_p10 is None:
            return f"{self.speedup:.2f}x"
        return f"{self.speedup:.2f}x ({self.speedup_p10:.2f}-{self.speedup_p90:.2f})"

    @property
    def flop_ratio(self) -> Optional[float]:
        return _ratio(self.flops_after, self.flops_before)

    @property
    def speedup(self) -> Optional[float]:
        if self.latency_before and self.latency_after:
            return self.latency_before.median_ms / self.latency_after.median_ms
        return None

    @property
    def efficiency(self) -> Optional[float]:
        """Measured speedup divided by FLOP reduction: 1.0 means the saved FLOPs all became time."""
        if self.speedup is None or not self.flops_after:
            return None
        return self.speedup / (self.flops_before / self.flops_after)

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["latency_before"] = self.latency_before.to_dict() if self.latency_before else None
        data["latency_after"] = self.latency_after.to_dict() if self.latency_after else None
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "LayerSavings":
        return cls(**{**data, "latency_before": _latency(data.get("latency_before")),
                      "latency_after": _latency(data.get("latency_after"))})


@dataclass
class SavingsReport:
    total: LayerSavings
    layers: List[LayerSavings]
    input_size: List[int]
    environment: Optional[Dict[str, Any]] = None
    unsupported_ops: Dict[str, int] = field(default_factory=dict)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        total = self.total.to_dict()
        total.pop("name")
        return {"schema": SCHEMA, "version": SCHEMA_VERSION, "flop_convention": FLOP_CONVENTION,
                "input_size": list(self.input_size), "environment": self.environment, "total": total,
                "layers": [layer.to_dict() for layer in self.layers], "unsupported_ops": self.unsupported_ops}

    def to_json(self, path: Optional[str] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "SavingsReport":
        if data.get("schema") != SCHEMA or data.get("version") not in READABLE_VERSIONS:
            raise DsdError(f"not a {SCHEMA} v{SCHEMA_VERSION} report "
                             f"(schema={data.get('schema')!r}, version={data.get('version')!r})")
        return cls(LayerSavings.from_dict({"name": "total", **data["total"]}),
                   [LayerSavings.from_dict(layer) for layer in data["layers"]], data["input_size"],
                   data.get("environment"), data.get("unsupported_ops", {}))

    @classmethod
    def from_json(cls, text: str) -> "SavingsReport":
        return cls.from_dict(json.loads(text))

    # -- reading -------------------------------------------------------------------------------
    def summary(self) -> str:
        t = self.total
        lines = [f"params {t.params_before / 1e6:.2f}M -> {t.params_after / 1e6:.2f}M "
                 f"({_pct(_ratio(t.params_after, t.params_before))}), "
                 f"FLOPs {t.flops_before / 1e9:.3f}G -> {t.flops_after / 1e9:.3f}G ({_pct(t.flop_ratio)}) "
                 f"per {'x'.join(map(str, self.input_size))} image"]
        if t.speedup is not None:
            lines.append(f"latency {t.latency_before.median_ms:.2f} -> {t.latency_after.median_ms:.2f} ms "
                         f"(median of {t.latency_after.iters}, interleaved): speedup {t.speedup_text()} "
                         f"[p10-p90], efficiency {t.efficiency:.2f} (speedup / FLOP reduction)")
            if t.uncertain:
                lines.append("warning: the speedup's interval includes 1.0: this measurement cannot tell whether "
                             "the converted model is faster; raise --iters or measure on a quieter machine")
        if self.environment:
            e = self.environment
            lines.append(f"measured in {e.get('runtime', 'eager')} on {e['device']} ({e['device_name']}), "
                         f"{e['dtype']}, batch {e['batch_size']}, {e['threads']} threads, "
                         f"channels_last={e['channels_last']}, torch {e['torch']}")
        slower = [layer.name for layer in self.layers if layer.speedup is not None and layer.speedup < 1
                  and not layer.uncertain]
        if slower:
            lines.append(f"{len(slower)} of {len(self.layers)} converted layers measured SLOWER than the original: "
                         + ", ".join(slower[:5]) + (" ..." if len(slower) > 5 else ""))
        uncertain = sum(layer.uncertain for layer in self.layers)
        if uncertain:
            lines.append(f"{uncertain} of {len(self.layers)} converted layers measured too close to the original "
                         "to tell (interval includes 1.0)")
        lines.append(FLOP_CONVENTION + ("; not counted: " + ", ".join(
            f"{op} x{n}" for op, n in sorted(self.unsupported_ops.items())) if self.unsupported_ops else ""))
        return "\n".join(lines)

    def _rows(self) -> List[List[str]]:
        rows = []
        for layer in [*self.layers, self.total]:
            rows.append([layer.name, _count(layer.params_before), _count(layer.params_after),
                         _count(layer.flops_before), _count(layer.flops_after), _pct(layer.flop_ratio),
                         _ms(layer.latency_before), _ms(layer.latency_after),
                         layer.speedup_text()])
        return rows

    HEADERS = ["layer", "params before", "params after", "FLOPs before", "FLOPs after", "FLOPs ratio",
               "ms before", "ms after", "speedup (p10-p90)"]

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.HEADERS) + " |", "|" + "---|" * len(self.HEADERS)]
        lines += ["| " + " | ".join(row) + " |" for row in self._rows()]
        return self.summary().replace("\n", "  \n") + "\n\n" + "\n".join(lines) + "\n"

    def to_rich(self):
        from rich.table import Table
        table = Table(title="dsd savings", caption=self.summary(), caption_justify="left")
        for i, header in enumerate(self.HEADERS):
            table.add_column(header, justify="left" if i == 0 else "right")
        rows = self._rows()
        for i, row in enumerate(rows):
            slow = row[-1] != "-" and float(row[-1].split("x")[0]) < 1
            table.add_row(*row, style="bold" if i == len(rows) - 1 else ("red" if slow else None))
        return table

    def plot(self, path: str) -> None:
        """A PNG: per-layer FLOPs and (when measured) latency before vs after, the layers in the same order in
        both panels (largest original FLOPs at the top), latency with p10-p90 error bars; the title says how
        the figures were measured."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        timed = all(layer.speedup is not None for layer in self.layers) and self.layers
        fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(14 if timed else 8, 2.5 + 0.25 * len(self.layers)),
                                 squeeze=False, sharey=True)
        layers = sorted(self.layers, key=lambda layer: layer.flops_before)  # barh draws bottom-up
        positions = list(range(len(layers)))
        panels = [("FLOPs (MACs) per image", [(l.flops_before, l.flops_after) for l in layers], None)]
        if timed:
            spread = [[(s.median_ms - s.p10_ms, s.p90_ms - s.median_ms) for s in (l.latency_before, l.latency_after)]
                      for l in layers]
            panels.append((f"latency, ms (median, p10-p90; batch {self.environment['batch_size']})",
                           [(l.latency_before.median_ms, l.latency_after.median_ms) for l in layers], spread))
        for ax, (title, values, spread) in zip(axes[0], panels):
            for side, (offset, label) in enumerate(((0.2, "before"), (-0.2, "after"))):
                errors = None if spread is None else [[e[side][0] for e in spread], [e[side][1] for e in spread]]
                ax.barh([p + offset for p in positions], [v[side] for v in values], 0.4, xerr=errors, capsize=2,
                        label=label)
            ax.set_yticks(positions, [layer.name for layer in layers], fontsize=7)
            ax.set_title(title)
            ax.legend()
        lines = self.summary().splitlines()
        fig.suptitle("\n".join([lines[0], *[l for l in lines if l.startswith("measured")]]), fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)


def _pct(ratio: Optional[float]) -> str:
    return f"{ratio:.1%}" if ratio is not None else "-"


def _count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _ms(stats: Optional[LatencyStats]) -> str:
    return f"{stats.median_ms:.3f}" if stats else "-"
