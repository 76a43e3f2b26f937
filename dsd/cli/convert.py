"""``dsd-convert SOURCE`` / ``dsd convert SOURCE``: convert a model and write weights, plan and report."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn

from ..convert import convert_model, list_initializers
from ..convert.factory import DATA_INIT
from ..errors import DsdError
from ..fileio import atomic_path
from ..io import (CALIBRATION_SOURCES, SUPPORTED_FORMATS, calibration_batches, check_outputs, export_onnx,
                  load_model, output_paths, save_converted)
from ..report import compare
from .common import (add_common_flags, add_measure_args, add_model_args, arch_kwargs, console, fraction,
                     input_size, positive_int, rank_value)
from .savings_output import emit, report_files, wants_latency

DESCRIPTION = "Convert a model's dense Conv2d layers into depthwise-separable ones, initialised from its weights."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, f"the model: {SUPPORTED_FORMATS}")
    conv = parser.add_argument_group("conversion (see dsd.convert_model)")
    conv.add_argument("--rank", type=rank_value, default=1, help="depth multiplier, or 'full' (exact); default 1")
    conv.add_argument("--dilation", type=positive_int, help="dilation of the depthwise kernels")
    conv.add_argument("--keep-receptive-field", nargs="?", const=True, default=False, type=positive_int,
                      metavar="K", help="large kernels -> smaller dilated ones of the same extent (K: kernel size)")
    conv.add_argument("--include", action="append", default=[], metavar="GLOB", help="only these layers (glob or re:REGEX)")
    conv.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="never these layers")
    conv.add_argument("--min-channels", type=int, default=0, help="leave layers with fewer channels dense")
    conv.add_argument("--skip", action="append", default=[], metavar="RULE", help="named skip rule, e.g. stem")
    conv.add_argument("--init", default="svd", choices=[*list_initializers(), DATA_INIT],
                      help="data: decouple on calibration data (--calib)")
    conv.add_argument("--allow-costlier", dest="only_if_cheaper", action="store_false",
                      help="also convert layers whose separable form costs more multiply-adds")
    budget = parser.add_argument_group("budgets and data-aware conversion (choose at most one budget)")
    budget.add_argument("--energy", type=fraction, help="per layer, the smallest rank keeping this share of energy")
    budget.add_argument("--target-flops", type=fraction, help="converted FLOPs at most this share of the original")
    budget.add_argument("--target-params", type=fraction, help="converted parameters at most this share")
    budget.add_argument("--target-latency", type=fraction,
                        help="summed conv latency on --device at most this share (each candidate is measured)")
    budget.add_argument("--only-if-faster", action="store_true",
                        help="keep layers dense that measure slower separable on --device")
    budget.add_argument("--calib", metavar="SOURCE", help=f"calibration data: {CALIBRATION_SOURCES}")
    budget.add_argument("--calib-batches", type=positive_int, default=8)
    budget.add_argument("--calib-batch-size", type=positive_int, default=32)
    budget.add_argument("--sequential", action="store_true", help="calibrate layer by layer, fed by converted layers")
    budget.add_argument("--recalibrate-bn", action="store_true", help="re-estimate BatchNorm statistics on --calib")
    out = parser.add_argument_group("outputs")
    out.add_argument("-o", "--output", help="weights file (*.safetensors); the plan goes beside it "
                                            "(default: <stem>_dsd.safetensors beside the input)")
    out.add_argument("--save-module", action="store_true", help="also torch.save the whole converted module (.pt)")
    out.add_argument("--export", choices=["onnx"], help="also export ONNX, checked against PyTorch with onnxruntime")
    out.add_argument("--report", action="store_true", help="print the savings table with measured latency")
    add_measure_args(parser)
    add_common_flags(parser)


def run(args: argparse.Namespace) -> int:
    out = console(args)
    outputs = output_paths(args.source, args.output, args.save_module, args.export == "onnx")
    check_outputs([*outputs.all(), *report_files(args)], [args.source], args.force)

    model, source = load_model(args.source, args.arch, arch_kwargs(args), args.pretrained, args.trust_pickle)
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise DsdError(f"{args.source} has no nn.Conv2d layers: nothing to convert")
    size = input_size(args, model)
    calib = calibration_batches(args.calib, size, args.calib_batches, args.calib_batch_size) if args.calib else None
    converted, report = convert_model(
        model, torch.randn(1, *size), rank=args.rank, dilation=args.dilation,
        keep_receptive_field=args.keep_receptive_field, init=args.init, include=args.include,
        exclude=args.exclude, min_channels=args.min_channels, skip=args.skip,
        only_if_cheaper=args.only_if_cheaper, energy=args.energy, target_flops=args.target_flops,
        target_params=args.target_params, target_latency=args.target_latency, device=args.device,
        only_if_faster=args.only_if_faster, calibration_data=calib, sequential=args.sequential,
        recalibrate_bn=args.recalibrate_bn, progress=not args.quiet)
    out.print(report.summary())
    if not report.converted:
        out.print("[yellow]warning:[/] no layer was converted (reasons: dsd report, or the plan); the outputs equal the input")
    written = []
    try:
        written += save_converted(converted, report.plan, outputs.weights, source)
        if outputs.module:
            with atomic_path(outputs.module) as tmp:
                torch.save(converted, tmp)
            written.append(outputs.module)
        if outputs.onnx:
            export_onnx(converted, torch.randn(1, *size), outputs.onnx)
            written.append(outputs.onnx)
        savings = compare(model, converted, size, args.device, args.batch_size, args.dtype, args.channels_last,
                          args.compile, latency=wants_latency(args), warmup=args.warmup, iters=args.iters)
        emit(savings, args, out, show_table=args.report)
    except BaseException:
        for path in written:  # all or nothing: no converted weights without their plan and reports
            Path(path).unlink(missing_ok=True)
        raise
    for path in [*written, *report_files(args)]:
        out.print(f"wrote {path}")
    return 0
