"""Latency statistics of one timed module, and the speedup between two with its bootstrap interval."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Sequence

import numpy as np

__all__ = ["LatencyStats", "Speedup"]


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.quantile(np.asarray(values, dtype=np.float64), q))


@dataclass
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    images_per_s: float
    iters: int
    samples_ms: List[float] = field(default_factory=list)  # each iteration, in the order taken

    @classmethod
    def of(cls, samples_ms: Sequence[float], batch_size: int) -> "LatencyStats":
        median = statistics.median(samples_ms)
        return cls(median, _percentile(samples_ms, 0.1), _percentile(samples_ms, 0.9), batch_size * 1e3 / median,
                   len(samples_ms), [float(t) for t in samples_ms])

    @classmethod
    def summed(cls, parts: Sequence["LatencyStats"], batch_size: int) -> "LatencyStats":
        """Iteration by iteration: the time of several calls (a layer run on several inputs) per forward."""
        count = min(len(p.samples_ms) for p in parts)
        return cls.of([sum(p.samples_ms[i] for p in parts) for i in range(count)], batch_size)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Speedup:
    """``before / after`` of the medians, with a bootstrap interval (10th-90th percentile of the ratio of
    medians over resampled iterations). ``clearly_slower``/``clearly_faster``: the interval says so."""
    median: float
    p10: float
    p90: float

    @classmethod
    def of(cls, before: LatencyStats, after: LatencyStats, resamples: int = 1000, seed: int = 0) -> "Speedup":
        ratio = before.median_ms / after.median_ms
        a, b = np.asarray(before.samples_ms), np.asarray(after.samples_ms)
        if len(a) < 2 or len(b) < 2:
            return cls(ratio, ratio, ratio)
        rng = np.random.default_rng(seed)
        ratios = (np.median(a[rng.integers(0, len(a), (resamples, len(a)))], axis=1)
                  / np.median(b[rng.integers(0, len(b), (resamples, len(b)))], axis=1))
        return cls(ratio, float(np.quantile(ratios, 0.1)), float(np.quantile(ratios, 0.9)))

    @property
    def clearly_slower(self) -> bool:
        return self.p90 < 1.0

    @property
    def clearly_faster(self) -> bool:
        return self.p10 > 1.0

    @property
    def uncertain(self) -> bool:
        return not (self.clearly_slower or self.clearly_faster)

    def __str__(self) -> str:
        return f"{self.median:.2f}x (p10-p90 {self.p10:.2f}-{self.p90:.2f}x)"

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)
