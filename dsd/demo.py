"""``dsd demo``: the whole toolkit on real data, offline, on a CPU, in about two minutes on two cores.

Train (or load from the cache) a small CNN on scikit-learn's handwritten digits, convert it at rank 1,
measure accuracy before fine-tuning, fine-tune with the ``digits`` recipe, and compare original,
converted and fine-tuned models: accuracy, parameters, FLOPs, latency.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .finetune import FinetuneResult, finetune, load_recipe
from .io import load_converted, load_model
from .savings import SavingsReport, compare

__all__ = ["run_demo", "DemoResult"]


@dataclass
class DemoResult:
    finetune: FinetuneResult
    savings: SavingsReport

    def rows(self) -> List[List[str]]:
        f, s = self.finetune, self.savings.total
        after = s.latency_after.median_ms if s.latency_after else float("nan")
        before = s.latency_before.median_ms if s.latency_before else float("nan")
        return [
            ["original", f"{f.teacher_acc:.2%}", f"{f.teacher_params:,}", f"{f.teacher_flops / 1e6:.2f}M", f"{before:.3f}"],
            ["converted, rank 1 (before fine-tuning)", f"{f.student_acc_before:.2%}", f"{f.student_params:,}",
             f"{f.student_flops / 1e6:.2f}M", f"{after:.3f}"],
            [f"fine-tuned ({f.epochs} epochs, distillation)", f"{f.student_acc_after:.2%}", f"{f.student_params:,}",
             f"{f.student_flops / 1e6:.2f}M", f"{after:.3f}"],
        ]

    def to_rich(self):
        from rich.table import Table
        env = self.savings.environment or {}
        table = Table(title="dsd demo: digits (scikit-learn load_digits, 360 validation images)",
                      caption=f"FLOPs: multiply-adds per 1x32x32 image (fvcore). Latency: median of {env.get('iters')} "
                              f"runs, batch {env.get('batch_size')}, {env.get('device')}, {env.get('threads')} threads, "
                              f"torch {env.get('torch')}. Run folder: {self.finetune.run_dir}",
                      caption_justify="left")
        for i, header in enumerate(["model", "val accuracy", "params", "FLOPs", "latency ms"]):
            table.add_column(header, justify="left" if i == 0 else "right")
        for row in self.rows():
            table.add_row(*row)
        return table


def run_demo(epochs: Optional[int] = None, output_dir: Optional[str] = None, progress: bool = True,
             force: bool = False, latency_iters: int = 50) -> DemoResult:
    """Run the demo; ``output_dir`` defaults to a new temporary folder (kept, and named in the table)."""
    run_dir = output_dir or tempfile.mkdtemp(prefix="dsd-demo-")
    overrides = [f"output_dir={run_dir}"] + ([f"schedule.epochs={epochs}"] if epochs else [])
    recipe = load_recipe("digits", overrides)
    result = finetune(recipe, progress=progress, force=force)
    teacher, _ = load_model(recipe.teacher.source, pretrained=True)
    student = load_converted(Path(run_dir) / "student_dsd.plan.json")
    size = [recipe.data.channels, recipe.data.image_size, recipe.data.image_size]
    savings = compare(teacher, student, size, per_layer=False, warmup=5, iters=latency_iters, progress=progress)
    return DemoResult(result, savings)
