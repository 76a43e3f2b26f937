"""``dsd demo``: train, convert, fine-tune and compare on real digits, offline, in about two minutes on two CPU cores."""
from __future__ import annotations

import argparse

from ..demo import run_demo
from .common import add_common_flags, console, positive_int

DESCRIPTION = "Show the whole toolkit on scikit-learn's handwritten digits (offline, CPU, about two minutes)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=positive_int, help="fine-tuning epochs (default: the digits recipe's)")
    parser.add_argument("--output-dir", help="run folder (default: a new temporary folder)")
    add_common_flags(parser, force_help="start over in an --output-dir that holds a run")


def run(args: argparse.Namespace) -> int:
    result = run_demo(args.epochs, args.output_dir, progress=not args.quiet, force=args.force)
    console(args, results=True).print(result.to_rich())
    return 0
