"""``dsd finetune RECIPE [--set key=value ...]``: distil the original model into its converted copy.

Under torchrun (``torchrun --nproc_per_node N -m dsd.cli finetune RECIPE``) every rank runs this.
"""
from __future__ import annotations

import argparse
import os

from ..finetune import builtin_recipes, finetune, load_recipe
from .common import add_common_flags, add_trust_code, console, positive_int

DESCRIPTION = "Fine-tune a converted model by distillation from the original, as a recipe says."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help=f"a recipe YAML file, or a built-in one: {', '.join(builtin_recipes())}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a recipe key, e.g. --set optim.lr=0.01 (repeatable)")
    parser.add_argument("--resume", metavar="RUN", help="continue from a checkpoint (file or run folder)")
    parser.add_argument("--allow-recipe-change", action="store_true",
                        help="with --resume: continue although the recipe differs from the run's")
    parser.add_argument("--stop-after-epoch", type=positive_int, metavar="N",
                        help="stop after epoch N (resume later with --resume), e.g. for time-limited jobs")
    add_trust_code(parser)
    add_common_flags(parser, force_help="start over in an output_dir that holds a run")


def summary_table(result):
    from rich.table import Table
    table = Table(title=f"dsd finetune: {result.run_dir}", caption=f"{result.epochs} epochs on {result.world_size} "
                  f"process(es); FLOPs per image (fvcore multiply-adds)", caption_justify="left")
    for header in ("model", "val accuracy", "params", "FLOPs"):
        table.add_column(header, justify="left" if header == "model" else "right")
    table.add_row("teacher (original)", f"{result.teacher_acc:.2%}", f"{result.teacher_params:,}",
                  f"{result.teacher_flops / 1e6:.2f}M")
    table.add_row(f"student before fine-tuning ({result.converted_layers} layers converted)",
                  f"{result.student_acc_before:.2%}", f"{result.student_params:,}", f"{result.student_flops / 1e6:.2f}M")
    table.add_row("student after fine-tuning", f"{result.student_acc_after:.2%}"
                  + (f" (EMA {result.student_acc_ema:.2%})" if result.student_acc_ema is not None else ""),
                  f"{result.student_params:,}", f"{result.student_flops / 1e6:.2f}M")
    return table


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    result = finetune(recipe, resume=args.resume, stop_after_epoch=args.stop_after_epoch,
                      progress=not args.quiet, force=args.force, trust_code=args.trust_code,
                      allow_recipe_change=args.allow_recipe_change)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        console(args, results=True).print(summary_table(result))
    return 0
