"""Accuracy vs cost on real digits: three architectures, ranks 1/2/4, dilation, keep-receptive-field, three inits.

    python benchmarks/recovery.py [--models digits_cnn ...] [--configs r1 r2 ...] [--inits svd data random]
                                  [--seeds 0 1 2] [--epochs 3] [--retime]

For each built-in digits model (trained here once, cached) and each conversion setting: the original's
accuracy, the converted model's accuracy before fine-tuning and after ``--epochs`` of the digits recipe
(distillation from the original), for svd, data-aware and random initialisation; mean and spread over
seeds; whole-model FLOPs (fvcore) and CPU latency at batch 1, timed after all training in rounds that
alternate between the models, so that drift hits them alike (``--retime``: re-time the rows of an
existing ``results/recovery.json``, on a quiet machine). Writes ``results/recovery.json`` and the Pareto
plot ``results/recovery_pareto.png`` (accuracy vs FLOPs and vs latency), and sets the results beside the
published reference points of MobileNet v1 and Network Decoupling (ImageNet: a different dataset).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from dsd import convert_model, zoo
from dsd.finetune import finetune, load_recipe
from dsd.finetune.distributed import DistEnv
from dsd.finetune.models import train_builtin
from dsd.calibration import calibration_batches
from dsd.savings import count_flops
from dsd.timing import BenchmarkSettings, model_latency
from _results import RESULTS, environment, write

INPUT_SIZE = (1, 32, 32)
CONFIGS: Dict[str, Dict[str, Any]] = {  # convert_model arguments (the recipe's student.convert)
    "r1": {"rank": 1}, "r2": {"rank": 2}, "r4": {"rank": 4},
    "r1-dil2": {"rank": 1, "dilation": 2},
    # 5x5 -> 3x3 dilation 2; keep_receptive_field converts only kernels above 3x3 (on 3x3-only nets: nothing,
    # so its fine-tuned row shows what distillation alone does to the unchanged original)
    "r1-krf": {"rank": 1, "keep_receptive_field": True},
    "flops-0.55": {"target_flops": 0.55, "target_flops_of": "convs"},  # 1.8x fewer conv FLOPs: Network Decoupling's VGG16 operating point
}
INITS = ["svd", "data", "random"]
LATENCY = BenchmarkSettings(iters=20, warmup=5)  # per round
# Published reference points (ImageNet), to set beside ours; both compare separable with full convolution.
REFERENCES = [
    {"method": "MobileNet v1 (Howard et al., 2017), separable vs full conv", "data": "ImageNet, top-1",
     "cost_ratio": 8.5, "original": 71.7, "converted": 70.6, "training": "both trained from scratch"},
    {"method": "Network Decoupling (Guo et al., 2018), VGG16", "data": "ImageNet, top-5",
     "cost_ratio": 1.8, "original": None, "converted": None, "drop": 1.0, "training": "none (decoupled weights)"},
]


def spread(values: List[float]) -> Dict[str, Any]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def same_plan_as_rank1(model: str, config: str) -> bool:
    """Whether a setting converts exactly as plain rank 1 does (keep_receptive_field without kernels above 3)."""
    teacher, example = zoo.build(model, pretrained=True), torch.randn(1, *INPUT_SIZE)
    plans = [convert_model(teacher, example, **kwargs)[1].plan.to_dict()["layers"]
             for kwargs in (CONFIGS["r1"], CONFIGS[config])]
    return plans[0] == plans[1]


def run_one(model: str, config: str, init: str, seed: int, epochs: int) -> Dict[str, Any]:
    convert = [f"student.convert.{key}={json.dumps(value)}" for key, value in CONFIGS[config].items()]
    overrides = [f"teacher.source=dsd:{model}", *convert,
                 f"student.convert.init={init}", f"seed={seed}", f"schedule.epochs={epochs}", "tensorboard=false"]
    with tempfile.TemporaryDirectory() as run_dir:
        result = finetune(load_recipe("digits", [*overrides, f"output_dir={run_dir}"]), progress=False)
        row = {"teacher_acc": result.teacher_acc, "before": result.student_acc_before,
               "after": result.student_acc_after, "flops_before": result.teacher_flops,
               "flops_after": result.student_flops, "params_before": result.teacher_params,
               "params_after": result.student_params, "converted_layers": result.converted_layers}
    return row


def architecture(teacher: nn.Module, row: Dict[str, Any], calibration: List[torch.Tensor]) -> Optional[nn.Module]:
    """The converted architecture of a row (weights do not change latency), rebuilt with its settings; None
    where the rebuilt one differs (a budget's data-aware ranks depend on which calibration batches it saw)."""
    example = torch.randn(1, *INPUT_SIZE)
    kwargs = dict(row["convert"], init=row["init"])
    if row["init"] == "data":
        kwargs["calibration_data"] = calibration
    student, _ = convert_model(teacher, example, **kwargs)
    return student if count_flops(student, example).total == row["flops_after"] else None


def add_latency(rows: List[Dict[str, Any]], rounds: int = 5) -> None:
    """Batch-1 CPU latency of each row's model and its original: median over rounds that alternate models."""
    models: Dict[str, nn.Module] = {}
    calibration = calibration_batches("digits", INPUT_SIZE, batches=8, batch_size=64)
    for model in sorted({r["model"] for r in rows}):
        teacher = zoo.build(model, pretrained=True).eval()
        models[model] = teacher
        for r in rows:
            if r["model"] == model:
                student = architecture(teacher, r, calibration)
                if student is not None:
                    models[f"{model} {r['config']} {r['init']}"] = student
    times: Dict[str, List[float]] = {key: [] for key in models}
    for _ in range(rounds):
        for key, module in models.items():
            times[key].append(model_latency(module, INPUT_SIZE, LATENCY).median_ms)
    for r in rows:
        r["latency_before_ms"] = statistics.median(times[r["model"]])
        key = f"{r['model']} {r['config']} {r['init']}"
        r["latency_after_ms"] = statistics.median(times[key]) if key in times else None


def pareto(points: List[Dict[str, Any]], cost: str) -> List[Dict[str, Any]]:
    """The points no other point beats on both cost (lower) and accuracy (higher), by cost."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p[cost], -p["accuracy"])):
        if p["accuracy"] > best:
            front.append(p)
            best = p["accuracy"]
    return front


def plot(rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    points = [{"model": r["model"], "config": r["config"], "init": r["init"], "accuracy": 100 * r["after"]["mean"],
               "flops": r["flops_after"] / 1e6, "latency": r["latency_after_ms"]} for r in rows]
    timed = [p for p in points if p["latency"] is not None]
    originals = {r["model"]: (100 * r["original_acc"], r["flops_before"] / 1e6, r["latency_before_ms"]) for r in rows}
    markers = dict(zip(sorted(originals), "osD^v"))
    colors = dict(zip(INITS, ("tab:blue", "tab:green", "tab:red")))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, cost, label in ((axes[0], "flops", "FLOPs per image (M, fvcore)"),
                            (axes[1], "latency", "CPU latency, batch 1 (ms)")):
        for p in points if cost == "flops" else timed:
            ax.scatter(p[cost], p["accuracy"], marker=markers[p["model"]], color=colors[p["init"]], alpha=0.7)
        reference = [{"accuracy": acc, "flops": flops, "latency": ms} for acc, flops, ms in originals.values()]
        for model, (acc, flops, ms) in originals.items():
            ax.scatter(flops if cost == "flops" else ms, acc, marker=markers[model], color="black", s=80)
        front = pareto((points if cost == "flops" else timed) + reference, cost)
        ax.plot([p[cost] for p in front], [p["accuracy"] for p in front], "k--", lw=1, label="Pareto front")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("val accuracy after fine-tuning (%)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], ls="", marker=m, color="gray", label=n) for n, m in markers.items()]
    handles += [plt.Line2D([], [], ls="", marker="o", color=c, label=f"{i} init") for i, c in colors.items()]
    handles += [plt.Line2D([], [], ls="", marker="o", color="black", label="original"),
                plt.Line2D([], [], ls="--", color="black", label="Pareto front")]
    fig.legend(handles=handles, fontsize=8, loc="center right")
    fig.suptitle("dsd on sklearn digits: accuracy vs cost (mean over seeds)")
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)


def _ms(value: Optional[float]) -> str:
    return f"{value:.2f}" if value is not None else "—"


def _pct(spread_: Dict[str, Any]) -> str:
    return f"{100 * spread_['mean']:.2f} ± {100 * spread_['std']:.2f}"


def markdown(rows: List[Dict[str, Any]], skipped: List[str]) -> str:
    epochs, seeds = rows[0]["epochs"], rows[0]["seeds"]
    lines = [f"Fine-tune: {epochs} epochs of the `digits` recipe (distillation from the original), seeds {seeds}; "
             "accuracy in % on the fixed 360-image validation split, mean ± std over seeds. FLOPs: whole model "
             "(fvcore, MACs); latency: CPU, batch 1, 1x32x32, median over 5 rounds that alternate the models "
             "(— where a budget's data-aware ranks could not be rebuilt exactly for timing).", "",
             "![accuracy vs cost](results/recovery_pareto.png)", "",
             "| model | setting | init | original | converted, no FT | fine-tuned | FLOPs | FLOP reduction "
             "| params | latency (ms) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['config']} | {r['init']} | {100 * r['original_acc']:.2f} "
                     f"| {_pct(r['before'])} | {_pct(r['after'])} | {r['flops_after'] / 1e6:.2f}M "
                     f"| {r['flops_before'] / r['flops_after']:.2f}x | {r['params_after']:,} "
                     f"| {r['latency_before_ms']:.2f} -> {_ms(r['latency_after_ms'])} |")
    if skipped:
        lines += ["", "Not run, the same plan as `r1` (keep_receptive_field acts only on kernels above 3x3): "
                  + ", ".join(skipped) + "."]
    lines += ["", "### Beside the published reference points", "",
              "Different data: the references are ImageNet models; ours are small nets on sklearn digits. "
              "A cost ratio is the original's whole-model mult-adds over the separable model's.", "",
              "| method | data | cost ratio | accuracy change (points) | training |", "|---|---|---|---|---|"]
    for ref in REFERENCES:
        drop = ref.get("drop", (ref["original"] or 0) - (ref["converted"] or 0))
        lines.append(f"| {ref['method']} | {ref['data']} | {ref['cost_ratio']}x | -{drop:.1f} | {ref['training']} |")
    for r in _closest(rows, 8.5, after=True) + _closest(rows, 1.8, after=False):
        after = r["after"] if r["_after"] else r["before"]
        change = 100 * (after["mean"] - r["original_acc"])
        training = f"{epochs}-epoch distillation" if r["_after"] else "none (no fine-tune)"
        lines.append(f"| dsd {r['config']} {r['init']} init, {r['model']} | digits (different dataset) "
                     f"| {r['flops_before'] / r['flops_after']:.1f}x | {change:+.2f} ± {100 * after['std']:.2f} "
                     f"| {training} |")
    return "\n".join(lines) + "\n"


def _closest(rows: List[Dict[str, Any]], ratio: float, after: bool) -> List[Dict[str, Any]]:
    """Per model, the setting whose FLOP reduction is nearest ``ratio``, with its best-accuracy init."""
    chosen = []
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        config = min(mine, key=lambda r: abs(r["flops_before"] / r["flops_after"] - ratio))["config"]
        accuracy = (lambda r: r["after"]["mean"]) if after else (lambda r: r["before"]["mean"])
        best = max((r for r in mine if r["config"] == config), key=accuracy)
        chosen.append({**best, "_after": after})
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(zoo.MODELS), choices=list(zoo.MODELS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--inits", nargs="+", default=INITS, choices=INITS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--retime", action="store_true", help="only re-time the rows in results/recovery.json")
    parser.add_argument("--render", action="store_true", help="only redraw plot and tables from results/recovery.json")
    args = parser.parse_args()
    if args.retime or args.render:
        data = json.loads((RESULTS / "recovery.json").read_text())
        if args.retime:
            add_latency(data["rows"])
            data["retimed"] = environment()
        save(data["rows"], data.get("skipped", []), data["environment"], retimed=data.get("retimed"))
        return

    rows, skipped = [], []
    print(f"{'model':17} {'setting':10} {'init':6} {'original':>8} {'no FT':>15} {'fine-tuned':>15} "
          f"{'FLOPs':>8}", flush=True)
    for model in args.models:
        if not zoo.cached_weights(model).is_file():
            train_builtin(model, DistEnv(), progress=False)
        for config in args.configs:
            if config != "r1" and same_plan_as_rank1(model, config):
                skipped.append(f"{model} {config}")
                continue
            for init in args.inits:
                runs = [run_one(model, config, init, seed, args.epochs) for seed in args.seeds]
                first = runs[0]
                row = {"model": model, "config": config, "convert": CONFIGS[config], "init": init,
                       "seeds": args.seeds, "epochs": args.epochs, "original_acc": first["teacher_acc"],
                       "before": spread([r["before"] for r in runs]), "after": spread([r["after"] for r in runs]),
                       **{k: first[k] for k in ("flops_before", "flops_after", "params_before", "params_after",
                                                "converted_layers")}}
                rows.append(row)
                print(f"{model:17} {config:10} {init:6} {100 * row['original_acc']:8.2f} {_pct(row['before']):>15} "
                      f"{_pct(row['after']):>15} {row['flops_after'] / 1e6:7.2f}M", flush=True)
    add_latency(rows)
    save(rows, skipped, environment())


def save(rows: List[Dict[str, Any]], skipped: List[str], env: Dict[str, Any], **extra: Any) -> None:
    plot(rows, RESULTS / "recovery_pareto.png")
    path = write("recovery", rows, env=env, markdown=markdown(rows, skipped), skipped=skipped,
                 dataset="sklearn load_digits, fixed stratified 80/20 split, 360 val images, upsampled to 32x32",
                 recipe="recipes/digits.yaml", references=REFERENCES, plot="recovery_pareto.png", **extra)
    print(f"wrote {path} and {RESULTS / 'recovery_pareto.png'}")


if __name__ == "__main__":
    main()
