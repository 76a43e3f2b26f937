"""``dsd report SOURCE [--against CONVERTED]``: parameters, FLOPs and latency, before vs after."""
from __future__ import annotations

import argparse

import torch

from ..fileio import OutputSet
from ..io import SUPPORTED_FORMATS, check_outputs
from ..savings import FLOP_CONVENTION, compare, count_flops
from .common import (add_against, add_common_flags, add_measure_args, add_model_args, benchmark_settings, console,
                     input_size, load_against, load_source, positive_int)
from .savings_output import emit, report_files

DESCRIPTION = "Savings of a converted model against its original: fvcore params/FLOPs and measured latency."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, f"the original model: {SUPPORTED_FORMATS}")
    add_against(parser)
    add_measure_args(parser)
    parser.add_argument("--no-layers", dest="per_layer", action="store_false", help="skip per-layer latency")
    parser.add_argument("--layers", type=positive_int, nargs="?", const=3, metavar="DEPTH",
                        help="also print fvcore's per-module FLOP and parameter table of both models, modules "
                             "down to DEPTH levels (default when given: 3)")
    add_common_flags(parser)


def run(args: argparse.Namespace) -> int:
    check_outputs(report_files(args), [args.source, args.against or ""], args.force)
    settings = benchmark_settings(args)
    original, _ = load_source(args)
    size = input_size(args, original)
    converted = load_against(args, original, size)
    savings = compare(original, converted, size, settings, per_layer=args.per_layer, progress=not args.quiet)
    out = console(args, results=True)
    if args.layers:
        example = torch.randn(1, *size)
        for title, model in (("original", original), ("converted", converted)):
            out.print(f"\n{title} ({FLOP_CONVENTION}):\n{count_flops(model, example).table(args.layers)}", markup=False)
    with OutputSet(report_files(args), args.force) as outputs:
        emit(savings, args, out, outputs, show_table=True)
        outputs.commit()
    return 0
