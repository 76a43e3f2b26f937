"""``dsd-convert SOURCE`` / ``dsd convert SOURCE``: convert a model and write weights, plan and report."""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from ..calibration import CALIBRATION_SOURCES, calibration_batches
from ..convert import ConvertOptions, apply_folding, convert_model, find_foldable, fold_batchnorm
from ..errors import DsdError
from ..fileio import OutputSet
from ..io import SUPPORTED_FORMATS, check_outputs, export_onnx, output_paths, write_converted
from ..layers.create import DATA_INIT
from ..savings import compare
from .common import (add_common_flags, add_measure_args, add_model_args, benchmark_settings, console, input_size,
                     load_source, positive_int)
from .dataclass_args import add_dataclass_arguments, dataclass_from_args
from .savings_output import emit, report_files, wants_latency

DESCRIPTION = "Convert a model's dense Conv2d layers into depthwise-separable ones, initialised from its weights."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, f"the model: {SUPPORTED_FORMATS}")
    conv = parser.add_argument_group("conversion (dsd.ConvertOptions; at most one budget, or --target-latency "
                                     "with --target-flops or --target-params)")
    add_dataclass_arguments(conv, ConvertOptions, skip=("benchmark",))
    conv.add_argument("--calib", metavar="SOURCE", help=f"calibration data: {CALIBRATION_SOURCES}")
    conv.add_argument("--calib-batch-size", type=positive_int, default=32, help="images per calibration batch")
    out = parser.add_argument_group("outputs")
    out.add_argument("-o", "--output", help="weights file (*.safetensors); the plan goes beside it "
                                            "(default: <stem>_dsd.safetensors beside the input)")
    out.add_argument("--save-module", action="store_true", help="also torch.save the whole converted module (.pt)")
    out.add_argument("--export", choices=["onnx"], help="also export ONNX, checked against PyTorch with onnxruntime")
    out.add_argument("--fold-bn", action="store_true",
                     help="fold inference BatchNorm into the convs before writing (the plan records it)")
    out.add_argument("--report", action="store_true", help="print the savings table with measured latency")
    out.add_argument("--dry-run", action="store_true",
                     help="print what would happen to every conv (action, MACs, params, error) and write nothing")
    add_measure_args(parser)
    add_common_flags(parser)


def run(args: argparse.Namespace) -> int:
    out = console(args)
    settings = benchmark_settings(args)
    options = dataclass_from_args(ConvertOptions, args, benchmark=settings)
    if (options.init == DATA_INIT or options.recalibrate_bn) and not args.calib:
        raise DsdError("--init data and --recalibrate-bn need calibration data: add --calib digits|random|FOLDER")
    paths = output_paths(args.source, args.output, args.save_module, args.export == "onnx")
    if not args.dry_run:
        check_outputs([*paths.all(), *report_files(args)], [args.source], args.force)

    model, source = load_source(args)
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise DsdError(f"{args.source} has no nn.Conv2d layers: nothing to convert")
    size = input_size(args, model)
    # twice the batches calibration uses where the source has them: the rest are held out for the fidelity figure
    calib = (calibration_batches(args.calib, size, 2 * options.calibration_batches, args.calib_batch_size,
                                 model=model) if args.calib else None)
    converted, report = convert_model(model, torch.randn(1, *size), options, calibration_data=calib,
                                      progress=not args.quiet)
    if args.fold_bn:
        folding = find_foldable(converted.eval())
        apply_folding(converted, folding.pairs)
        report.plan.folded_batchnorm = folding.pairs
        out.print(f"folded {len(folding.pairs)} BatchNorm layers into their convs"
                  + (f"; not traced, left as they are: {', '.join(folding.untraced)}" if folding.untraced else ""))
    if args.dry_run:
        console(args, results=True).print(report.to_rich())
        out.print("dry run: nothing written")
        return 0
    out.print(report.summary())
    if not report.converted:
        out.print("[yellow]warning:[/] no layer was converted (reasons: dsd report, or the plan); the outputs equal the input")
    # Reports first, the weights+plan pair last: the plan, which names its weights, is the final rename.
    with OutputSet([*report_files(args), *paths.extras(), paths.weights, paths.plan], args.force) as outputs:
        write_converted(converted, report.plan, outputs, paths.weights, source)
        if paths.module:
            torch.save(converted, outputs.path(paths.module))
        if paths.onnx:
            # any batch size; the forms chosen at the batch the latency flags say they deploy at
            export_onnx(converted, torch.randn(settings.batch_size, *size), outputs.path(paths.onnx),
                        progress=not args.quiet)
        baseline = fold_batchnorm(model.eval()) if args.fold_bn else model  # like against like
        savings = compare(baseline, converted, size, settings, latency=wants_latency(args), progress=not args.quiet)
        emit(savings, args, out, outputs, show_table=args.report, extra={"conversion": report.to_dict()})
        written = outputs.commit()
    for path in written:
        out.print(f"wrote {path}")
    return 0
