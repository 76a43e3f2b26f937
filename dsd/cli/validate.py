"""``dsd validate SOURCE --data-dir DIR [--against CONVERTED]``: accuracy of both models on your own data."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..convert import convert_model
from ..fileio import OutputSet
from ..io import SUPPORTED_FORMATS, check_outputs, load_model
from ..validation import validate, validation_loader
from .common import (add_common_flags, add_model_args, arch_kwargs, console, input_size, positive_int,
                     warn_if_random_weights)

DESCRIPTION = ("Top-1/top-5 of the original and the converted model on an ImageFolder (or the built-in digits), "
               "side by side, with how often they agree.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, f"the original model: {SUPPORTED_FORMATS}")
    parser.add_argument("--against", metavar="CONVERTED",
                        help="the converted model (a dsd .plan.json, or any source above); default: convert "
                             "SOURCE at rank 1 now")
    data = parser.add_argument_group("data (as timm's validate.py)")
    data.add_argument("--data-dir", required=True, metavar="DIR",
                      help="an ImageFolder (DIR/val is used when it exists; one sub-folder per class), or 'digits'")
    data.add_argument("--input-size", type=positive_int, nargs=3, metavar=("C", "H", "W"),
                      help="input size (default: the timm model's pretrained_cfg, else 3 224 224)")
    data.add_argument("--batch-size", type=positive_int, default=64, help="images per batch")
    data.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--json", metavar="FILE", help="write the accuracies as JSON")
    add_common_flags(parser)


def run(args: argparse.Namespace) -> int:
    outputs_asked = [Path(args.json)] if args.json else []
    check_outputs(outputs_asked, [args.source, args.against or "", args.data_dir], args.force)
    original, source = load_model(args.source, args.arch, arch_kwargs(args), args.pretrained, args.trust_pickle,
                             args.trust_code)
    warn_if_random_weights(args, source)
    size = input_size(args, original)
    loader = validation_loader(args.data_dir, size, args.batch_size, args.workers, original)
    if args.against:
        converted, _ = load_model(args.against, trust_pickle=args.trust_pickle, trust_code=args.trust_code)
    else:
        converted, _ = convert_model(original, torch.randn(1, *size))
    result = validate({"original": original, "converted": converted}, loader, args.data_dir, progress=not args.quiet)
    with OutputSet(outputs_asked, args.force) as outputs:
        if args.json:
            outputs.path(args.json).write_text(result.to_json())
        console(args).print(result.summary())
        written = outputs.commit()
    for path in written:
        console(args).print(f"wrote {path}")
    return 0
